"""`llava-phi build-engines`: an ONNX export -> TensorRT engines, on the machine that runs them.

TensorRT's Python API as NVIDIA's samples use it (10.3): a STRONGLY_TYPED network (every
tensor's type comes from the graph, so the export's precision and its int8/int4
DequantizeLinear weights decide the engine's precision; no FP16/INT8 builder flags, no
calibration) parsed with `OnnxParser.parse_from_file` (which finds the external weight data
beside the graph); a workspace limit; a timing cache loaded and saved beside the engines; the
decoder's two optimisation profiles (plan.py); progress through an IProgressMonitor. Building
takes minutes on an Orin and runs only here, never in the node's configure.

NEVER RUN: no machine this project is developed or tested on has TensorRT (see the README's
verified / not verified table); what could be tested without it (the profiles, the manifest and
the reuse decision) is, in test/test_trt_plan.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..export.onnx_export import DECODER_FILE, VISION_FILE, manifest_sha256, read_manifest
from ..model.metadata import load_metadata
from . import manifest as em
from .plan import GraphIO, decoder_profiles

DEFAULT_WORKSPACE_MB = 2048  # the builder's scratch limit; the engines' own memory is apart
DEFAULT_MAX_PREFILL = 1024  # prefill positions per engine run (longer prompts run in chunks)


def device_facts(trt: Any) -> em.Device:
    """This machine's GPU, CUDA and TensorRT, as the engine manifest records them."""
    import torch

    if not torch.cuda.is_available():
        raise em.EngineError("TensorRT engines need a CUDA GPU; torch sees none")
    major, minor = torch.cuda.get_device_capability()
    return em.Device(tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(),
                     compute_capability=f"{major}.{minor}",
                     cuda_version=str(torch.version.cuda), jetson_module=em.jetson_module())


def engine_target(trt: Any, onnx_dir: Path, export: dict[str, Any], num_image_tokens: int,
                  max_prefill: int | None
                  ) -> tuple[GraphIO, dict[str, dict[str, tuple]], dict[str, Any]]:
    """The decoder graph's I/O, its profiles, and what engines of this export on this machine
    at max_prefill (None or 0: min(DEFAULT_MAX_PREFILL, max_context)) are built for. The
    prefill profile's opt S is a typical prompt: the image's positions plus a short question."""
    max_prefill = max_prefill or min(DEFAULT_MAX_PREFILL, int(export["max_context"]))
    io = GraphIO.read(onnx_dir / DECODER_FILE)
    profiles = decoder_profiles(io, max_prefill, num_image_tokens + 64)  # checks max_prefill
    return io, profiles, em.target(export, manifest_sha256(onnx_dir), device_facts(trt),
                                   max_prefill, profiles)


def build_engines(onnx_dir: str | Path, out: str | Path | None = None,
                  max_prefill: int | None = None,
                  workspace_mb: int = DEFAULT_WORKSPACE_MB, force: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Build (or reuse, when the manifest matches and force is off) the engines of an export;
    returns their directory. max_prefill None: min(DEFAULT_MAX_PREFILL, max_context)."""
    import tensorrt as trt

    onnx_dir = Path(onnx_dir)
    image_tokens = load_metadata(str(onnx_dir)).config.num_image_tokens
    _, profiles, wanted = engine_target(trt, onnx_dir, read_manifest(onnx_dir), image_tokens,
                                        max_prefill)
    root = Path(out).expanduser().resolve() if out else em.engines_root()
    engine_dir = root if out else root / em.target_key(wanted)
    reasons = em.problems(engine_dir, wanted)
    if not reasons and not force:
        log(f"engines in {engine_dir} match this export, GPU and TensorRT: reused")
        return engine_dir
    log(f"building in {engine_dir}: " + "; ".join(reasons if not force else ["--force"]))
    engine_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    timing = engine_dir / em.TIMING_CACHE
    seconds = {}
    for graph, engine, graph_profiles in ((VISION_FILE, em.VISION_ENGINE, {}),
                                          (DECODER_FILE, em.DECODER_ENGINE, profiles)):
        start = time.monotonic()
        data = _build_one(trt, logger, onnx_dir / graph, graph_profiles, workspace_mb, timing,
                          log)
        (engine_dir / engine).write_bytes(data)
        seconds[engine] = round(time.monotonic() - start, 1)
        log(f"{engine}: {len(data) / 2**20:.1f} MiB in {seconds[engine]} s")
    em.write_manifest(engine_dir, wanted, {"workspace_mb": workspace_mb,
                                           "build_seconds": seconds, "onnx_dir": str(onnx_dir)})
    return engine_dir


def _build_one(trt: Any, logger: Any, graph: Path,
               profiles: dict[str, dict[str, tuple]], workspace_mb: int, timing_path: Path,
               log: Callable[[str], None]) -> bytes:
    """One ONNX graph -> a serialized engine (profiles in plan.PROFILES order)."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):  # from the file: external data beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise em.EngineError(f"TensorRT's ONNX parser refused {graph.name}: "
                             + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file()
                                       else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for name in profiles:  # "prefill" first: profile 0
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in profiles[name].items():
            profile.set_shape(tensor, low, opt, high)
        config.add_optimization_profile(profile)
    config.progress_monitor = _progress_monitor(trt, graph.name, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise em.EngineError(f"TensorRT could not build {graph.name} (its log above says why)")
    timing_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def _progress_monitor(trt: Any, what: str, log: Callable[[str], None]) -> Any:
    """An IProgressMonitor printing each top-level build phase as it starts and ends."""

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None,
                        num_steps: int) -> None:
            self.started[phase_name] = time.monotonic()
            if parent_phase is None:
                log(f"{what}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            print(".", end="", file=sys.stderr, flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            took = time.monotonic() - self.started.pop(phase_name, time.monotonic())
            if took > 5:
                log(f"\n{what}: {phase_name} done in {took:.0f} s")

    return Progress()
