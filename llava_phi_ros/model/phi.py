"""Phi-2 decoder with a preallocated KV cache. Parameter names follow transformers' PhiModel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU used by Phi (`gelu_new`)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class KVCache:
    """Preallocated keys and values for every layer (no reallocation while generating).

    Positions are absolute: `forward(..., start_pos=p)` writes positions p..p+T-1 and attends to
    0..p+T-1. Rewinding is free: writing at an earlier position overwrites what was there.
    """

    def __init__(self, cfg: TextConfig, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"KV cache length {max_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        shape = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, Dh)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.keys.shape[1]


class RotaryEmbedding(nn.Module):
    """Partial rotary embedding (rotate-half form) on the first `rotary_dim` dims of q and k."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (S_max, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (S_max, dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.dim = dim

    def _apply(self, fn, recurse=True):
        """Follow device moves, but keep the tables fp32 when the model is cast to fp16/bf16."""
        return super()._apply(lambda t: t.to(fn(t.new_empty(0)).device), recurse)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        # x: (B, H, T, Dh); rotation computed in fp32, then cast back.
        t = x.shape[2]
        cos = self.cos[start_pos:start_pos + t]  # (T, dim)
        sin = self.sin[start_pos:start_pos + t]
        rot, rest = x[..., :self.dim].float(), x[..., self.dim:]
        half = self.dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos + rotated * sin
        return torch.cat([rot.to(x.dtype), rest], dim=-1)


class PhiAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cache: KVCache | None,
                layer: int, start_pos: int) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        shape = (b, t, self.num_heads, self.head_dim)
        q = rotary(self.q_proj(x).view(shape).transpose(1, 2), start_pos)  # (B, H, T, Dh)
        k = rotary(self.k_proj(x).view(shape).transpose(1, 2), start_pos)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        end = start_pos + t
        if cache is None:  # training: the whole sequence at once, nothing kept
            keys, values = k, v
        else:
            cache.keys[layer, :b, :, start_pos:end] = k
            cache.values[layer, :b, :, start_pos:end] = v
            keys = cache.keys[layer, :b, :, :end]  # (B, H, end, Dh)
            values = cache.values[layer, :b, :, :end]
        mask = None
        if t > 1:  # query i (absolute position start_pos + i) sees keys 0..start_pos + i
            mask = torch.ones(t, keys.shape[2], dtype=torch.bool,
                              device=x.device).tril(diagonal=keys.shape[2] - t)
        # Scores and softmax in fp32: Phi-2 overflows in fp16 otherwise.
        out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                             attn_mask=mask)
        return self.dense(out.to(x.dtype).transpose(1, 2).reshape(b, t, d))


class PhiMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = gelu_new if cfg.hidden_act == "gelu_new" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    """Parallel block: h = x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cache: KVCache | None,
                layer: int, start_pos: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, rotary, cache, layer, start_pos) + self.mlp(h)
