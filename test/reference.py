"""Test helpers around the independent transformers reference.

`Reference` (transformers' CLIPVisionModel + PhiForCausalLM holding a LlavaPhiForCausalLM's
weights, run the LLaVA way) lives in llava_phi_ros.model.transformers_reference, which the bench
shares; the tests keep importing it from here.
"""

from __future__ import annotations

import torch

from llava_phi_ros.model.config import LlavaPhiConfig, tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.transformers_reference import Reference

__all__ = ["Reference", "random_tiny_model"]


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
