"""Image + question in, answer out: preprocessing, prompt, backend, shared generation loop.

ROS-free; the CLI and the ROS service core both sit on top of `VisionLanguageModel`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from . import parameters
from .backends import create_backend
from .backends.base import Backend, BackendError
from .model.config import LlavaPhiConfig
from .model.generation import (
    ChoiceScores,
    ContextOverflowError,
    GenerationConfig,
    embed_prompt,
    expanded_length,
    generate,
    score_choices,
)
from .model.metadata import ModelLoadError, ModelMetadata, load_metadata
from .model.preprocess import ImagePreprocessConfig, preprocess_image
from .model.prompt import (
    IMAGE_TOKEN_INDEX,
    STOP_STRING,
    build_prompt,
    check_question,
    clean_choices,
    tokenize_prompt,
)
from .model.tokenizer import Tokenizer
from .prefix_cache import PrefixCache, mib

DEFAULT_PREFIX_CACHE_MB: float = parameters.DEFAULTS["prefix_cache_mb"]


class AnsweringModel(Protocol):
    """What the service core needs from a model, whatever backend runs it."""

    description: str
    is_builtin_toy: bool

    @property
    def max_context(self) -> int: ...

    @property
    def num_image_tokens(self) -> int: ...

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = (),
                   system_prompt: str | None = None) -> list[int]: ...

    def encode_image(self, image: Image.Image | np.ndarray) -> EncodedImage: ...

    def ask(self, image: Image.Image | np.ndarray | EncodedImage, question: str,
            history: Sequence[tuple[str, str]] = (),
            generation: GenerationConfig | None = None, choices: Sequence[str] = (),
            on_text: Callable[[str, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            system_prompt: str | None = None) -> AskResult: ...

    def set_prefix_cache_mb(self, megabytes: float) -> None: ...

    def prefix_cache_stats(self) -> dict[str, float | int]: ...

    def backend_info(self) -> dict[str, str]: ...

    def close(self) -> None: ...



@dataclass
class EncodedImage:
    """An image run through preprocessing, the vision tower and the projector."""

    features: Any  # backend tensor (N, D)
    vision_ms: float


@dataclass
class AskResult:
    """One answer with everything a caller may report about it."""

    text: str
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    choice_logprobs: list[float] = field(default_factory=list)
    choice_probs: list[float] = field(default_factory=list)
    choice_index: int = -1
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_ms: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        """The `llava-phi ask --json` object."""
        out: dict[str, Any] = {
            "answer": self.text,
            "finish_reason": self.finish_reason,
            "token_ids": self.token_ids,
            "token_logprobs": self.token_logprobs,
        }
        if self.choices:
            out |= {"choices": self.choices, "choice_logprobs": self.choice_logprobs,
                    "choice_probs": self.choice_probs, "choice_index": self.choice_index}
        out |= {"prompt_tokens": self.prompt_tokens,
                "reused_prefix_tokens": self.reused_prefix_tokens, "vision_ms": self.vision_ms,
                "prefill_ms": self.prefill_ms,
                "time_to_first_token_ms": self.time_to_first_token_ms,
                "decode_tokens_per_s": self.decode_tokens_per_s, "total_ms": self.total_ms}
        return out


def _ms(start: float, end: float | None = None) -> float:
    return ((end if end is not None else time.perf_counter()) - start) * 1000.0


class VisionLanguageModel:
    """A backend plus the tokenizer and preprocessing that belong to its checkpoint."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer,
                 preprocess: ImagePreprocessConfig, description: str = "",
                 system_prompt: str | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB):
        if preprocess.image_size != backend.config.vision.image_size:
            raise ModelLoadError(f"preprocessor crop size {preprocess.image_size} != the vision "
                                 f"tower's image_size {backend.config.vision.image_size}")
        if tokenizer.vocab_size > backend.config.text.vocab_size:
            raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                                 f"vocabulary only {backend.config.text.vocab_size}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        # True: resize/pad/normalise on the backend's device (preprocess_device.py; within
        # DEVICE_TOLERANCE_LEVELS of the exact path); torch backends only
        self.device_preprocessing = False
        self.description = description or backend.model_id
        self.system_prompt = system_prompt
        self.is_builtin_toy = False
        self.prefix_cache = PrefixCache(self.num_image_tokens, mib(prefix_cache_mb))

    # ----- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_path: str, backend: str = "torch", device: str = "cpu",
             dtype: str | None = None, max_context: int | None = None,
             system_prompt: str | None = None,
             prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
             backend_options: Mapping[str, Any] | None = None) -> VisionLanguageModel:
        """`builtin:tiny`, `builtin:random-tiny` or a checkpoint directory (either layout)."""
        return cls.from_metadata(load_metadata(model_path), backend, device, dtype, max_context,
                                 system_prompt, prefix_cache_mb, backend_options)

    @classmethod
    def from_metadata(cls, metadata: ModelMetadata, backend: str = "torch",
                      device: str = "cpu", dtype: str | None = None,
                      max_context: int | None = None, system_prompt: str | None = None,
                      prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                      backend_options: Mapping[str, Any] | None = None) -> VisionLanguageModel:
        """The named backend (through the registry) on the metadata's model; backend_options:
        engine_dir, max_prefill (backends.BACKEND_OPTIONS)."""
        try:
            runtime = create_backend(backend, metadata, device, dtype, max_context,
                                     backend_options)
        except BackendError as exc:
            raise ModelLoadError(str(exc)) from exc
        vlm = cls(runtime, metadata.tokenizer, metadata.preprocess, runtime.model_id,
                  system_prompt, prefix_cache_mb)
        vlm.is_builtin_toy = metadata.is_builtin_toy
        return vlm

    @property
    def config(self) -> LlavaPhiConfig:
        return self.backend.config

    @property
    def max_context(self) -> int:
        """Positions the KV cache holds: prompt (image included) + answer."""
        return self.backend.max_context

    @property
    def num_image_tokens(self) -> int:
        """Positions one image takes in the prompt."""
        return self.backend.config.num_image_tokens

    def set_prefix_cache_mb(self, megabytes: float) -> None:
        """The memory budget for kept image prefixes (0: only the last request's)."""
        self.prefix_cache.set_budget(mib(megabytes))

    def prefix_cache_stats(self) -> dict[str, float | int]:
        """Kept prefixes: entries, MiB, budget, restores (safe from any thread)."""
        return self.prefix_cache.stats()

    def backend_info(self) -> dict[str, str]:
        """The runtime as diagnostics show it: backend, precision, device (and, per backend,
        e.g. the export's manifest hash)."""
        return self.backend.describe()

    def close(self) -> None:
        """Free the backend's weights, caches and device memory; the model is unusable after."""
        self.prefix_cache.clear()
        self.backend.close()

    # ----- inference --------------------------------------------------------------------------
    def encode_image(self, image: Image.Image | np.ndarray) -> EncodedImage:
        """Preprocess (exact CPU path) and run the vision tower + projector."""
        start = time.perf_counter()
        if self.device_preprocessing:
            from .model.preprocess_device import preprocess_on_device

            pixels = preprocess_on_device(image, self.preprocess, self.backend.describe()["device"])
        else:
            pixels = preprocess_image(image, self.preprocess)  # (3, S, S) float32
        features = self.backend.encode_image(pixels)
        self.backend.synchronize()
        return EncodedImage(features, _ms(start))

    def prompt(self, question: str, history: Sequence[tuple[str, str]] = (),
               system_prompt: str | None = None) -> str:
        """The phi-2_v0 prompt for this question; RequestError for an unusable question."""
        return build_prompt(check_question(question), history,
                            system_prompt or self.system_prompt)

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = (),
                   system_prompt: str | None = None) -> list[int]:
        """Token ids (with one IMAGE_TOKEN_INDEX) of the phi-2_v0 prompt for this question
        (system_prompt None = the model's)."""
        return tokenize_prompt(self.prompt(question, history, system_prompt), self.tokenizer,
                               num_images=1)

    def ask(self, image: Image.Image | np.ndarray | EncodedImage, question: str,
            history: Sequence[tuple[str, str]] = (),
            generation: GenerationConfig | None = None, choices: Sequence[str] = (),
            on_text: Callable[[str, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            system_prompt: str | None = None) -> AskResult:
        """Answer a question about one image (free text, or the best of `choices`);
        system_prompt None = the model's."""
        start = time.perf_counter()
        generation = (generation or GenerationConfig()).validate()
        prompt = self.prompt(question, history, system_prompt)
        ids = tokenize_prompt(prompt, self.tokenizer, num_images=1)
        choices = clean_choices(choices)
        n_image = self.num_image_tokens
        prompt_len = expanded_length(ids, n_image)
        if prompt_len >= self.max_context:
            raise ContextOverflowError(f"the prompt needs {prompt_len} positions; the context "
                                       f"has {self.max_context}")
        encoded = image if isinstance(image, EncodedImage) else self.encode_image(image)
        vision_ms = 0.0 if isinstance(image, EncodedImage) else encoded.vision_ms
        prefill_start = time.perf_counter()
        keep = self.prefix_cache.prepare(self.backend, ids, encoded)
        rest = ids[keep:]
        features = encoded.features if IMAGE_TOKEN_INDEX in rest else None
        reused = expanded_length(ids[:keep], n_image)
        logits = self.backend.prefill(embed_prompt(self.backend, rest, features), reused)
        self.backend.synchronize()
        prefill_ms = _ms(prefill_start)
        result = AskResult(text="", finish_reason="stop", prompt_tokens=prompt_len,
                           reused_prefix_tokens=reused, vision_ms=vision_ms,
                           prefill_ms=prefill_ms)
        in_cache = list(ids)  # what the KV cache holds when this call ends
        if choices:
            scores = self._score(prompt, ids, choices, should_cancel)
            del in_cache[scores.intact_prompt_ids:]  # scoring may rewind into the prompt
            result.choices = list(choices)
            if scores.cancelled:
                result.finish_reason = "cancelled"
            else:
                result.text = choices[scores.index]
                result.choice_logprobs, result.choice_probs = scores.logprobs, scores.probs
                result.choice_index = scores.index
                result.time_to_first_token_ms = _ms(start)
        else:
            gen = generate(self.backend, logits, prompt_len, self.tokenizer.eos_token_id,
                           self.tokenizer.decode, generation, on_text, should_cancel)
            result.text = gen.text.strip()
            result.finish_reason = gen.finish_reason
            result.token_ids, result.token_logprobs = gen.token_ids, gen.token_logprobs
            if gen.first_token_time is not None:
                result.time_to_first_token_ms = _ms(start, gen.first_token_time)
            result.decode_tokens_per_s = gen.decode_tokens_per_s
            in_cache += gen.token_ids[:gen.decode_steps]  # the answer's ids fed back so far
        self.prefix_cache.finished(in_cache, encoded)
        result.total_ms = _ms(start)
        return result

    def _score(self, prompt: str, prompt_ids: list[int], choices: list[str],
               should_cancel: Callable[[], bool] | None) -> ChoiceScores:
        """Each choice as the assistant's whole answer: ' ' + choice + stop token after the
        prompt, tokenised together with it (as training text renders an answer)."""
        full = [tokenize_prompt(f"{prompt} {choice}{STOP_STRING}", self.tokenizer, num_images=1)
                for choice in choices]
        return score_choices(self.backend, prompt_ids, full, self.num_image_tokens,
                             should_cancel)

