"""Phi-2 decoder with a preallocated KV cache. Parameter names follow transformers' PhiModel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU used by Phi (`gelu_new`)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class KVCache:
    """Preallocated keys and values for every layer, of a fixed length (static shapes).

    Positions are absolute: a step writes its keys/values at the positions it is given and
    attends through a mask (key j is seen by a query at position p iff j <= p): the decode step
    over the whole cache (static shapes), a prefill over the prefix it has written. Rewinding is
    free: writing at an earlier position overwrites what was there, and entries past the
    query's position are masked out.
    """

    def __init__(self, cfg: TextConfig, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"KV cache length {max_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        shape = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, S, Dh)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.arange(max_len, device=device)  # (S,)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def visible(self, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """(T,) absolute query positions -> (T, S) bool: the cache entries (the first kv_len,
        or all) each query sees; never later positions, nor what an earlier, longer sequence
        left there."""
        keys = self.key_positions if kv_len is None else self.key_positions[:kv_len]
        return keys <= positions[:, None]


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

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) positions -> fp32 cos, sin (T, dim), gathered (no host-side slicing)."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T, Dh); cos/sin: (T, dim). Rotation computed in fp32, then cast back.
        rot, rest = x[..., :self.dim].float(), x[..., self.dim:]
        half = self.dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos + rotated * sin
        return torch.cat([rot.to(x.dtype), rest], dim=-1)


@dataclass
class StepInputs:
    """What every layer of one decoder step shares: positions, rotary tables, mask, cache."""

    positions: torch.Tensor  # (T,) absolute positions, long
    cos: torch.Tensor  # (T, rotary_dim) fp32
    sin: torch.Tensor
    visible: torch.Tensor | None  # (T, S) bool: keys each query sees; None = causal over T
    cache: KVCache | None
    kv_len: int | None = None  # attend over the cache's first kv_len entries (None: all)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention, safe in fp16. q (B, H, T, Dh) is scaled by 1/sqrt(Dh) BEFORE q.k (raw
    Phi-2 q.k overflows fp16); the fused kernel (CPU flash, CUDA flash / memory-efficient) keeps
    scores and softmax in fp32 internally and never casts the cache. visible: (T, S) bool, or
    None for causal attention over the sequence itself. Returns (B, H, T, Dh)."""
    q = q * q.shape[-1] ** -0.5
    if visible is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=1.0)


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

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, step: StepInputs,
                layer: int) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        shape = (b, t, self.num_heads, self.head_dim)
        q = rotary(self.q_proj(x).view(shape).transpose(1, 2), step.cos, step.sin)  # (B,H,T,Dh)
        k = rotary(self.k_proj(x).view(shape).transpose(1, 2), step.cos, step.sin)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if step.cache is None:  # training: the whole sequence at once, nothing kept
            keys, values = k, v
        else:  # write this step's entries at their positions, then attend through the mask
            keys = step.cache.keys[layer, :b]  # (B, H, S, Dh)
            values = step.cache.values[layer, :b]
            keys.index_copy_(2, step.positions, k)
            values.index_copy_(2, step.positions, v)
            if step.kv_len is not None:
                keys, values = keys[:, :, :step.kv_len], values[:, :, :step.kv_len]
        out = attention(q, keys, values, step.visible)
        return self.dense(out.transpose(1, 2).reshape(b, t, d))


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

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, step: StepInputs,
                layer: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, rotary, step, layer) + self.mlp(h)
