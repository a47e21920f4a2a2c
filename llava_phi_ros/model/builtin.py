"""`builtin:tiny`: the embedded toy model.

Until a model trained here ships (issue "Staged training"), it is a tiny LLaVA-Phi with random
weights built on the fly: it exercises every code path, and its answers are meaningless.
"""

from __future__ import annotations

import torch

from .config import LlavaPhiConfig, tiny_config
from .llava_phi import LlavaPhiForCausalLM
from .preprocess import ImagePreprocessConfig
from .tokenizer import Tokenizer, build_byte_tokenizer

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_WARNING = ("builtin:tiny is a tiny LLaVA-Phi with RANDOM weights: its answers are "
                        "meaningless; pass --model DIR for a real checkpoint")


def builtin_tiny_config() -> LlavaPhiConfig:
    """Byte-tokenizer vocabulary (257 ids) rounded up to 320, 56 px images (16 image tokens)."""
    return tiny_config(vocab_size=320, image_size=56).with_text(max_position_embeddings=1024)


def build_builtin_tiny(seed: int = 0) -> tuple[LlavaPhiForCausalLM, Tokenizer,
                                               ImagePreprocessConfig]:
    """The random toy model, its byte tokenizer and preprocessing; identical on every call."""
    cfg = builtin_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaPhiForCausalLM(cfg)
        with torch.no_grad():  # default init gives near-uniform logits; widen them a little
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
    tokenizer = build_byte_tokenizer()
    with torch.no_grad():  # ids past the tokenizer's vocabulary would decode to nothing
        model.lm_head.bias[tokenizer.vocab_size:] = -1e4
    preprocess = ImagePreprocessConfig.for_image_size(cfg.vision.image_size)
    return model.eval(), tokenizer, preprocess
