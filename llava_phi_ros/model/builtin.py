"""The embedded models.

- `builtin:random-tiny`: a tiny LLaVA-Phi with random weights, built on the fly. Its answers are
  meaningless; it exercises the plumbing (tests, profiling) with answers of any length.
- `builtin:tiny`: the embedded default, a toy LLaVA-Phi trained here on generated scenes
  (`scripts/train_tiny.sh`; llava_phi_ros/models/tiny/ with its MODEL_CARD.md). It answers
  questions about scenes of flat coloured shapes and knows nothing about real images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import LlavaPhiConfig, tiny_config
from .llava_phi import LlavaPhiForCausalLM
from .preprocess import ImagePreprocessConfig
from .tokenizer import Tokenizer, build_byte_tokenizer

BUILTIN_TINY = "builtin:tiny"
BUILTIN_RANDOM_TINY = "builtin:random-tiny"
BUILTINS = (BUILTIN_TINY, BUILTIN_RANDOM_TINY)
# Where the trained builtin:tiny ships (None would make builtin:tiny the random model).
BUILTIN_TINY_DIR: Path | None = Path(__file__).resolve().parents[1] / "models" / "tiny"
BUILTIN_WARNINGS = {
    BUILTIN_TINY: "builtin:tiny is a toy LLaVA-Phi (1.9M parameters) trained here on generated "
                  "scenes of coloured shapes: it answers questions about such scenes and knows "
                  "nothing about real camera images; give a LLaVA-Phi checkpoint directory "
                  "(model_path, or --model) for real use",
    BUILTIN_RANDOM_TINY: "builtin:random-tiny has RANDOM weights: its answers are meaningless "
                         "(it exists to test the plumbing)",
}


def random_tiny_config() -> LlavaPhiConfig:
    """Byte-tokenizer vocabulary (257 ids) rounded up to 320, 56 px images (16 image tokens)."""
    return tiny_config(vocab_size=320, image_size=56).with_text(max_position_embeddings=1024)


def build_random_tiny(seed: int = 0) -> tuple[LlavaPhiForCausalLM, Tokenizer,
                                              ImagePreprocessConfig]:
    """The random toy model, its byte tokenizer and preprocessing; identical on every call."""
    cfg = random_tiny_config()
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
