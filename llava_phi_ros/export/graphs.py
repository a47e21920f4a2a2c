"""The modules that become the exported ONNX graphs: vision (pixels -> image embeddings) and one
decoder step for prefill (S >= 1) and decode (S = 1).

The decoder graph is shaped for TensorRT 10.3, which has no KV-cache layer and lets no output
alias an input: the past keys/values of every layer come in read-only at a FIXED max_context
length, and only the NEW keys/values `[1, H, S, Dh]` go out (the runtime writes them into its
cache at their positions). The cache is never concatenated: q.k is taken against the past keys
and against the new keys separately, only the scores `[1, H, S, C + S]` are joined, softmax is
fp32, and P_past.V_past + P_new.V_new gives the output. Which past entries a query sees (and the
causal order of the new ones) comes in as an additive `attention_bias [1, 1, S, C + S]`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.phi import PhiDecoderLayer

PARAMETER_PREFIX = "model."  # the wrappers hold the model as .model: its keys' prefix in graphs
MASKED = -1e30  # the attention bias of an entry a query must not see (finite: no inf - inf)


def past_names(num_layers: int) -> list[str]:
    """Graph input names of the cache, in order: past_key_0, past_value_0, past_key_1, ..."""
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def new_names(num_layers: int) -> list[str]:
    """Graph output names of the new entries: new_key_0, new_value_0, ..."""
    return [f"new_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


class VisionGraph(nn.Module):
    """(1, 3, S, S) preprocessed pixels -> (1, N, D_text) image embeddings."""

    def __init__(self, model: LlavaPhiForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class DecoderGraph(nn.Module):
    """One decoder step on input embeddings against a read-only, fixed-length cache."""

    def __init__(self, model: LlavaPhiForCausalLM):
        super().__init__()
        self.model = model
        rotary = model.model.rotary
        self.register_buffer("cos", rotary.cos.clone(), persistent=False)  # (P, rot) fp32
        self.register_buffer("sin", rotary.sin.clone(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_bias: torch.Tensor, logit_positions: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # inputs_embeds (1, S, D); position_ids (1, S) int64; attention_bias (1, 1, S, C + S)
        # fp32; logit_positions (K,) int64 rows of S whose logits are wanted; past: 2L x
        # (1, H, C, Dh). Returns fp32 logits (1, K, V), then new keys/values 2L x (1, H, S, Dh).
        cos = self.cos[position_ids[0]]  # (S, rot)
        sin = self.sin[position_ids[0]]
        x = inputs_embeds
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.model.layers):
            x, k, v = self._layer(layer, x, cos, sin, attention_bias, past[2 * i], past[2 * i + 1])
            new += [k, v]
        x = torch.index_select(x, 1, logit_positions)  # (1, K, D)
        logits = self.model.lm_head(self.model.model.final_layernorm(x)).float()
        return (logits, *new)

    def _layer(self, layer: PhiDecoderLayer, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        b, s, d = x.shape
        h = layer.input_layernorm(x)
        shape = (b, s, attn.num_heads, attn.head_dim)
        rotate = self.model.model.rotary  # the model's own rotation, on gathered tables
        q = rotate(attn.q_proj(h).view(shape).transpose(1, 2), cos, sin)  # (1, H, S, Dh)
        k = rotate(attn.k_proj(h).view(shape).transpose(1, 2), cos, sin)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q = q * attn.head_dim ** -0.5  # before q.k: raw Phi-2 q.k overflows fp16
        context = past_k.shape[2]
        scores = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)),  # (1, H, S, C)
                            torch.matmul(q, k.transpose(-1, -2))], dim=-1)  # + (1, H, S, S)
        probs = torch.softmax(scores.float() + bias, dim=-1).to(v.dtype)  # (1, H, S, C + S)
        out = (torch.matmul(probs[..., :context], past_v)
               + torch.matmul(probs[..., context:], v))  # (1, H, S, Dh)
        out = attn.dense(out.transpose(1, 2).reshape(b, s, d))
        return x + out + layer.mlp(h), k, v


def attention_bias(start_pos: int, length: int, context: int) -> torch.Tensor:
    """(1, 1, S, C + S) fp32: queries at start_pos.. see past entries 0..start_pos-1 (the cache
    holds them) and the new entries up to their own; MASKED elsewhere."""
    bias = torch.full((length, context + length), MASKED)
    bias[:, :start_pos] = 0.0
    bias[:, context:] = torch.triu(torch.full((length, length), MASKED), diagonal=1)
    return bias[None, None]
