"""An independent reference built from transformers' CLIPVisionModel + PhiForCausalLM.

The project's model is its own code; these helpers copy its weights into transformers modules and
run LLaVA's recipe with them (hidden_states[select_layer], drop CLS, projector, splice, Phi).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

from llava_phi_ros.model.config import LlavaPhiConfig, tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX


def random_tiny_model(seed: int = 0, vocab_size: int = 128, image_size: int = 28,
                      cfg: LlavaPhiConfig | None = None) -> LlavaPhiForCausalLM:
    """A tiny model with every weight random (lm_head bias and LayerNorms included)."""
    torch.manual_seed(seed)
    model = LlavaPhiForCausalLM(cfg or tiny_config(vocab_size, image_size))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):  # scales near 1, as trained models have
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
        model.lm_head.bias.copy_(0.3 * torch.randn_like(model.lm_head.bias))
    return model.eval()


class Reference:
    """transformers modules holding the same weights as a LlavaPhiForCausalLM."""

    def __init__(self, model: LlavaPhiForCausalLM):
        cfg = model.config
        v, t = cfg.vision, cfg.text
        self.cfg = cfg
        self.clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps, num_channels=v.num_channels,
            attn_implementation="eager")).eval()
        self.phi = PhiForCausalLM(PhiConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_attention_heads,
            max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
            hidden_act=t.hidden_act, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "partial_rotary_factor": t.partial_rotary_factor},
            attn_implementation="eager")).eval()
        sd = model.state_dict()
        # transformers 5 keeps CLIPVisionModel's modules at its top level (no vision_model.)
        prefix = "model.vision_tower.vision_model."
        if any(k.startswith("vision_model.") for k in self.clip.state_dict()):
            prefix = "model.vision_tower."
        clip_sd = {k[len(prefix):]: w for k, w in sd.items()
                   if k.startswith(prefix)}
        missing, unexpected = self.clip.load_state_dict(clip_sd, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        phi_sd = {k: w for k, w in sd.items()
                  if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
        missing, unexpected = self.phi.load_state_dict(phi_sd, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        assert self.phi.lm_head.bias is not None
        self.proj = {k[len("model.mm_projector."):]: w for k, w in sd.items()
                     if k.startswith("model.mm_projector.")}

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, N, D_text) the LLaVA way."""
        hidden = self.clip(pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[self.cfg.vision_select_layer]
        if self.cfg.vision_select_feature == "patch":
            feats = feats[:, 1:]
        x = F.linear(feats, self.proj["0.weight"], self.proj["0.bias"])
        x = F.gelu(x)
        return F.linear(x, self.proj["2.weight"], self.proj["2.bias"])

    @torch.no_grad()
    def embeds(self, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """(1, T', D) input embeddings with the image spliced at IMAGE_TOKEN_INDEX."""
        emb = self.phi.get_input_embeddings()
        parts, cur = [], []
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                if cur:
                    parts.append(emb(torch.tensor(cur)))
                    cur = []
                parts.append(features[0])
            else:
                cur.append(i)
        if cur:
            parts.append(emb(torch.tensor(cur)))
        return torch.cat(parts).unsqueeze(0)

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Full-recompute logits (1, T, V), no cache."""
        return self.phi(inputs_embeds=embeds, use_cache=False).logits

    @torch.no_grad()
    def greedy(self, ids: list[int], pixel_values: torch.Tensor, steps: int) -> list[int]:
        """Greedy tokens recomputing the whole sequence every step (no KV cache)."""
        embeds = self.embeds(ids, self.image_features(pixel_values))
        out = []
        for _ in range(steps):
            nxt = int(self.logits(embeds)[0, -1].argmax())
            out.append(nxt)
            embeds = torch.cat([embeds, self.phi.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        return out
