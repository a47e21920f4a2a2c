"""Size presets for `llava-phi train --init NAME`: small models of the LLaVA-Phi family.

Same architecture as the real model (CLIP-style ViT read at layer -2 without CLS, mlp2x_gelu
projector, Phi decoder with partial rotary and an lm_head bias), only smaller. The vocabulary
comes from the tokenizer trained on the data, rounded up so at least one row stays unused (it
holds the transformers-layout image token id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model.config import LlavaPhiConfig, TextConfig, VisionConfig
from ..model.llava_phi import LlavaPhiForCausalLM

VOCAB_MULTIPLE = 64
INIT_STD = 0.02  # GPT-2 / Phi initialisation


class PresetError(ValueError):
    """An unknown preset name or an unusable vocabulary size."""


@dataclass(frozen=True)
class Preset:
    """A model size: vision tower, decoder, and what they are for."""

    name: str
    vision: VisionConfig
    text: TextConfig  # vocab_size is a placeholder, replaced by config_for()
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, image_size=112, patch_size=14,
                            projection_dim=128),
        text=TextConfig(vocab_size=VOCAB_MULTIPLE, hidden_size=128, intermediate_size=512,
                        num_hidden_layers=4, num_attention_heads=4, partial_rotary_factor=0.4,
                        max_position_embeddings=512),
        description="the shipped toy model: ViT 128x4 at 112 px (64 image tokens), Phi 128x4 "
                    "(head dim 32, 12 rotary dims)",
    ),
    "micro": Preset(
        name="micro",
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=56, patch_size=14,
                            projection_dim=16),
        text=TextConfig(vocab_size=VOCAB_MULTIPLE, hidden_size=40, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.4,
                        max_position_embeddings=256),
        description="for tests: ViT 32x3 at 56 px (16 image tokens), Phi 40x2 (4 rotary dims)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a PresetError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def model_vocab_size(tokenizer_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows for a tokenizer: the next multiple above it (one row at least is spare)."""
    if tokenizer_size < 1:
        raise PresetError(f"tokenizer size must be positive, got {tokenizer_size}")
    return (tokenizer_size // multiple + 1) * multiple


def config_for(preset: str | Preset, tokenizer_size: int) -> LlavaPhiConfig:
    """The full model config of a preset for a tokenizer of `tokenizer_size` tokens."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    vocab = model_vocab_size(tokenizer_size)
    text = TextConfig(**{**p.text.__dict__, "vocab_size": vocab})
    return LlavaPhiConfig(vision=p.vision, text=text, projector_type="mlp2x_gelu",
                          vision_select_layer=-2, vision_select_feature="patch",
                          image_aspect_ratio="pad", image_token_id=tokenizer_size).validate()


def init_weights(model: LlavaPhiForCausalLM, tokenizer_size: int) -> None:
    """GPT-2-style initialisation for training from scratch (deterministic under the torch seed).

    Linear and embedding weights N(0, 0.02), biases 0, LayerNorms 1/0; the projections that
    write into a residual stream (attention output, MLP fc2) scaled by 1/sqrt(2 * layers);
    lm_head bias -1e4 on the rows past the tokenizer's vocabulary, so they are never chosen.
    """
    cfg = model.config
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(model.model.vision_tower.vision_model.embeddings.class_embedding,
                        0.0, INIT_STD)
        for layer in model.model.layers:
            scale = 1.0 / math.sqrt(2 * cfg.text.num_hidden_layers)
            layer.self_attn.dense.weight.mul_(scale)
            layer.mlp.fc2.weight.mul_(scale)
        for layer in model.model.vision_tower.vision_model.encoder.layers:
            scale = 1.0 / math.sqrt(2 * cfg.vision.num_hidden_layers)
            layer.self_attn.out_proj.weight.mul_(scale)
            layer.mlp.fc2.weight.mul_(scale)
        model.lm_head.bias[tokenizer_size:] = -1e4


def build_model(preset: str | Preset, tokenizer_size: int, seed: int = 0) -> LlavaPhiForCausalLM:
    """A freshly initialised fp32 model of the preset's size; identical for the same seed."""
    cfg = config_for(preset, tokenizer_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaPhiForCausalLM(cfg)
        init_weights(model, tokenizer_size)
    return model


def parameter_counts(model: LlavaPhiForCausalLM) -> dict[str, int]:
    """Parameters per part: vision, projector, text (embeddings and lm_head apart), total."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    m = model.model
    embeddings = count(m.embed_tokens) + count(model.lm_head)
    text = sum(count(x) for x in (m.layers, m.final_layernorm))
    counts = {
        "vision": count(m.vision_tower),
        "projector": count(m.mm_projector),
        "text": text,
        "embeddings_and_lm_head": embeddings,
    }
    counts["total"] = sum(counts.values())
    counts["total_without_embeddings"] = counts["total"] - embeddings
    return counts
