"""The reference backend: the PyTorch model on CPU or CUDA, one static-shape decoder step."""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.metadata import ModelMetadata
from . import DECODE_PATHS, DTYPE_NAMES
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


def resolve_decode_path(name: str | None, device: torch.device) -> str:
    """The decode path `name` stands for on `device`; BackendError when it cannot run there."""
    from ..model.fused_ops import triton_available

    name = name or "auto"
    if name not in DECODE_PATHS:
        raise BackendError(f"unknown decode_path {name!r} (choose from {', '.join(DECODE_PATHS)})")
    if name == "auto":
        if device.type != "cuda":
            return "eager"
        return "fused" if triton_available(device) is None else "graph"
    if name == "graph" and device.type != "cuda":
        raise BackendError(f"decode_path 'graph' captures CUDA graphs: it needs a CUDA device, "
                           f"not {device}")
    reason = triton_available(device) if name == "fused" and device.type == "cuda" else None
    if reason is not None:
        raise BackendError(f"decode_path 'fused' on {device}: {reason}")
    return name


def create(metadata: ModelMetadata, device: str = "cpu", dtype: str | None = None,
           max_context: int | None = None, decode_path: str | None = None) -> TorchBackend:
    """The registry's factory: the metadata's weights on `device` in `dtype`."""
    from ..model.checkpoint import load_model

    torch_device = check_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device.type)
    path = resolve_decode_path(decode_path, torch_device)  # refused before any weight loads
    if metadata.build_weights is not None:
        model = metadata.build_weights().to(torch_device, torch_dtype)
    elif metadata.weights_dir is not None:
        model = load_model(metadata.weights_dir, device=torch_device, dtype=torch_dtype)
    else:
        raise BackendError(f"{metadata.name}: no PyTorch weights to load")
    precision = str(torch_dtype).removeprefix("torch.")
    return TorchBackend(model, max_context, f"{metadata.name}/torch/{precision}",
                        decode_path=path)


class CapturedSteps:
    """CUDA graphs of one step function, one per key (an attention window, or a single key),
    captured on first use and replayed after: the inputs are the static tensors `run` reads,
    written before each call. All graphs share one memory pool (they never run at once)."""

    def __init__(self, run: Callable[[Hashable], torch.Tensor], device: torch.device,
                 warmup: int = 2):
        self._run = run
        self._device = device
        self._warmup = warmup
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable) -> torch.Tensor:
        """Replay key's graph (capturing it first); its static output, valid until the next
        call."""
        if key not in self._graphs:
            stream = torch.cuda.Stream(self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):  # warm-up outside capture: lazy init, autotuning
                for _ in range(self._warmup):  # the same inputs as the replay: idempotent
                    self._run(key)
            torch.cuda.current_stream(self._device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._run(key)
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out


class TorchBackend(Backend):
    """LlavaPhiForCausalLM with one preallocated KV cache and preallocated step inputs."""

    def __init__(self, model: LlavaPhiForCausalLM, max_context: int | None = None,
                 model_id: str = "torch", window_block: int | None = DECODE_WINDOW_BLOCK,
                 decode_path: str = "eager"):
        self.model: LlavaPhiForCausalLM | None = model.eval()
        self.config = model.config
        self.max_context = max_context or self.config.text.max_position_embeddings
        self.cache = model.new_cache(self.max_context)
        self.model_id = model_id
        self.window_block = window_block
        device = model.device
        self.decode_path = resolve_decode_path(decode_path, device)
        self._described = {"backend": "torch", "precision": str(model.dtype).removeprefix("torch."),
                           "device": str(device), "decode_path": self.decode_path}
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)  # decode_step's input
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._fused = None
        if self.decode_path == "fused":
            from ..model.fused_ops import TorchOps, TritonOps
            from ..model.fused_step import FusedDecoder

            ops = TritonOps(device) if device.type == "cuda" else TorchOps()
            self._fused = FusedDecoder(model, self.cache, ops)
        self._graphs = self._vision_graph = None
        if device.type == "cuda" and self.decode_path in ("graph", "fused"):
            self._graphs = CapturedSteps(self._eager_step, device)
            # the vision tower + projector too: one graph on a static pixel buffer
            size = self.config.vision.image_size
            self._pixels = torch.zeros((1, 3, size, size), dtype=torch.float32, device=device)
            self._vision_graph = CapturedSteps(lambda _: model.encode_images(self._pixels)[0],
                                               device)

    def describe(self) -> dict[str, str]:
        return dict(self._described)

    def _live(self) -> LlavaPhiForCausalLM:
        if self.model is None:
            raise BackendError(f"{self.model_id}: the backend was closed")
        return self.model

    @torch.inference_mode()
    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        if isinstance(pixel_values, torch.Tensor):  # preprocessed on the device already
            pixels = pixel_values.float()
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)  # (1, C, S, S)
        if self._vision_graph is not None and pixels.shape == self._pixels.shape:
            self._pixels.copy_(pixels)  # host to device, into the graph's input
            return self._vision_graph(None).clone()  # (N, D): kept by the feature cache
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
        if not 0 <= pos < self.max_context:
            raise ValueError(f"position {pos} is outside the KV cache of {self.max_context}")
        self._live()
        self._token.fill_(token_id)  # no new tensors, no host read
        self._position.fill_(pos)
        window = None if self._fused is not None else self.attention_window(pos)
        if self._graphs is not None:
            return self._graphs(window).clone()  # the graph's output is overwritten next step
        return self._eager_step(window)

    def _eager_step(self, window: int | None) -> torch.Tensor:
        """The step on the static token/position inputs: fp32 logits (V,). The fused step reads
        only the valid cache (its length from the position tensor), so it takes no window."""
        if self._fused is not None:
            return self._fused.step(self._token, self._position)
        model = self._live()
        embeds = model.model.embed_tokens(self._token)  # (1, 1, D)
        return model.step(embeds, self.cache, self._position, last_only=True,
                          kv_len=window)[0]  # (V,)

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
        self._graphs = self._fused = self._vision_graph = None
        gc.collect()  # drop reference cycles that may still hold parameters
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # give the caching allocator's blocks back to the driver

    def synchronize(self) -> None:
        if self.model is not None and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
