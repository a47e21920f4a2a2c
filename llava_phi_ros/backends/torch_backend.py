"""The reference backend: the PyTorch model on CPU or CUDA, one static-shape decoder step."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np
import torch

from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.metadata import ModelMetadata
from . import DTYPE_NAMES
from .base import Backend, BackendError, KVSnapshot

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert set(DTYPES) == set(DTYPE_NAMES) - {"auto"}, "backends.DTYPE_NAMES is the one list"
# The decode step attends over the cache in blocks of this many positions (see attention_window).
DECODE_WINDOW_BLOCK = 256


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


def create(metadata: ModelMetadata, device: str = "cpu", dtype: str | None = None,
           max_context: int | None = None) -> TorchBackend:
    """The registry's factory: the metadata's weights on `device` in `dtype`."""
    from ..model.checkpoint import load_model

    torch_device = check_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device.type)
    if metadata.build_weights is not None:
        model = metadata.build_weights().to(torch_device, torch_dtype)
    elif metadata.weights_dir is not None:
        model = load_model(metadata.weights_dir, device=torch_device, dtype=torch_dtype)
    else:
        raise BackendError(f"{metadata.name}: no PyTorch weights to load")
    precision = str(torch_dtype).removeprefix("torch.")
    return TorchBackend(model, max_context, f"{metadata.name}/torch/{precision}")


class TorchBackend(Backend):
    """LlavaPhiForCausalLM with one preallocated KV cache and preallocated step inputs."""

    def __init__(self, model: LlavaPhiForCausalLM, max_context: int | None = None,
                 model_id: str = "torch", window_block: int | None = DECODE_WINDOW_BLOCK):
        self.model: LlavaPhiForCausalLM | None = model.eval()
        self.config = model.config
        self.max_context = max_context or self.config.text.max_position_embeddings
        self.cache = model.new_cache(self.max_context)
        self.model_id = model_id
        self.window_block = window_block
        device = model.device
        self._described = {"backend": "torch", "precision": str(model.dtype).removeprefix("torch."),
                           "device": str(device)}
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)  # decode_step's input
        self._position = torch.zeros(1, dtype=torch.long, device=device)

    def describe(self) -> dict[str, str]:
        return dict(self._described)

    def _live(self) -> LlavaPhiForCausalLM:
        if self.model is None:
            raise BackendError(f"{self.model_id}: the backend was closed")
        return self.model

    @torch.inference_mode()
    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)  # (1, C, S, S)
        return self._live().encode_images(pixels)[0]  # (N, D)

    @torch.inference_mode()
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self._live().embed_ids(ids)  # (T, D)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, start_pos: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        # embeds: (T, D) -> logits (V,) or (T, V)
        logits = self._live().forward_embeds(embeds.unsqueeze(0), self.cache, start_pos,
                                             last_only=not all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        model = self._live()
        if not 0 <= pos < self.max_context:
            raise ValueError(f"position {pos} is outside the KV cache of {self.max_context}")
        self._token.fill_(token_id)  # no new tensors, no host read
        self._position.fill_(pos)
        embeds = model.model.embed_tokens(self._token)  # (1, 1, D)
        return model.step(embeds, self.cache, self._position, last_only=True,
                          kv_len=self.attention_window(pos))[0]  # (V,)

    def attention_window(self, pos: int) -> int:
        """Cache entries a decode step at pos attends over (through its mask): whole blocks of
        `window_block` positions, so the step's shapes change only at block boundaries (8
        shapes over a 2048 context: 8 graphs for a runtime that captures them) and a short
        answer does not read the whole cache. None as window_block: always the whole cache."""
        if self.window_block is None:
            return self.max_context
        return min(self.max_context, (pos // self.window_block + 1) * self.window_block)

    @torch.inference_mode()
    def snapshot(self, n_positions: int) -> KVSnapshot:
        keys = self.cache.keys[:, :, :, :n_positions].clone()  # (L, B, H, n, Dh)
        values = self.cache.values[:, :, :, :n_positions].clone()
        return KVSnapshot(n_positions, keys.nbytes + values.nbytes, (keys, values))

    @torch.inference_mode()
    def restore(self, snapshot: KVSnapshot, n_positions: int) -> None:
        keys, values = snapshot.data
        n = min(n_positions, snapshot.n_positions)
        self.cache.keys[:, :, :, :n].copy_(keys[:, :, :, :n])
        self.cache.values[:, :, :, :n].copy_(values[:, :, :, :n])

    def close(self) -> None:
        if self.model is None:
            return
        device = self.model.device
        self.model = None
        self.cache = None  # type: ignore[assignment]
        self._token = self._position = None  # type: ignore[assignment]
        gc.collect()  # drop reference cycles that may still hold parameters
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # give the caching allocator's blocks back to the driver

    def synchronize(self) -> None:
        if self.model is not None and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
