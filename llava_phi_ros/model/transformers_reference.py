"""An independent reference built from transformers' CLIPVisionModel + PhiForCausalLM.

The project's model is its own code; `Reference` copies its weights into transformers modules and
runs LLaVA's recipe with them (hidden_states[select_layer], drop CLS, projector, splice, Phi).
The parity tests use it with eager attention; `llava-phi bench` uses it (with sdpa) as the stock
transformers baseline. transformers is an optional dependency: importing this module needs it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

from .config import LlavaPhiConfig
from .llava_phi import LlavaPhiForCausalLM
from .prompt import IMAGE_TOKEN_INDEX

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def clip_config(cfg: LlavaPhiConfig, attn_implementation: str = "eager") -> CLIPVisionConfig:
    """The transformers CLIPVisionConfig of this model's vision tower."""
    v = cfg.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps, num_channels=v.num_channels,
        attn_implementation=attn_implementation)


def phi_config(cfg: LlavaPhiConfig, attn_implementation: str = "eager") -> PhiConfig:
    """The transformers PhiConfig of this model's decoder (transformers 5: rope_parameters)."""
    t = cfg.text
    return PhiConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
        hidden_act=t.hidden_act, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                         "partial_rotary_factor": t.partial_rotary_factor},
        attn_implementation=attn_implementation)


def _skip_init() -> AbstractContextManager:
    """transformers' no_init_weights where it exists: every weight is overwritten right after."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the random init
        return nullcontext()
    return no_init_weights()


class Reference:
    """transformers modules holding the same weights as a LlavaPhiForCausalLM (copies of them)."""

    def __init__(self, model: LlavaPhiForCausalLM, attn_implementation: str = "eager"):
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {attn_implementation!r} is not one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}")
        cfg = model.config
        self.cfg = cfg
        with _skip_init():
            self.clip = CLIPVisionModel(clip_config(cfg, attn_implementation)).eval()
            self.phi = PhiForCausalLM(phi_config(cfg, attn_implementation)).eval()
            self.projector = (nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
                              if cfg.projector_type == "linear" else
                              nn.Sequential(nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size),
                                            nn.GELU(),
                                            nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)))
        sd = model.state_dict()
        # transformers 5 keeps CLIPVisionModel's modules at its top level (no vision_model.)
        prefix = "model.vision_tower.vision_model."
        if any(k.startswith("vision_model.") for k in self.clip.state_dict()):
            prefix = "model.vision_tower."
        clip_sd = {k[len(prefix):]: w for k, w in sd.items() if k.startswith(prefix)}
        missing, unexpected = self.clip.load_state_dict(clip_sd, strict=False)
        if unexpected or not all("position_ids" in k for k in missing):
            raise ValueError(f"CLIP weights do not fit: missing {missing}, unexpected {unexpected}")
        phi_sd = {k: w for k, w in sd.items()
                  if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
        missing, unexpected = self.phi.load_state_dict(phi_sd, strict=False)
        if missing or unexpected or self.phi.lm_head.bias is None:
            raise ValueError(f"Phi weights do not fit: missing {missing}, unexpected {unexpected}")
        proj_sd = {k[len("model.mm_projector."):]: w for k, w in sd.items()
                   if k.startswith("model.mm_projector.")}
        self.projector.load_state_dict(proj_sd)
        self.projector.eval()

    @property
    def device(self) -> torch.device:
        return self.phi.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.phi.lm_head.weight.dtype

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Reference:
        """Move and cast every module (in place, like nn.Module.to); returns self."""
        for module in (self.clip, self.phi, self.projector):
            module.to(device, dtype)
        return self

    def parameters(self) -> list[nn.Parameter]:
        """Every weight the reference holds (vision, decoder, projector)."""
        return [p for m in (self.clip, self.phi, self.projector) for p in m.parameters()]

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, N, D_text) the LLaVA way."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        hidden = self.clip(pixel_values, output_hidden_states=True).hidden_states
        feats = hidden[self.cfg.vision_select_layer]
        if self.cfg.vision_select_feature == "patch":
            feats = feats[:, 1:]
        return self.projector(feats)

    @torch.no_grad()
    def embeds(self, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """(1, T', D) input embeddings with the image spliced at IMAGE_TOKEN_INDEX."""
        emb = self.phi.get_input_embeddings()
        parts, cur = [], []
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                if cur:
                    parts.append(emb(torch.tensor(cur, device=self.device)))
                    cur = []
                parts.append(features[0].to(self.dtype))
            else:
                cur.append(i)
        if cur:
            parts.append(emb(torch.tensor(cur, device=self.device)))
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
        emb = self.phi.get_input_embeddings()
        for _ in range(steps):
            nxt = int(self.logits(embeds)[0, -1].argmax())
            out.append(nxt)
            embeds = torch.cat([embeds, emb(torch.tensor([[nxt]], device=self.device))], 1)
        return out
