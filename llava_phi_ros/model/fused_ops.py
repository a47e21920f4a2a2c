"""The fused decode step's kernels (batch 1, one token): Triton on a GPU, torch references.

Each op exists twice with one signature: `TorchOps` (plain torch, any device: the CPU path and
the oracle the tests hold the Triton kernels to) and `TritonOps` (one kernel each, no host
reads: the position and the attended length come from a device tensor, so one captured CUDA
graph serves every position). The Triton kernels also run on the CPU under TRITON_INTERPRET=1,
which is how CI checks them.

The fused layer input is y = ln(x) @ W_in^T with W_in = [q; k; v; fc1] (N_in = 3D + I rows); the
layer output is [attn | gelu(fc1)] @ W_out^T with W_out = [dense | fc2] (see fused_step.py).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .phi import gelu_new

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU product needs no Triton; TritonOps says why it cannot run
    triton = None
    tl = None

ATTENTION_SPLITS = 16  # split-K programs per head: each reads one chunk of the valid cache
ATTENTION_BLOCK = 32  # keys per inner iteration of a split


def triton_available(device: torch.device) -> str | None:
    """Why TritonOps cannot run on `device` (None: it can): no Triton, or a CPU device
    without the interpreter."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), not {device}"
    return None


def _rotate_half(x: torch.Tensor, rotary_dim: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """(H, Dh) fp32: the rotate-half rotary embedding on the first rotary_dim dims."""
    rot, rest = x[:, :rotary_dim], x[:, rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[:, half:], rot[:, :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class TorchOps:
    """The reference: the same arithmetic as the unfused step (fp32 rotary, fp32-accumulated
    softmax), one torch call after another."""

    name = "torch"

    def qkv_rotary_cache(self, y: torch.Tensor, bias: torch.Tensor, cos_table: torch.Tensor,
                         sin_table: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, rotary_dim: int) -> torch.Tensor:
        """y (1, N_in) + bias: rotate q and k at `position` (a (1,) device tensor), write k and
        v into keys/values (H, S, Dh) there; q (H, Dh) scaled by 1/sqrt(Dh) comes back."""
        h, _, dh = keys.shape
        d = h * dh
        qkv = (y[0, :3 * d] + bias[:3 * d]).view(3, h, dh)
        cos, sin = cos_table[position], sin_table[position]  # (1, R) fp32
        q = _rotate_half(qkv[0].float(), rotary_dim, cos, sin).to(y.dtype)
        k = _rotate_half(qkv[1].float(), rotary_dim, cos, sin).to(y.dtype)
        keys.index_copy_(1, position, k[:, None])
        values.index_copy_(1, position, qkv[2][:, None])
        return q * dh ** -0.5

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         position: torch.Tensor, out: torch.Tensor) -> None:
        """Softmax attention of q (H, Dh) over cache entries 0..position: out (1, H*Dh)."""
        visible = torch.arange(keys.shape[1], device=keys.device) <= position  # (S,)
        attn = F.scaled_dot_product_attention(q[:, None], keys, values, attn_mask=visible,
                                              scale=1.0)  # (H, 1, Dh)
        out.copy_(attn.reshape(1, -1))

    def bias_gelu(self, y: torch.Tensor, bias: torch.Tensor, start: int,
                  out: torch.Tensor) -> None:
        """out (1, I) = gelu_new(y[:, start:] + bias[start:]) (the fc1 part of y)."""
        out.copy_(gelu_new(y[:, start:] + bias[start:]))

    def add_layernorm(self, x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                      weight: torch.Tensor, ln_bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x + (z + bias) (the residual stream, (1, D)) and its LayerNorm."""
        x = x + (z + bias)
        return x, F.layer_norm(x, (x.shape[-1],), weight, ln_bias, eps)


if triton is not None:
    @triton.jit
    def _qkv_rotary_cache_kernel(y, bias, cos_table, sin_table, position, keys, values, q_out,
                                 D, DH, S, ROTARY: tl.constexpr, BLOCK_D: tl.constexpr,
                                 SCALE: tl.constexpr):
        head = tl.program_id(0)
        pos = tl.load(position)
        d = tl.arange(0, BLOCK_D)
        inside = d < DH
        half = ROTARY // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        rotary = d < ROTARY
        cos = tl.load(cos_table + pos * ROTARY + d, mask=rotary, other=1.0)
        sin = tl.load(sin_table + pos * ROTARY + d, mask=rotary, other=0.0)
        for part in tl.static_range(2):  # q, then k
            base = part * D + head * DH
            x = tl.load(y + base + d, mask=inside).to(tl.float32) + \
                tl.load(bias + base + d, mask=inside).to(tl.float32)
            xp = tl.load(y + base + partner, mask=rotary).to(tl.float32) + \
                tl.load(bias + base + partner, mask=rotary).to(tl.float32)
            x = x.to(y.dtype.element_ty).to(tl.float32)  # the unfused step rounds y + bias
            xp = xp.to(y.dtype.element_ty).to(tl.float32)
            r = tl.where(rotary, x * cos + sign * xp * sin, x).to(y.dtype.element_ty)
            if part == 0:
                tl.store(q_out + head * DH + d, r * SCALE, mask=inside)
            else:
                tl.store(keys + (head * S + pos) * DH + d, r, mask=inside)
        base = 2 * D + head * DH
        v = tl.load(y + base + d, mask=inside) + tl.load(bias + base + d, mask=inside)
        tl.store(values + (head * S + pos) * DH + d, v, mask=inside)

    @triton.jit
    def _attention_split_kernel(q, keys, values, position, part_out, part_max, part_sum,
                                DH, S, CHUNK, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.load(position) + 1  # keys 0..position are valid
        d = tl.arange(0, BLOCK_D)
        inside = d < DH
        qv = tl.load(q + head * DH + d, mask=inside, other=0.0).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, length)
        for block in range(start, stop, BLOCK_N):  # an empty chunk reads nothing
            n = block + tl.arange(0, BLOCK_N)
            valid = n < stop
            offs = (head * S + n[:, None]) * DH + d[None, :]
            mask = valid[:, None] & inside[None, :]
            k = tl.load(keys + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            scores = tl.where(valid, tl.sum(k * qv[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            correction = tl.exp(m - m_new)
            v = tl.load(values + offs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
            total = total * correction + tl.sum(p, axis=0)
            m = m_new
        slot = head * SPLITS + split
        tl.store(part_out + slot * BLOCK_D + d, acc)
        tl.store(part_max + slot, m)
        tl.store(part_sum + slot, total)

    @triton.jit
    def _attention_reduce_kernel(part_out, part_max, part_sum, out, DH,
                                 SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        head = tl.program_id(0)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, BLOCK_D)
        m = tl.load(part_max + head * SPLITS + s)
        best = tl.max(m, axis=0)  # split 0 always holds key 0, so best is finite
        weight = tl.where(m > float("-inf"), tl.exp(m - best), 0.0)
        total = tl.sum(tl.load(part_sum + head * SPLITS + s) * weight, axis=0)
        acc = tl.load(part_out + (head * SPLITS + s[:, None]) * BLOCK_D + d[None, :])
        result = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out + head * DH + d, result.to(out.dtype.element_ty), mask=d < DH)

    @triton.jit
    def _bias_gelu_kernel(y, bias, out, start, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        x = (tl.load(y + start + i, mask=inside) + tl.load(bias + start + i, mask=inside))
        x = x.to(tl.float32)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi)
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        tl.store(out + i, (0.5 * x * (1.0 + tanh)).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_layernorm_kernel(x, z, bias, weight, ln_bias, x_out, h_out, n, eps,
                              BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        inside = i < n
        zb = (tl.load(z + i, mask=inside, other=0.0) + tl.load(bias + i, mask=inside, other=0.0))
        r = tl.load(x + i, mask=inside, other=0.0) + zb  # rounded as the unfused adds round
        tl.store(x_out + i, r, mask=inside)
        r = r.to(tl.float32)
        mean = tl.sum(r, axis=0) / n
        diff = tl.where(inside, r - mean, 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / n + eps)
        w = tl.load(weight + i, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(ln_bias + i, mask=inside, other=0.0).to(tl.float32)
        tl.store(h_out + i, (diff * inv * w + b).to(h_out.dtype.element_ty), mask=inside)


class TritonOps:
    """One Triton kernel per op (two for attention: split-K partials, then their reduction).
    Scratch buffers are allocated once per shape, so a captured graph reuses them."""

    name = "triton"

    def __init__(self, device: torch.device):
        reason = triton_available(device)
        if reason is not None:
            raise RuntimeError(reason)
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _buffers(self, heads: int, block_d: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (heads, block_d, device)
        if key not in self._scratch:
            self._scratch[key] = (
                torch.empty((heads, ATTENTION_SPLITS, block_d), dtype=torch.float32, device=device),
                torch.empty((heads, ATTENTION_SPLITS), dtype=torch.float32, device=device),
                torch.empty((heads, ATTENTION_SPLITS), dtype=torch.float32, device=device))
        return self._scratch[key]

    def qkv_rotary_cache(self, y: torch.Tensor, bias: torch.Tensor, cos_table: torch.Tensor,
                         sin_table: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, rotary_dim: int) -> torch.Tensor:
        """As TorchOps.qkv_rotary_cache, one program per head."""
        h, s, dh = keys.shape
        q = torch.empty((h, dh), dtype=y.dtype, device=y.device)
        _qkv_rotary_cache_kernel[(h,)](y, bias, cos_table, sin_table, position, keys, values, q,
                                       h * dh, dh, s, ROTARY=rotary_dim,
                                       BLOCK_D=triton.next_power_of_2(dh), SCALE=dh ** -0.5)
        return q

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         position: torch.Tensor, out: torch.Tensor) -> None:
        """As TorchOps.decode_attention: (heads, splits) programs, then one reduction per head."""
        h, s, dh = keys.shape
        block_d = triton.next_power_of_2(dh)
        part_out, part_max, part_sum = self._buffers(h, block_d, q.device)
        chunk = math.ceil(s / ATTENTION_SPLITS)
        _attention_split_kernel[(h, ATTENTION_SPLITS)](
            q, keys, values, position, part_out, part_max, part_sum, dh, s, chunk,
            SPLITS=ATTENTION_SPLITS, BLOCK_N=ATTENTION_BLOCK, BLOCK_D=block_d)
        _attention_reduce_kernel[(h,)](part_out, part_max, part_sum, out, dh,
                                       SPLITS=ATTENTION_SPLITS, BLOCK_D=block_d)

    def bias_gelu(self, y: torch.Tensor, bias: torch.Tensor, start: int,
                  out: torch.Tensor) -> None:
        """As TorchOps.bias_gelu, in blocks of 1024."""
        n = out.shape[-1]
        block = 1024
        _bias_gelu_kernel[(triton.cdiv(n, block),)](y, bias, out, start, n, BLOCK=block)

    def add_layernorm(self, x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
                      weight: torch.Tensor, ln_bias: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """As TorchOps.add_layernorm, one program over the row."""
        n = x.shape[-1]
        x_out, h_out = torch.empty_like(x), torch.empty_like(x)
        _add_layernorm_kernel[(1,)](x, z, bias, weight, ln_bias, x_out, h_out, n, eps,
                                    BLOCK=triton.next_power_of_2(n))
        return x_out, h_out
