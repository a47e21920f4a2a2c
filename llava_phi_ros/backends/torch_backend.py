"""The reference backend: the PyTorch model on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..model.llava_phi import LlavaPhiForCausalLM
from . import DTYPE_NAMES
from .base import Backend, BackendError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert set(DTYPES) == set(DTYPE_NAMES) - {"auto"}, "backends.DTYPE_NAMES is the one list"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """fp32 on CPU, fp16 on GPU unless a dtype is named."""
    if name in (None, "", "auto"):
        return torch.float32 if device == "cpu" else torch.float16
    if name not in DTYPES:
        raise BackendError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def check_device(device: str) -> torch.device:
    """A torch device that exists here, or a BackendError saying why not."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BackendError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise BackendError(f"device {device!r} requested but this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


class TorchBackend(Backend):
    """LlavaPhiForCausalLM with one preallocated KV cache."""

    def __init__(self, model: LlavaPhiForCausalLM, max_context: int | None = None,
                 model_id: str = "torch"):
        self.model = model.eval()
        self.config = model.config
        self.max_context = max_context or self.config.text.max_position_embeddings
        self.cache = model.new_cache(self.max_context)
        self.model_id = model_id

    @torch.inference_mode()
    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)  # (1, C, S, S)
        return self.model.encode_images(pixels)[0]  # (N, D)

    @torch.inference_mode()
    def prefill(self, input_ids: Sequence[int], image_features: torch.Tensor | None = None,
                start_pos: int = 0, all_logits: bool = False) -> torch.Tensor:
        embeds = self.model.embed(input_ids, image_features)  # (1, T', D)
        logits = self.model.forward_embeds(embeds, self.cache, start_pos, last_only=not all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.model.device)
        return self.model(ids, self.cache, pos, last_only=True)[0]

    def synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
