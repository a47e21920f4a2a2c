"""LLaVA-Phi: CLIP vision tower -> MLP projector -> Phi-2, spliced at the image placeholder.

Module names reproduce the original LLaVA-Phi checkpoint keys (`model.embed_tokens`,
`model.layers.N.*`, `model.final_layernorm`, `model.vision_tower.vision_model.*`,
`model.mm_projector.{0,2}.*`, `lm_head.{weight,bias}`), so the original layout loads as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .clip import CLIPVisionTower
from .config import LlavaPhiConfig
from .generation import splice_image_features
from .phi import KVCache, PhiDecoderLayer, RotaryEmbedding, StepInputs


def build_projector(cfg: LlavaPhiConfig) -> nn.Module:
    """`mlp2x_gelu`: Linear -> GELU (exact erf) -> Linear; or a single `linear` layer."""
    d_in, d_out = cfg.vision.hidden_size, cfg.text.hidden_size
    if cfg.projector_type == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class LlavaPhiModel(nn.Module):
    """Everything but the LM head (the `model.` prefix of the checkpoint)."""

    def __init__(self, cfg: LlavaPhiConfig):
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)
        self.rotary = RotaryEmbedding(t)
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used,
                                            keep_cls=cfg.vision_select_feature == "cls_patch")
        self.mm_projector = build_projector(cfg)


class LlavaPhiForCausalLM(nn.Module):
    """The whole model. Inference goes through a KVCache with absolute positions."""

    def __init__(self, cfg: LlavaPhiConfig):
        super().__init__()
        self.config = cfg
        self.model = LlavaPhiModel(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def rebuild_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute buffers that checkpoints do not store (rotary cos/sin), after a meta build."""
        with torch.device(device if device is not None else self.device):
            self.model.rotary = RotaryEmbedding(self.config.text)

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        """A preallocated KV cache in the model's dtype and device (full context by default)."""
        t = self.config.text
        return KVCache(t, max_len or t.max_position_embeddings, batch, self.dtype, self.device)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: (B, C, S, S) -> (B, N, D_text)."""
        features = self.model.vision_tower(pixel_values.to(self.device, self.dtype))
        return self.model.mm_projector(features)

    def embed(self, input_ids: Sequence[int],
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each IMAGE_TOKEN_INDEX replaced by one image's N features.

        input_ids: T ids, K of them IMAGE_TOKEN_INDEX; image_features: (K, N, D) or (N, D).
        Returns (1, T - K + K*N, D).
        """
        return splice_image_features(input_ids, self.embed_ids, image_features).unsqueeze(0)

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """Text token embeddings: T ids -> (T, D)."""
        return self.model.embed_tokens(torch.tensor(list(ids), dtype=torch.long,
                                                    device=self.device))

    def forward_embeds(self, embeds: torch.Tensor, cache: KVCache | None, start_pos: int,
                       last_only: bool = True) -> torch.Tensor:
        """Run the decoder on (B, T, D) embeddings at absolute positions start_pos..start_pos+T-1.

        With cache None (training), start_pos must be 0 and attention is causal over the batch's
        own positions (right padding is harmless: no real token attends to a later pad).
        Returns fp32 logits, (B, V) for the last position when last_only, else (B, T, V).
        """
        t = embeds.shape[1]
        if cache is None:
            if start_pos != 0 or t > self.config.text.max_position_embeddings:
                raise ValueError(f"without a KV cache, positions must start at 0 and fit "
                                 f"{self.config.text.max_position_embeddings}")
        elif start_pos < 0 or start_pos + t > cache.max_len:
            raise ValueError(f"positions {start_pos}..{start_pos + t - 1} do not fit the "
                             f"KV cache of {cache.max_len}")
        positions = torch.arange(start_pos, start_pos + t, device=embeds.device)
        # A prefill's shapes follow the prompt anyway: it attends over the prefix it has written
        # (causal from position 0 without a mask), not the whole cache as the decode step does.
        kv_len = None if cache is None else start_pos + t
        return self.step(embeds, cache, positions, last_only, kv_len, causal=start_pos == 0)

    def step(self, embeds: torch.Tensor, cache: KVCache | None, positions: torch.Tensor,
             last_only: bool = True, kv_len: int | None = None,
             causal: bool = False) -> torch.Tensor:
        """The decoder step: (B, T, D) embeddings at the (T,) positions (a device tensor:
        nothing here reads it on the host); their keys/values go into the cache at those
        positions and attention runs through a mask over the whole cache, or over its first
        kv_len entries. causal: the positions are 0..T-1 = kv_len (no mask needed). The decode
        step (T = 1, kv_len None) has the same shapes at every position. The caller keeps the
        positions inside the cache. fp32 logits (B, V) when last_only, else (B, T, V)."""
        cos, sin = self.model.rotary.tables(positions)
        visible = None if cache is None or causal else cache.visible(positions, kv_len)
        inputs = StepInputs(positions, cos, sin, visible, cache, kv_len)
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, self.model.rotary, inputs, i)
        if last_only:
            x = x[:, -1]
        return self.lm_head(self.model.final_layernorm(x)).float()

    def forward(self, input_ids: torch.Tensor, cache: KVCache, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Text-only forward: (B, T) ids -> fp32 logits (B, T, V) (or (B, V) when last_only)."""
        embeds = self.model.embed_tokens(input_ids.to(self.device))
        return self.forward_embeds(embeds, cache, start_pos, last_only)
