"""The backend interface: one model runtime holding one sequence's KV cache.

Positions are absolute and chosen by the caller, so a cached image prefix can be reused and a
choice can be scored by rewinding, on every backend alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..model.config import LlavaPhiConfig


class BackendError(RuntimeError):
    """A backend that cannot be created or run (missing runtime, wrong device, ...)."""


class Backend(ABC):
    """encode_image / prefill / decode_step; the generation loop itself is shared."""

    config: LlavaPhiConfig
    max_context: int
    model_id: str

    @abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        """(C, S, S) or (1, C, S, S) float32 preprocessed pixels -> image features (N, D)."""

    @abstractmethod
    def prefill(self, input_ids: Sequence[int], image_features: Any | None = None,
                start_pos: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Run ids (each IMAGE_TOKEN_INDEX = one image's N features) at start_pos..;
        fp32 logits of the last position (V,), or of every position (T', V) when all_logits."""

    @abstractmethod
    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        """Feed one token at absolute position pos; fp32 logits (V,) for the next token."""

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op for CPU backends
        """Wait for queued device work, so wall-clock timings are honest (no-op on CPU)."""
