"""What a model is, without its weights: config, tokenizer, preprocessing and where weights live.

Every backend starts from a `ModelMetadata`: the torch backend loads the PyTorch weights it
points to (or builds them, for the embedded random model and benchmarks); a backend with weights
of its own (an ONNX export, TensorRT engines) needs no PyTorch checkpoint at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .builtin import BUILTIN_RANDOM_TINY, BUILTIN_TINY, BUILTIN_TINY_DIR, random_tiny_config
from .config import LlavaPhiConfig
from .preprocess import ImagePreprocessConfig
from .tokenizer import Tokenizer, build_byte_tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .llava_phi import LlavaPhiForCausalLM


class ModelLoadError(ValueError):
    """A model that cannot be loaded: bad path, files, layout or backend."""


@dataclass(frozen=True)
class ModelMetadata:
    """A model's description and the files (or builder) its weights come from."""

    name: str  # shown in model ids: "<name>/<backend>/<precision>"
    config: LlavaPhiConfig
    tokenizer: Tokenizer
    preprocess: ImagePreprocessConfig
    weights_dir: Path | None = None  # a checkpoint directory (any supported layout)
    build_weights: Callable[[], LlavaPhiForCausalLM] | None = None  # fp32 CPU model, in memory
    is_builtin_toy: bool = False


def random_tiny_metadata() -> ModelMetadata:
    """`builtin:random-tiny`: its weights are built (seeded) when a backend asks for them."""
    from .builtin import build_random_tiny

    cfg = random_tiny_config()
    return ModelMetadata(f"{BUILTIN_RANDOM_TINY} (random, untrained)", cfg,
                         build_byte_tokenizer(), ImagePreprocessConfig.for_image_size(
                             cfg.vision.image_size),
                         build_weights=lambda: build_random_tiny()[0], is_builtin_toy=True)


def metadata_for_model(model: LlavaPhiForCausalLM, tokenizer: Tokenizer,
                       preprocess: ImagePreprocessConfig, name: str) -> ModelMetadata:
    """Metadata whose weights are an in-memory model (tests, benchmarks, training)."""
    return ModelMetadata(name, model.config, tokenizer, preprocess, build_weights=lambda: model)


def load_metadata(model_path: str) -> ModelMetadata:
    """`builtin:tiny`, `builtin:random-tiny` or a checkpoint directory (either layout); reads
    config.json, the tokenizer and preprocessor_config.json, never the weights."""
    from .checkpoint import read_config, read_preprocess_config

    if model_path == BUILTIN_RANDOM_TINY or (model_path == BUILTIN_TINY
                                              and BUILTIN_TINY_DIR is None):
        return random_tiny_metadata()
    if not model_path:
        raise ModelLoadError("model path is empty")
    path = Path(BUILTIN_TINY_DIR if model_path == BUILTIN_TINY else model_path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {model_path!r} does not exist")
    config = read_config(path)
    name = (f"{BUILTIN_TINY} (trained on synthetic scenes)" if model_path == BUILTIN_TINY
            else path.resolve().name)
    return ModelMetadata(name, config, load_tokenizer(path), read_preprocess_config(path, config),
                         weights_dir=path, is_builtin_toy=model_path == BUILTIN_TINY)
