"""The backend interface: one model runtime holding one sequence's KV cache.

The decoder-step half of it is `StepModel` (model/generation.py), the one definition the shared
generation loop uses; a backend adds the vision encoder, KV prefix snapshots and `close()`.
Positions are absolute and chosen by the caller, so a cached image prefix can be reused and a
choice can be scored by rewinding, on every backend alike.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from ..model.config import LlavaPhiConfig
from ..model.generation import StepModel


class BackendError(RuntimeError):
    """A backend that cannot be created or run (missing runtime, wrong device, ...)."""


class KVSnapshot:
    """A copy of a backend's KV cache at positions 0..n-1 (opaque to everything but its
    backend); `nbytes` is what it holds in device memory."""

    def __init__(self, n_positions: int, nbytes: int, data: Any):
        self.n_positions = n_positions
        self.nbytes = nbytes
        self.data = data


class Backend(StepModel):
    """encode_image + the StepModel steps + prefix snapshots + close(); the loop is shared."""

    config: LlavaPhiConfig
    max_context: int
    model_id: str

    @abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        """(C, S, S) or (1, C, S, S) float32 preprocessed pixels -> image features (N, D)."""

    @abstractmethod
    def snapshot(self, n_positions: int) -> KVSnapshot:
        """Copy the KV cache's positions 0..n_positions-1 (to restore them later)."""

    @abstractmethod
    def restore(self, snapshot: KVSnapshot, n_positions: int) -> None:
        """Put a snapshot's first n_positions back at positions 0..n_positions-1."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What diagnostics show about the runtime: at least backend, precision and device."""

    @abstractmethod
    def close(self) -> None:
        """Release the weights, the KV cache and the device memory they held; the backend is
        unusable afterwards. Idempotent."""

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op for CPU backends
        """Wait for queued device work, so wall-clock timings are honest (no-op on CPU)."""
