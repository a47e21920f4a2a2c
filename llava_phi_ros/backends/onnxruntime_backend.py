"""The ONNX Runtime backend: an export directory (`llava-phi export`) on the CPU provider, or
CUDA's when asked for and present.

The runtime owns the KV cache: one preallocated torch tensor per layer and kind at the export's
fixed max_context, on the session's device, whose memory is bound once to the decoder's past
inputs through I/O binding (no per-token copy or allocation of the cache); each step's new
keys/values come out into bound buffers too (reused for decode's S = 1) and are copied in at
their positions. The same code serves the CPU and the CUDA provider: ORT is handed device
pointers either way. Everything else (the loop, choice scoring, prefix slots, streaming,
cancel) is the shared code behind `Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..export.graphs import attention_bias, new_names, past_names
from ..export.onnx_export import (
    DECODER_FILE,
    EMBED_FILE,
    VISION_FILE,
    manifest_sha256,
    read_manifest_for,
)
from ..export.quantize import DEFAULT_ACCURACY_LEVEL
from ..model.metadata import ModelMetadata
from .base import Backend, BackendError, KVSnapshot
from .torch_backend import DTYPES as TORCH_DTYPES

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def create(metadata: ModelMetadata, device: str = "cpu", dtype: str | None = None,
           max_context: int | None = None) -> OnnxRuntimeBackend:
    """The registry's factory: the export directory the metadata points to."""
    if metadata.weights_dir is None:
        raise BackendError(f"{metadata.name}: the onnxruntime backend needs an export "
                           "directory (llava-phi export --model DIR --out OUT)")
    return OnnxRuntimeBackend(metadata, metadata.weights_dir, device, dtype, max_context)


class OnnxRuntimeBackend(Backend):
    """vision.onnx + decoder.onnx with a runtime-owned, I/O-bound KV cache."""

    def __init__(self, metadata: ModelMetadata, export_dir: Path, device: str = "cpu",
                 dtype: str | None = None, max_context: int | None = None,
                 optimization: str = "all", accuracy_level: int | None = None):
        """accuracy_level: MatMulNBits' (quantised weights), None = the export's manifest."""
        import onnxruntime as ort

        try:
            manifest = read_manifest_for(export_dir, dtype, max_context)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        precision = manifest["dtype"]
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}")
        providers = self._providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        # No busy-waiting between runs: a robot's other nodes share these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        weights = manifest.get("weights", "float")
        if accuracy_level is None:
            accuracy_level = manifest.get("onnxruntime", {}).get("matmul_accuracy_level",
                                                                 DEFAULT_ACCURACY_LEVEL)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                         str(accuracy_level))
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = {
            "disabled": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
            "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[optimization]
        self.vision = ort.InferenceSession(str(export_dir / VISION_FILE), options,
                                           providers=providers)
        self.decoder = ort.InferenceSession(str(export_dir / DECODER_FILE), options,
                                            providers=providers)
        self.config = metadata.config
        self.manifest = manifest
        self._described = {
            "backend": "onnxruntime", "precision": precision, "weights": weights,
            "matmul_accuracy_level": str(accuracy_level),
            "device": ",".join(self.decoder.get_providers()), "export_dir": str(export_dir),
            "manifest_sha256": manifest_sha256(export_dir),
            "source_sha256": manifest["source_sha256"], "onnxruntime": ort.__version__}
        self.max_context = int(manifest["max_context"])
        self.model_id = (f"{metadata.name}/onnxruntime/{precision}"
                         f"{'' if weights == 'float' else '-' + weights}"
                         f"/{manifest['source_sha256'][:12]}")
        self.dtype = TORCH_DTYPES[precision]
        self.device = torch.device(device if device.startswith("cuda") else "cpu")
        # Where ORT finds bound buffers: ("cpu", 0) or ("cuda", index).
        self._ort_device = (self.device.type, self.device.index or 0)
        self.embedding = np.load(export_dir / EMBED_FILE, mmap_mode="r")  # (V, D), host
        t = self.config.text
        shape = (1, t.num_attention_heads, self.max_context, t.head_dim)
        self.cache = {name: torch.zeros(shape, dtype=self.dtype, device=self.device)
                      for name in past_names(t.num_hidden_layers)}
        self._new = new_names(t.num_hidden_layers)
        self._binding = self.decoder.io_binding()
        for name, tensor in self.cache.items():  # bound once: ORT reads these buffers in place
            self._bind(name, tensor)
        # decode's new keys/values (S = 1), reused every token; prefill allocates its own
        self._new_decode = [torch.empty(shape[:2] + (1, shape[3]), dtype=self.dtype,
                                        device=self.device) for _ in self._new]

    @staticmethod
    def _providers(device: str, available: Sequence[str]) -> list[str]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise BackendError(f"device {device!r}: this onnxruntime has no CUDA provider "
                                   f"(available: {', '.join(available)})")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        raise BackendError(f"unknown device {device!r} for onnxruntime (cpu or cuda)")

    def describe(self) -> dict[str, str]:
        return dict(self._described)

    def _live(self) -> None:
        if self.decoder is None:
            raise BackendError(f"{self.model_id}: the backend was closed")

    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        self._live()
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if pixels.ndim == 3:
            pixels = pixels[None]  # (1, C, S, S)
        (features,) = self.vision.run(None, {"pixel_values": pixels})
        return torch.from_numpy(features[0])  # (N, D)

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        self._live()
        return torch.from_numpy(np.ascontiguousarray(self.embedding[list(ids)]))  # (T, D)

    def prefill(self, embeds: torch.Tensor, start_pos: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        logits = self._run(embeds, start_pos, all_logits)
        return logits if all_logits else logits[-1]

    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        if not 0 <= pos < self.max_context:
            raise ValueError(f"position {pos} is outside the KV cache of {self.max_context}")
        return self._run(self.embed_tokens([token_id]), pos, False)[-1]

    def _bind(self, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous torch tensor's memory to a graph input or output (no copy)."""
        kind, index = self._ort_device
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, kind, index, _NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
             tensor.data_ptr())

    def _run(self, embeds: torch.Tensor, start_pos: int, all_logits: bool) -> torch.Tensor:
        """Run (S, D) embeddings at start_pos..; write their keys/values into the cache."""
        self._live()
        s = embeds.shape[0]
        if start_pos < 0 or start_pos + s > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + s - 1} do not fit the KV "
                             f"cache of {self.max_context}")
        dev = self.device
        rows = torch.arange(s) if all_logits else torch.tensor([s - 1])
        inputs = {  # each held until the run is done: ORT reads their memory
            "inputs_embeds": embeds.to(dev, self.dtype).contiguous()[None],
            "position_ids": torch.arange(start_pos, start_pos + s, device=dev)[None],
            "attention_bias": attention_bias(start_pos, s, self.max_context).to(dev),
            "logit_positions": rows.to(dev)}
        for name, tensor in inputs.items():
            self._bind(name, tensor)
        logits = torch.empty((1, len(rows), self.config.text.vocab_size), device=dev)
        self._bind("logits", logits, output=True)
        first = self.cache[next(iter(self.cache))]
        new = self._new_decode if s == 1 else [
            torch.empty(first.shape[:2] + (s, first.shape[3]), dtype=self.dtype, device=dev)
            for _ in self._new]
        for name, tensor in zip(self._new, new, strict=True):
            self._bind(name, tensor, output=True)
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # inputs written before ORT reads
        self.decoder.run_with_iobinding(self._binding)
        for cached, entries in zip(self.cache.values(), new, strict=True):  # past_names order
            cached[:, :, start_pos:start_pos + s].copy_(entries)  # (1, H, S, Dh)
        return logits[0]  # (K, V) fp32, on the device

    def snapshot(self, n_positions: int) -> KVSnapshot:
        data = {name: a[:, :, :n_positions].clone() for name, a in self.cache.items()}
        return KVSnapshot(n_positions, sum(a.nbytes for a in data.values()), data)

    def restore(self, snapshot: KVSnapshot, n_positions: int) -> None:
        n = min(n_positions, snapshot.n_positions)
        for name, saved in snapshot.data.items():
            self.cache[name][:, :, :n] = saved[:, :, :n]

    def close(self) -> None:
        self.vision = self.decoder = None  # type: ignore[assignment]
        self._binding = None
        self.cache = {}
        self._new_decode = []
        self.embedding = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
