"""The TensorRT backend: an export's engines (`llava-phi build-engines`) on a CUDA GPU.

Engines are deserialised once. The decoder engine has two optimisation profiles (prefill,
decode; trt/plan.py), each with its own execution context; every context (the vision engine's
too) runs on one stream in turn, so they share one block of scratch memory this backend
allocates (USER_MANAGED). I/O is bound by tensor name to torch CUDA tensors. The KV cache is
preallocated at max_context and bound once as the past inputs of both contexts; after each run
the new keys/values are written into it at their positions with `index_copy_` driven by a device
tensor of positions. Decode runs on static buffers (token embedding, position, attention bias,
logits and new keys/values all fixed tensors whose values come from one device tensor
[token, pos]), so after a warm-up its whole step (embed, bias, engine, write-back) is captured
in a CUDA graph and replayed per token. The loop, choice scoring, prefix slots, streaming and
cancel are the shared code behind `Backend`.

NEVER RUN: no machine this project is developed or tested on has TensorRT. The decisions in it
that need no TensorRT (profiles, shapes per step, write-back pairs, prefill chunks, manifest
checks, engine paths) are trt/plan.py and trt/manifest.py, tested in test/test_trt_plan.py; the
names it uses of TensorRT's API are checked against the 10.3 bindings (test_trt_names.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..export.graphs import MASKED, attention_bias
from ..export.onnx_export import EMBED_FILE, read_manifest_for
from ..model.metadata import ModelMetadata
from ..trt import manifest as em
from ..trt.build import engine_target
from ..trt.plan import PROFILES, StepPlan, plan_step, prefill_chunks
from .base import Backend, BackendError, KVSnapshot
from .torch_backend import DTYPES as TORCH_DTYPES


def create(metadata: ModelMetadata, device: str = "cuda", dtype: str | None = None,
           max_context: int | None = None, engine_dir: str = "",
           max_prefill: int | None = None) -> TensorRTBackend:
    """The registry's factory: the export directory the metadata points to, its engines."""
    if metadata.weights_dir is None:
        raise BackendError(f"{metadata.name}: the tensorrt backend needs an export directory "
                           "(llava-phi export) and its engines (llava-phi build-engines)")
    return TensorRTBackend(metadata, metadata.weights_dir, device, dtype, max_context,
                           engine_dir, max_prefill)


def decode_bias(columns: torch.Tensor, pos: torch.Tensor, context: int) -> torch.Tensor:
    """attention_bias(pos, 1, context) flattened (C + 1,), computed on the device from a
    position held there (so a captured CUDA graph replays it for any pos): the past entries
    before pos and the new entry (column C) visible, the rest MASKED. columns: arange(C + 1)."""
    visible = (columns < pos) | (columns == context)
    return torch.where(visible, torch.zeros((), device=columns.device),
                       torch.full((), MASKED, device=columns.device))


class TensorRTBackend(Backend):
    """vision.engine + decoder.engine (two profiles) with a bound, runtime-owned KV cache."""

    def __init__(self, metadata: ModelMetadata, export_dir: Path, device: str = "cuda",
                 dtype: str | None = None, max_context: int | None = None,
                 engine_dir: str = "", max_prefill: int | None = None,
                 cuda_graph: bool = True):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendError(f"backend tensorrt: cannot import tensorrt ({exc}); it comes "
                               "with JetPack (python3-libnvinfer) or NVIDIA's wheels") from exc
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise BackendError(f"backend tensorrt runs on a CUDA GPU, not {device!r}")
        try:
            export = read_manifest_for(export_dir, dtype, max_context)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        precision = export["dtype"]
        self.config = metadata.config
        self.max_context = int(export["max_context"])
        try:
            self.io, _, wanted = engine_target(trt, export_dir, export,
                                               metadata.config.num_image_tokens, max_prefill)
            self.max_prefill = wanted["max_prefill"]
            self.engine_dir = em.engine_set_dir(em.engines_root(engine_dir), wanted)
        except (ValueError, em.EngineError) as exc:
            raise BackendError(str(exc)) from exc
        found = em.problems(self.engine_dir, wanted)
        if found:
            raise BackendError(f"engines in {self.engine_dir} cannot be used: "
                               + "; ".join(found) + f" (llava-phi build-engines --onnx "
                               f"{export_dir} --max-prefill {self.max_prefill})")
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self.dtype = TORCH_DTYPES[precision]
        self.model_id = (f"{metadata.name}/tensorrt/{precision}-{wanted['weights']}"
                         f"/{export['source_sha256'][:12]}")
        self._stream = torch.cuda.Stream(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._vision = self._deserialize(em.VISION_ENGINE)
        self._decoder = self._deserialize(em.DECODER_ENGINE)
        if self._decoder.num_optimization_profiles != len(PROFILES):
            raise BackendError(f"{em.DECODER_ENGINE} has {self._decoder.num_optimization_profiles}"
                               f" optimisation profiles, not {len(PROFILES)}")
        # One scratch block for every context: they all run on one stream, one at a time.
        scratch = max([self._vision.device_memory_size_v2] + [
            self._decoder.get_device_memory_size_for_profile_v2(i) for i in range(len(PROFILES))])
        self._scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device)
        manual = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._vision_context = self._context(self._vision, manual)
        self._contexts = {}
        for index, profile in enumerate(PROFILES):
            context = self._context(self._decoder, manual)
            context.set_optimization_profile_async(index, self._stream.cuda_stream)
            self._contexts[profile] = context
        t = self.config.text
        shape = (1, t.num_attention_heads, self.max_context, t.head_dim)
        self.cache = {name: torch.zeros(shape, dtype=self.dtype, device=self.device)
                      for name in self.io.inputs if name.startswith("past_")}
        for context in self._contexts.values():  # bound once: both profiles read the cache
            for name, tensor in self.cache.items():
                context.set_input_shape(name, tensor.shape)
                context.set_tensor_address(name, tensor.data_ptr())
        self.embedding = torch.from_numpy(np.load(export_dir / EMBED_FILE)).to(self.device)
        self._vision_io = self._vision_buffers()
        self._decode = self._decode_buffers()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_state = "on after the first decode step" if cuda_graph else "off"
        self._use_graph = cuda_graph
        engine_bytes = sum((self.engine_dir / f).stat().st_size for f in em.ENGINE_FILES)
        self._described = {
            "backend": "tensorrt", "precision": precision, "weights": wanted["weights"],
            "device": f"{device} ({wanted['gpu_name']}, sm {wanted['compute_capability']})",
            "engine_dir": str(self.engine_dir), "tensorrt": wanted["tensorrt_version"],
            "max_prefill": str(self.max_prefill),
            "engine_mb": f"{engine_bytes / 2**20:.1f}"}

    # ----- setup --------------------------------------------------------------------------------
    def _deserialize(self, name: str) -> Any:
        engine = self._runtime.deserialize_cuda_engine((self.engine_dir / name).read_bytes())
        if engine is None:
            raise BackendError(f"{self.engine_dir / name}: TensorRT could not deserialise it "
                               "(corrupt, or built by another TensorRT); rebuild the engines")
        return engine

    def _context(self, engine: Any, strategy: Any) -> Any:
        context = engine.create_execution_context(strategy)
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        return context

    def _vision_buffers(self) -> dict[str, torch.Tensor]:
        """The vision engine's static input and output, bound once."""
        size = self.config.vision.image_size
        out = {"pixel_values": torch.empty((1, 3, size, size), device=self.device),
               "image_embeds": torch.empty((1, self.config.num_image_tokens,
                                            self.config.text.hidden_size), dtype=self.dtype,
                                           device=self.device)}
        for name, tensor in out.items():
            self._vision_context.set_tensor_address(name, tensor.data_ptr())
        self._vision_context.set_input_shape("pixel_values", out["pixel_values"].shape)
        return out

    def _decode_buffers(self) -> dict[str, torch.Tensor]:
        """Decode's static tensors, bound once to the decode context; `step` holds [token, pos]
        on the device, from which the rest are computed (CUDA-graph capturable)."""
        plan = plan_step(self.io, 0, 1, False, self.max_prefill, decode=True)
        self._pairs = plan.writeback  # (new output, past input) per layer and kind
        dev = self.device
        buffers = {"step": torch.zeros(2, dtype=torch.int64, device=dev),
                   "step_host": torch.zeros(2, dtype=torch.int64).pin_memory(),
                   "columns": torch.arange(self.max_context + 1, device=dev)}
        for name, shape in plan.shapes.items():
            if name.startswith("past_"):
                continue
            dtype = {"position_ids": torch.int64, "logit_positions": torch.int64,
                     "attention_bias": torch.float32, "logits": torch.float32}.get(name,
                                                                                   self.dtype)
            buffers[name] = torch.zeros(shape, dtype=dtype, device=dev)
        context = self._contexts["decode"]
        for name in plan.shapes:
            if name.startswith("past_"):
                continue
            if name in self.io.inputs:
                context.set_input_shape(name, buffers[name].shape)
            context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Run on the backend's stream, ordered after and before the caller's stream."""
        if self._decoder is None:
            raise BackendError(f"{self.model_id}: the backend was closed")
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)

    # ----- the Backend interface ----------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        allocated = (sum(t.nbytes for t in self.cache.values()) + self._scratch.nbytes
                     + self.embedding.nbytes) if self._decoder is not None else 0
        return {**self._described, "cuda_graph": self._graph_state,
                "device_memory_mb": f"{allocated / 2**20:.1f} (cache, scratch, embeddings; "
                                    f"+ the engines' weights)"}

    def encode_image(self, pixel_values: np.ndarray) -> torch.Tensor:
        with self._on_stream():
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
            self._vision_io["pixel_values"].copy_(pixels.reshape(
                self._vision_io["pixel_values"].shape), non_blocking=False)
            if not self._vision_context.execute_async_v3(self._stream.cuda_stream):
                raise BackendError("the vision engine failed to run")
            features = self._vision_io["image_embeds"][0].clone()  # (N, D)
        return features

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        if self._decoder is None:
            raise BackendError(f"{self.model_id}: the backend was closed")
        return self.embedding[torch.tensor(list(ids), device=self.device)]  # (T, D)

    def prefill(self, embeds: torch.Tensor, start_pos: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Chunks of at most max_prefill positions on the prefill profile."""
        chunks = prefill_chunks(start_pos, embeds.shape[0], self.max_prefill)
        out = []
        with self._on_stream():
            embeds = embeds.to(self.device, self.dtype)
            for start, length in chunks:
                plan = plan_step(self.io, start, length, all_logits, self.max_prefill)
                offset = start - start_pos
                out.append(self._run_prefill(plan, embeds[offset:offset + length]))  # (K, V)
            logits = torch.cat(out) if all_logits else out[-1][-1]
        return logits

    def _run_prefill(self, plan: StepPlan, embeds: torch.Tensor) -> torch.Tensor:
        """One prefill run: bind this step's tensors by name, run, write the new KV back."""
        context = self._contexts["prefill"]
        dev, s = self.device, plan.length
        rows = torch.arange(s, device=dev) if plan.logit_rows == s else torch.tensor(
            [s - 1], device=dev)
        tensors = {  # each held until the run is done: TensorRT reads their memory
            "inputs_embeds": embeds.contiguous()[None],
            "position_ids": torch.arange(plan.start_pos, plan.start_pos + s, device=dev)[None],
            "attention_bias": attention_bias(plan.start_pos, s, self.max_context).to(dev),
            "logit_positions": rows,
            "logits": torch.empty(plan.shapes["logits"], device=dev)}
        for new, _ in plan.writeback:
            tensors[new] = torch.empty(plan.shapes[new], dtype=self.dtype, device=dev)
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != plan.shapes[name]:
                raise BackendError(f"{name}: shape {tuple(tensor.shape)}, the plan has "
                                   f"{plan.shapes[name]}")
            if name in self.io.inputs:
                context.set_input_shape(name, tensor.shape)
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("the decoder engine failed to run (prefill)")
        positions = torch.arange(plan.start_pos, plan.start_pos + s, device=dev)
        for new, past in plan.writeback:
            self.cache[past].index_copy_(2, positions, tensors[new])
        return tensors["logits"][0]  # (K, V) fp32

    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        if not 0 <= pos < self.max_context:
            raise ValueError(f"position {pos} is outside the KV cache of {self.max_context}")
        b = self._decode
        with self._on_stream():
            b["step_host"][0], b["step_host"][1] = token_id, pos
            b["step"].copy_(b["step_host"])  # before the graph reads it
            if self._graph is not None:
                self._graph.replay()
            else:
                self._decode_body()
                if self._use_graph:
                    self._capture()
            logits = b["logits"][0, -1].clone()  # (V,) fp32
        return logits

    def _decode_body(self) -> None:
        """One decode step from b["step"] = [token, pos], all on the device (capturable)."""
        b = self._decode
        token, pos = b["step"][0:1], b["step"][1:2]
        b["inputs_embeds"][0].copy_(self.embedding.index_select(0, token))  # (1, D)
        b["position_ids"][0].copy_(pos)
        b["attention_bias"].view(-1).copy_(decode_bias(b["columns"], pos, self.max_context))
        if not self._contexts["decode"].execute_async_v3(self._stream.cuda_stream):
            raise BackendError("the decoder engine failed to run (decode)")
        for new, past in self._pairs:
            self.cache[past].index_copy_(2, pos, b[new])

    def _capture(self) -> None:
        """Capture the decode step in a CUDA graph (after the eager warm-up run)."""
        self._use_graph = False
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._decode_body()
        except RuntimeError as exc:  # TensorRT or torch could not capture: stay eager
            self._graph_state = f"off (capture failed: {exc})"
            return
        self._graph = graph
        self._graph_state = "captured"

    def synchronize(self) -> None:
        self._stream.synchronize()

    def snapshot(self, n_positions: int) -> KVSnapshot:
        with self._on_stream():
            data = {name: a[:, :, :n_positions].clone() for name, a in self.cache.items()}
        return KVSnapshot(n_positions, sum(a.nbytes for a in data.values()), data)

    def restore(self, snapshot: KVSnapshot, n_positions: int) -> None:
        n = min(n_positions, snapshot.n_positions)
        with self._on_stream():
            for name, saved in snapshot.data.items():
                self.cache[name][:, :, :n].copy_(saved[:, :, :n])

    def close(self) -> None:
        if self._decoder is None:
            return
        self._stream.synchronize()
        self._graph = None
        self._contexts = {}
        self._vision_context = None
        self._decoder = self._vision = None
        self._runtime = None
        self.cache = {}
        self._decode = self._vision_io = {}
        self._scratch = self.embedding = None  # type: ignore[assignment]
        torch.cuda.empty_cache()
