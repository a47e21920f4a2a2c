"""The fused decode step: two GEMVs per layer over weights fused at load, plus four small kernels.

Phi's block is parallel (attention and MLP both read ln(x)), so per layer:

    y  = ln(x) @ W_in^T             W_in  = [q; k; v; fc1]   (3D + I, D)  one GEMV
    q  = rotary(y_q), and k, v written into the cache at the position   (qkv_rotary_cache)
    a  = attention over cache entries 0..position only                   (decode_attention)
    g  = gelu_new(y_fc1 + b_fc1)                                          (bias_gelu)
    z  = [a | g] @ W_out^T          W_out = [dense | fc2]    (D, D + I)   one GEMV
    x' = x + z + (b_dense + b_fc2); ln'(x')                               (add_layernorm)

The fused weights are the model's own storage: the unfused modules' parameters become views of
them, so fusing costs no memory and prefill (the unfused step) keeps working on the same weights.
Nothing reads a tensor on the host: the token and the position are device tensors, so the whole
step can be captured in one CUDA graph (see backends/torch_backend.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_ops import TorchOps, TritonOps
from .llava_phi import LlavaPhiForCausalLM
from .phi import KVCache

Ops = TorchOps | TritonOps


def _share(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Make module's weight (and bias) views of the fused storage, with the same values."""
    module.weight.data = weight
    if bias is not None:
        module.bias.data = bias


@torch.no_grad()
def fuse_layer_weights(model: LlavaPhiForCausalLM) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (W_in, b_in, W_out, b_out): the fused weights, which the layer's q/k/v/fc1 and
    dense/fc2 parameters then view (idempotent: already fused weights are fused again as is)."""
    fused = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        inputs = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1)
        w_in = torch.cat([m.weight for m in inputs])  # (3D + I, D)
        b_in = torch.cat([m.bias for m in inputs])  # (3D + I,)
        w_out = torch.cat([attn.dense.weight, mlp.fc2.weight], dim=1)  # (D, D + I)
        b_out = attn.dense.bias + mlp.fc2.bias  # (D,): summed once, the two are always added
        start = 0
        for m in inputs:
            rows = m.weight.shape[0]
            _share(m, w_in[start:start + rows], b_in[start:start + rows])
            start += rows
        d = attn.dense.weight.shape[1]
        _share(attn.dense, w_out[:, :d])
        _share(mlp.fc2, w_out[:, d:])
        fused.append((w_in, b_in, w_out, b_out))
    return fused


class FusedDecoder:
    """The decode step of `model` (batch 1) on the fused weights, through `ops`."""

    def __init__(self, model: LlavaPhiForCausalLM, cache: KVCache, ops: Ops):
        cfg = model.config.text
        self.model = model
        self.cache = cache
        self.ops = ops
        self.layers = fuse_layer_weights(model)
        self.rotary_dim = cfg.rotary_dim
        self.d = cfg.hidden_size
        self.eps = cfg.layer_norm_eps
        layers = model.model.layers
        # LayerNorm after each layer: the next layer's input norm, the final norm after the last
        self.norms = [layers[i + 1].input_layernorm for i in range(len(layers) - 1)]
        self.norms.append(model.model.final_layernorm)
        # [attention | gelu(fc1)], the second GEMV's input, written in place by the kernels
        self.joined = torch.empty((1, cfg.hidden_size + cfg.intermediate_size),
                                  dtype=model.dtype, device=model.device)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (1, 1) and position (1,) long device tensors -> fp32 logits (V,)."""
        m = self.model.model
        cos, sin = m.rotary.cos, m.rotary.sin  # (S_max, R) fp32
        x = m.embed_tokens(token[0])  # (1, D)
        h = m.layers[0].input_layernorm(x)
        attended, activated = self.joined[:, :self.d], self.joined[:, self.d:]
        for i, (w_in, b_in, w_out, b_out) in enumerate(self.layers):
            keys, values = self.cache.keys[i, 0], self.cache.values[i, 0]  # (H, S, Dh)
            y = torch.mm(h, w_in.t())  # (1, 3D + I)
            q = self.ops.qkv_rotary_cache(y, b_in, cos, sin, position, keys, values,
                                          self.rotary_dim)  # (H, Dh)
            self.ops.decode_attention(q, keys, values, position, attended)
            self.ops.bias_gelu(y, b_in, 3 * self.d, activated)
            z = torch.mm(self.joined, w_out.t())  # (1, D)
            norm = self.norms[i]
            x, h = self.ops.add_layernorm(x, z, b_out, norm.weight, norm.bias, self.eps)
        return self.model.lm_head(h)[0].float()  # (V,)
