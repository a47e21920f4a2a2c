"""CLIP ViT vision tower, with the parameter names of transformers' CLIPVisionModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def vision_activation(name: str):
    """The activation function named by a CLIP config."""
    return quick_gelu if name == "quick_gelu" else F.gelu


class CLIPEmbeddings(nn.Module):
    """Patchify + class token + learned position embeddings."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size,
                                         kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, C, S, S)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + P, D)
        return x + self.position_embedding.weight.unsqueeze(0)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        shape = (b, t, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        # Softmax in fp32 whatever the weights' dtype (fp16 attention overflowed in the reference).
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = vision_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        # Unused by LLaVA (it reads an inner layer) but part of every CLIP checkpoint.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_state(self, pixel_values: torch.Tensor, index: int) -> torch.Tensor:
        """transformers' `hidden_states[index]` (0 = embeddings), running only the blocks needed."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + P, D)
        for layer in self.encoder.layers[:index]:
            x = layer(x)
        return x


class CLIPVisionTower(nn.Module):
    """LLaVA's vision tower: features of one inner layer of a CLIP ViT."""

    def __init__(self, cfg: VisionConfig, hidden_state_index: int, keep_cls: bool):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)
        self.hidden_state_index = hidden_state_index
        self.keep_cls = keep_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, C, S, S) -> (B, N, D_vision), N = P patches (+1 with CLS)
        features = self.vision_model.hidden_state(pixel_values, self.hidden_state_index)
        return features if self.keep_cls else features[:, 1:]
