"""`llava-phi bench`: the product's backends against stock transformers, same weights, same run.

Every backend answers the same frame and questions, repeat by repeat in turn (A, B, A, B, ...) so
machine noise hits them alike; medians after warm-up. Per backend:

- vision ms: preprocessing (the product's exact CPU path) + vision tower + projector;
- prefill ms: the whole prompt (system prompt, 576 image positions, question) in one forward;
- time to first token: vision + prefill + choosing the first token;
- repeated-frame time to first token: the SAME frame asked a second question. The product keeps
  the encoded image and its KV prefix and prefills only the question; stock transformers has no
  cross-call cache and recomputes vision and the whole prompt;
- decode tokens/s: steady state, from the first token to the last (exactly --new-tokens tokens
  on every side: no stop token can end an answer early);
- peak memory: measured in a fresh child process per backend (see `measure_peak_memory`).

The baseline is transformers' CLIPVisionModel + PhiForCausalLM (sdpa attention) holding copies of
the same weights, run the LLaVA way, with stock `generate` (default dynamic cache, no compile).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import BACKENDS, DECODE_PATHS, DTYPE_NAMES, EXPORT_DTYPES, implemented_backends
from .cli import EXIT_USAGE, CliError
from .export.quantize import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, WEIGHT_FORMATS
from .model.config import ConfigError, LlavaPhiConfig, tiny_config
from .model.llava_phi import LlavaPhiForCausalLM
from .model.preprocess import ImagePreprocessConfig, preprocess_image
from .model.preprocess_device import DEVICE_TOLERANCE_LEVELS
from .model.prompt import build_prompt, tokenize_prompt
from .model.tokenizer import Tokenizer, build_byte_tokenizer
from .roofline import copy_bandwidth, decode_ceiling, decode_weight_bytes

BASELINE = "transformers"
CONFIG_NAMES = ("llava-phi-3b", "tiny", "random-tiny")
IMAGES = {"336": (336, 336), "1080p": (1920, 1080)}  # (width, height) of the camera frame
PREPROCESSING = ("exact", "device")  # --preprocess
QUESTION = "What is in front of the robot?"
QUESTION_AGAIN = "Is the path ahead clear?"  # differs from the first character on
PROFILE_DECODE_STEPS = 8
SAMPLE_S = 0.002  # the memory child's RssAnon sampling period
MEMORY_REQUESTS = 2  # request pairs the memory child runs (its peak is over all of them)
# glibc in the memory child: a fixed mmap threshold (no dynamic raise) sends every block of
# 128 KiB or more back to the OS when freed, so the peak RSS is what the backend held, not
# what the allocator happened to keep from earlier requests.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class BenchError(CliError):
    """A bench that cannot run, with its exit code (EXIT_USAGE: bad flags or a missing extra)."""


@dataclass(frozen=True)
class Metric:
    """One reported number: its JSON key, table label, unit and which way is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = False


METRICS = (
    Metric("vision_ms", "vision (preprocess + tower + projector)", "ms"),
    Metric("prefill_ms", "prefill (whole prompt)", "ms"),
    Metric("ttft_ms", "time to first token", "ms"),
    Metric("repeat_ttft_ms", "repeated-frame time to first token", "ms"),
    Metric("decode_tok_s", "decode (after the first token)", "tokens/s", higher_is_better=True),
    Metric("peak_memory_mb", "peak memory", "MiB"),
)
TIMED = tuple(m.key for m in METRICS if m.key != "peak_memory_mb")


@dataclass(frozen=True)
class BenchSettings:
    """Validated `llava-phi bench` flags (picklable: the memory child gets a copy)."""

    config: str
    model_dir: str | None
    seed: int
    backends: tuple[str, ...]
    device: str
    dtype: str
    threads: int | None
    layers: int | None
    image: str
    new_tokens: int
    repeats: int
    warmup: int
    json_path: str | None
    plot_path: str | None
    memory: bool
    profile_path: str | None = None
    ceiling: bool = False  # measure the copy bandwidth and the decode ceiling
    preprocess: str = "exact"  # or "device": the torch backends preprocess on their device

    def command_line(self) -> str:
        """The full command with every setting spelled out."""
        parts = ["llava-phi", "bench"]
        parts += (["--model", self.model_dir] if self.model_dir else
                  ["--config", self.config, "--random-weights", "--seed", str(self.seed)])
        if self.layers is not None:
            parts += ["--layers", str(self.layers)]
        parts += ["--backend", ",".join(self.backends), "--device", self.device,
                  "--dtype", self.dtype, "--image", self.image,
                  "--threads", str(self.threads or torch.get_num_threads()),
                  "--new-tokens", str(self.new_tokens), "--repeats", str(self.repeats),
                  "--warmup", str(self.warmup)]
        if not self.memory:
            parts.append("--no-memory")
        if self.json_path:
            parts += ["--json", self.json_path]
        if self.plot_path:
            parts += ["--plot", self.plot_path]
        if self.profile_path:
            parts += ["--profile", self.profile_path]
        parts.append("--ceiling" if self.ceiling else "--no-ceiling")
        parts += ["--preprocess", self.preprocess]
        return shlex.join(parts)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The `bench` subcommand's flags."""
    p.add_argument("--config", default="llava-phi-3b", choices=CONFIG_NAMES,
                   help="model geometry: llava-phi-3b (CLIP ViT-L/14-336 + Phi-2, the default), "
                        "tiny (LLAVA_PHI.md's tiny model) or random-tiny (builtin:random-tiny)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights (seeded) for --config; the other source is --model")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a checkpoint directory (replaces --config and --random-weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--backend", default=f"torch,{BASELINE}",
                   help=f"comma list of backends ({', '.join(implemented_backends())}) and "
                        f"{BASELINE} (stock transformers, the baseline); default torch,{BASELINE}. "
                        f"Variants: torch:{'|'.join(DECODE_PATHS)} (the decode path), "
                        f"onnxruntime:WEIGHTS[:LEVEL] (quantised weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="auto: float32 on CPU, float16 on a GPU")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep N decoder layers (the vision tower stays whole)")
    p.add_argument("--image", default="336", choices=tuple(IMAGES),
                   help="camera frame: 336 (336x336) or 1080p (1920x1080, preprocessing included "
                        "in vision ms)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="measured repeats (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured repeats first (default 1)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory child processes")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the copy bandwidth (a 1 GiB device copy) and the decode ceiling "
                        "it allows, with each backend's share of it (default: on a GPU only)")
    p.add_argument("--preprocess", default="exact", choices=PREPROCESSING,
                   help="exact: the CPU path, bit-exact with CLIPImageProcessor (default); "
                        "device: the torch backends resize/pad/normalise on their device "
                        f"(within {DEVICE_TOLERANCE_LEVELS} uint8 levels of exact); the others "
                        "stay exact")
    p.add_argument("--json", default=None, metavar="FILE", help="write every sample as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="bar charts, one per metric (needs matplotlib)")
    p.add_argument("--profile", default=None, metavar="FILE.txt",
                   help=f"after the timing: torch.profiler's top ops by self time for one prefill "
                        f"and {PROFILE_DECODE_STEPS} decode steps of each backend")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Check the flags; BenchError (exit 2) naming the bad one."""
    if args.model is not None and args.random_weights:
        raise BenchError("give --random-weights or --model DIR, not both", EXIT_USAGE)
    if args.model is None and not args.random_weights:
        raise BenchError("no weights: give --random-weights (seeded random weights for "
                         "--config) or --model DIR", EXIT_USAGE)
    if args.model is not None and not Path(args.model).is_dir():
        raise BenchError(f"--model {args.model!r} is not a directory", EXIT_USAGE)
    backends = tuple(b.strip() for b in args.backend.split(","))
    known = (*BACKENDS, BASELINE)
    for variant in backends:
        name, weights, level = split_variant(variant)
        variant_given = (weights, level) != ("float", DEFAULT_ACCURACY_LEVEL)
        if name == "torch":
            path = decode_path(variant)
            if path not in DECODE_PATHS:
                raise BenchError(f"--backend {variant!r}: torch takes a decode path, as "
                                 f"torch:{'|'.join(DECODE_PATHS)}", EXIT_USAGE)
        elif (variant_given and name != "onnxruntime") or weights not in WEIGHT_FORMATS \
                or level not in ACCURACY_LEVELS:
            raise BenchError(f"--backend {variant!r}: only onnxruntime takes a weight format, "
                             f"as onnxruntime:{'|'.join(WEIGHT_FORMATS)}[:accuracy level "
                             f"{'|'.join(map(str, ACCURACY_LEVELS))}]", EXIT_USAGE)
        if name not in known:
            raise BenchError(f"unknown backend {name!r} in --backend (choose from "
                             f"{', '.join((*implemented_backends(), BASELINE))})", EXIT_USAGE)
        if name != BASELINE and name not in implemented_backends():
            raise BenchError(f"backend {name!r} is not implemented yet (implemented: "
                             f"{', '.join(implemented_backends())})", EXIT_USAGE)
    if len(set(backends)) != len(backends):
        raise BenchError(f"--backend names a backend twice: {args.backend}", EXIT_USAGE)
    for flag, value, low in (("--layers", args.layers, 1), ("--threads", args.threads, 1),
                             ("--new-tokens", args.new_tokens, 2),
                             ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            why = " (decode tokens/s needs a second token)" if flag == "--new-tokens" else ""
            raise BenchError(f"{flag} must be >= {low}, got {value}{why}", EXIT_USAGE)
    if "tensorrt" in backends and find_spec("tensorrt") is None:
        raise BenchError("backend 'tensorrt' needs TensorRT's Python module (not installed; "
                         "JetPack's python3-libnvinfer on a Jetson)", EXIT_USAGE)
    if BASELINE in backends and find_spec("transformers") is None:
        raise BenchError(f"the {BASELINE} baseline needs transformers: pip install "
                         "'llava-phi-ros[bench]'", EXIT_USAGE)
    if args.plot is not None and find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'llava-phi-ros[bench]'", EXIT_USAGE)
    return BenchSettings(config=args.config, model_dir=args.model, seed=args.seed,
                         backends=backends, device=args.device, dtype=args.dtype,
                         threads=args.threads,
                         layers=args.layers, image=args.image, new_tokens=args.new_tokens,
                         repeats=args.repeats, warmup=args.warmup, json_path=args.json,
                         plot_path=args.plot, memory=args.memory, profile_path=args.profile,
                         preprocess=args.preprocess,
                         ceiling=(args.ceiling if args.ceiling is not None
                                  else args.device.startswith("cuda")))


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ----- weights -----------------------------------------------------------------------------------
def base_config(name: str) -> tuple[LlavaPhiConfig, float | None]:
    """A named geometry and the std of its random weights (None: PyTorch's default init)."""
    from .model.builtin import random_tiny_config

    if name == "llava-phi-3b":  # N(0, 0.2) would blow activations up at width 2560
        return LlavaPhiConfig(), None
    if name == "tiny":  # the byte tokenizer's 257 ids need a vocabulary of at least that
        return tiny_config(vocab_size=320).with_text(max_position_embeddings=1024), 0.2
    if name == "random-tiny":  # exactly builtin:random-tiny's weights at seed 0
        return random_tiny_config(), 0.2
    raise BenchError(f"unknown --config {name!r}", EXIT_USAGE)


def random_model(cfg: LlavaPhiConfig, seed: int, init_std: float | None,
                 vocab_size: int) -> LlavaPhiForCausalLM:
    """Seeded random weights (fp32, CPU); logits of ids past the tokenizer's vocabulary sit at
    -1e4, as builtin:random-tiny's do, so answers decode to text."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaPhiForCausalLM(cfg)
        if init_std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, init_std)
    with torch.no_grad():
        model.lm_head.bias[vocab_size:] = -1e4
    return model.eval()


def keep_layers(model: LlavaPhiForCausalLM, n: int) -> LlavaPhiForCausalLM:
    """The model with its first n decoder layers only (in place)."""
    have = model.config.text.num_hidden_layers
    if n > have:
        raise BenchError(f"--layers {n}: the checkpoint has {have} decoder layers", EXIT_USAGE)
    model.config = model.config.with_text(num_hidden_layers=n)
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:n])
    return model


@dataclass
class Source:
    """The fp32 CPU weights every backend of a run starts from, with their tokenizer."""

    model: LlavaPhiForCausalLM | None
    config: LlavaPhiConfig
    tokenizer: Tokenizer
    preprocess: ImagePreprocessConfig
    name: str
    weights: str  # where the weights came from, for the report
    byte_tokenizer: bool


def resolve_config(s: BenchSettings) -> LlavaPhiConfig:
    """The run's model config (--model's, or --config's geometry), with --layers applied."""
    if s.model_dir is not None:
        from .model.metadata import ModelLoadError, load_metadata

        try:
            cfg = load_metadata(s.model_dir).config
        except (ModelLoadError, ValueError, OSError) as exc:
            raise BenchError(f"cannot load --model {s.model_dir!r}: {exc}") from exc
        if s.layers is not None and s.layers > cfg.text.num_hidden_layers:
            raise BenchError(f"--layers {s.layers}: the checkpoint has "
                             f"{cfg.text.num_hidden_layers} decoder layers", EXIT_USAGE)
    else:
        cfg = base_config(s.config)[0]
    try:
        return cfg if s.layers is None else cfg.with_text(num_hidden_layers=s.layers)
    except ConfigError as exc:
        raise BenchError(f"--layers {s.layers}: {exc}", EXIT_USAGE) from exc


def build_source(s: BenchSettings) -> Source:
    """The run's weights: --model DIR, or --config's geometry with seeded random weights."""
    if s.model_dir is not None:
        from .model.checkpoint import load_model
        from .model.metadata import ModelLoadError, load_metadata

        try:
            meta = load_metadata(s.model_dir)
            model = load_model(s.model_dir, device=torch.device("cpu"), dtype=torch.float32)
        except (ModelLoadError, ValueError, OSError) as exc:
            raise BenchError(f"cannot load --model {s.model_dir!r}: {exc}") from exc
        if s.layers is not None:
            model = keep_layers(model, s.layers)
        return Source(model.eval(), model.config, meta.tokenizer, meta.preprocess,
                      Path(s.model_dir).resolve().name, f"checkpoint {s.model_dir}", False)
    cfg, init_std = resolve_config(s), base_config(s.config)[1]
    tokenizer = build_byte_tokenizer()
    model = random_model(cfg, s.seed, init_std, tokenizer.vocab_size)
    return Source(model, cfg, tokenizer, ImagePreprocessConfig.for_image_size(
        cfg.vision.image_size), f"{s.config} (random)", f"random, seed {s.seed}", True)


def make_frame(image: str, seed: int = 0) -> np.ndarray:
    """A seeded random RGB camera frame (H, W, 3) uint8 of the --image size."""
    width, height = IMAGES[image]
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def parameter_counts(model: LlavaPhiForCausalLM) -> dict[str, int]:
    """Parameters of the vision tower, the projector, the decoder (embeddings and head included)."""
    counts = {"vision": 0, "projector": 0, "decoder": 0}
    for name, p in model.named_parameters():
        part = ("vision" if name.startswith("model.vision_tower.") else
                "projector" if name.startswith("model.mm_projector.") else "decoder")
        counts[part] += p.numel()
    return counts | {"total": sum(counts.values())}


def _tensor_mib(tensors: Sequence[torch.Tensor]) -> float:
    return sum(t.nbytes for t in tensors) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(start: float, end: float | None = None) -> float:
    return ((time.perf_counter() if end is None else end) - start) * 1000.0


# ----- runners -----------------------------------------------------------------------------------
class NoStopTokenizer:
    """The model's tokenizer with a stop id that no token has: every answer runs to
    max_new_tokens (random weights may emit the real one at any step)."""

    eos_token_id = -1

    def __init__(self, inner: Tokenizer):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _profiling() -> Any:
    """torch.profiler over the CPU (and CUDA when there is one)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


class ProductRunner:
    """A product backend behind VisionLanguageModel: the path the CLI and the node use."""

    def __init__(self, name: str, source: Source, weights: LlavaPhiForCausalLM,
                 s: BenchSettings):
        from .model.metadata import ModelLoadError, metadata_for_model
        from .pipeline import VisionLanguageModel

        self.name = name
        self.new_tokens = s.new_tokens
        self._export_dir: Path | None = None
        # the backend casts/moves `weights` IN PLACE: the caller hands over a model of its own
        meta = metadata_for_model(weights, source.tokenizer, source.preprocess, source.name)
        backend, weight_format, level = split_variant(name)
        options = {"decode_path": decode_path(name)} if backend == "torch" else {}
        if backend in ("onnxruntime", "tensorrt"):  # an export of these weights, made first
            meta = self._export(backend, weights, source, s, weight_format, level)
        if backend == "tensorrt":  # and its engines, built here (minutes on a Jetson)
            options = {"engine_dir": str(self._build_engines())}
        try:
            self.vlm = VisionLanguageModel.from_metadata(meta, backend, s.device, s.dtype,
                                                         backend_options=options)
        except ModelLoadError as exc:
            raise BenchError(f"cannot create backend {name!r}: {exc}") from exc
        self.vlm.tokenizer = NoStopTokenizer(self.vlm.tokenizer)  # type: ignore[assignment]
        self.vlm.device_preprocessing = backend == "torch" and s.preprocess == "device"
        self.label = self.vlm.description

    def _export(self, backend: str, weights: LlavaPhiForCausalLM, source: Source,
                s: BenchSettings, weight_format: str, level: int) -> Any:
        """Export the weights (llava-phi export [--weights]) to a temporary directory; its
        metadata."""
        import tempfile

        from .export.onnx_export import export_model
        from .model.metadata import load_metadata

        _, dtype = resolve_device(s)
        precision = str(dtype).removeprefix("torch.")
        if precision not in EXPORT_DTYPES:
            raise BenchError(f"onnxruntime exports are {' or '.join(EXPORT_DTYPES)}, not "
                             f"{precision}", EXIT_USAGE)
        self._export_dir = Path(tempfile.mkdtemp(prefix="llava-phi-bench-onnx-"))
        progress(f"exporting the weights for {backend} ({precision}, weights {weight_format}, "
                 f"accuracy level {level}) to {self._export_dir}")
        export_model(weights, source.tokenizer, source.preprocess, self._export_dir / "model",
                     precision, source="bench", weights=weight_format, accuracy_level=level)
        return load_metadata(str(self._export_dir / "model"))

    def _build_engines(self) -> Path:
        """TensorRT engines of the export, beside it (llava-phi build-engines)."""
        from .trt.build import build_engines

        assert self._export_dir is not None
        try:
            return build_engines(self._export_dir / "model", self._export_dir / "engines",
                                 log=progress)
        except ImportError as exc:
            raise BenchError(f"backend 'tensorrt' needs TensorRT's Python module ({exc})",
                             EXIT_USAGE) from exc

    def weights_mib(self) -> float:
        """Weights, buffers and the preallocated KV cache, as tensors hold them."""
        backend = self.vlm.backend
        if self._export_dir is not None:  # onnxruntime: the graphs' weights + its cache arrays
            files = sum(f.stat().st_size for f in (self._export_dir / "model").iterdir())
            return (files + sum(a.nbytes for a in backend.cache.values())) / 2**20
        model = getattr(backend, "model", None)
        tensors = [] if model is None else [*model.parameters(), *model.buffers()]
        cache = getattr(backend, "cache", None)
        if cache is not None:
            tensors += [cache.keys, cache.values]
        return _tensor_mib(tensors)

    def prompt_ids(self, question: str) -> list[int]:
        """The phi-2_v0 prompt's ids (one IMAGE_TOKEN_INDEX), as the product tokenises it."""
        return self.vlm.prompt_ids(question)

    def sample(self, frame: np.ndarray) -> dict[str, Any]:
        """A new frame and a question (whole prompt prefilled), then a second question about
        the same frame (its encoded image and KV prefix reused)."""
        from .model.generation import GenerationConfig

        self.vlm.prefix_cache.clear()  # nothing kept from the last repeat: a cold, whole prompt
        encoded = self.vlm.encode_image(frame)
        first = self.vlm.ask(encoded, QUESTION,
                             generation=GenerationConfig(max_new_tokens=self.new_tokens))
        again = self.vlm.ask(encoded, QUESTION_AGAIN, generation=GenerationConfig(max_new_tokens=1))
        if len(first.token_ids) != self.new_tokens:
            raise BenchError(f"{self.name} generated {len(first.token_ids)} tokens, not "
                             f"{self.new_tokens} ({first.finish_reason})")
        return {"vision_ms": encoded.vision_ms, "prefill_ms": first.prefill_ms,
                "ttft_ms": encoded.vision_ms + first.time_to_first_token_ms,
                "repeat_ttft_ms": again.time_to_first_token_ms,
                "decode_tok_s": first.decode_tokens_per_s,
                "prompt_positions": first.prompt_tokens,
                "prefilled_positions": first.prompt_tokens - first.reused_prefix_tokens,
                "repeat_prefilled_positions": again.prompt_tokens - again.reused_prefix_tokens,
                "token_ids": first.token_ids}

    def profiled(self, frame: np.ndarray, decode_steps: int) -> tuple[Any, Any, Any]:
        """Profiles of the backend calls encode_image() and ask() make: vision (preprocessing
        included), one whole-prompt prefill, then decode_steps greedy decode steps."""
        from .model.generation import embed_prompt

        backend = self.vlm.backend
        with _profiling() as vision:
            encoded = self.vlm.encode_image(frame)
        embeds = embed_prompt(backend, self.prompt_ids(QUESTION), encoded.features)  # (T, D)
        with _profiling() as prefill:
            logits = backend.prefill(embeds, 0)
            token = int(logits.argmax())
        with _profiling() as decode:
            for pos in range(embeds.shape[0], embeds.shape[0] + decode_steps):
                token = int(backend.decode_step(token, pos).argmax())
        self.vlm.prefix_cache.clear()  # the KV cache no longer holds what it recorded
        return vision, prefill, decode

    def close(self) -> None:
        """Free the backend (weights, caches, device memory) and a temporary export."""
        import shutil

        self.vlm.close()
        if self._export_dir is not None:
            shutil.rmtree(self._export_dir, ignore_errors=True)


class _TokenTimes:
    """A transformers streamer that timestamps every generated token (the prompt's put skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt's ids
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


class TransformersRunner:
    """Stock transformers on copies of the same weights: CLIPVisionModel + PhiForCausalLM with
    sdpa attention, LLaVA's recipe, stock generate (default dynamic cache, no compile)."""

    name = BASELINE

    def __init__(self, source: Source, s: BenchSettings, device: torch.device,
                 dtype: torch.dtype):
        import transformers
        from transformers import GenerationConfig as HFGenerationConfig

        from .model.transformers_reference import Reference

        if source.model is None:
            raise BenchError("the source weights were already handed to a backend")
        self.ref = Reference(source.model, attn_implementation="sdpa").to(device, dtype)
        self.device = device
        self.preprocess = source.preprocess
        self.new_tokens = s.new_tokens
        self.label = (f"{source.name}/transformers {transformers.__version__} (sdpa)/"
                      f"{str(dtype).removeprefix('torch.')}")
        # The model's own generation config names Phi's eos (id 2): generate would mask it for
        # min_new_tokens, changing the argmax. With no eos, exactly max_new_tokens come out.
        stock = self.ref.phi.generation_config
        stock.eos_token_id = stock.bos_token_id = stock.pad_token_id = None
        self.generation = HFGenerationConfig(max_new_tokens=s.new_tokens,
                                             min_new_tokens=s.new_tokens, do_sample=False)
        self.tokenizer = source.tokenizer

    def weights_mib(self) -> float:
        """Weights and buffers, as tensors hold them (the dynamic cache grows per request)."""
        modules = (self.ref.clip, self.ref.phi, self.ref.projector)
        return _tensor_mib([t for m in modules for t in (*m.parameters(), *m.buffers())])

    def prompt_ids(self, question: str) -> list[int]:
        """The product's prompt ids (template and tokenizer are shared, not measured)."""
        return tokenize_prompt(build_prompt(question), self.tokenizer, num_images=1)

    def _first_token(self, frame: np.ndarray, ids: list[int]) -> tuple[torch.Tensor, int, float,
                                                                         float, float]:
        """Preprocess + vision, then one forward over the whole prompt: (embeds (1, T, D), first
        token, vision ms, prefill ms, time to first token ms)."""
        start = time.perf_counter()
        pixels = torch.from_numpy(preprocess_image(frame, self.preprocess))[None]  # (1, 3, S, S)
        features = self.ref.image_features(pixels)  # (1, N, D)
        _sync(self.device)
        vision_ms = _ms(start)
        prefill_start = time.perf_counter()
        embeds = self.ref.embeds(ids, features)  # (1, T, D)
        # logits_to_keep=1: only the last position's logits, as generate's own prefill does
        out = self.ref.phi(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        prefill_ms = _ms(prefill_start)
        first = int(out.logits[0, -1].argmax())
        return embeds, first, vision_ms, prefill_ms, _ms(start)

    @torch.inference_mode()
    def sample(self, frame: np.ndarray) -> dict[str, Any]:
        """The product's two requests, stock: each recomputes vision and the whole prompt."""
        ids = self.prompt_ids(QUESTION)
        embeds, first, vision_ms, prefill_ms, ttft_ms = self._first_token(frame, ids)
        streamer = _TokenTimes()
        gen_start = time.perf_counter()
        out = self.ref.phi.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                            device=self.device),
            generation_config=self.generation, streamer=streamer)
        times = streamer.times
        token_ids = out[0, -self.new_tokens:].tolist()
        if len(times) != self.new_tokens or out.shape[1] != self.new_tokens:
            raise BenchError(f"transformers generated {len(times)} tokens, not {self.new_tokens}")
        again = self.prompt_ids(QUESTION_AGAIN)
        *_, repeat_ttft_ms = self._first_token(frame, again)
        positions = embeds.shape[1]
        return {"vision_ms": vision_ms, "prefill_ms": prefill_ms, "ttft_ms": ttft_ms,
                "repeat_ttft_ms": repeat_ttft_ms,
                "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
                "prompt_positions": positions, "prefilled_positions": positions,
                "repeat_prefilled_positions": positions + len(again) - len(ids),
                "generate_first_token_ms": _ms(gen_start, times[0]),
                "first_token_matches_generate": first == token_ids[0],
                "token_ids": token_ids}

    @torch.inference_mode()
    def profiled(self, frame: np.ndarray, decode_steps: int) -> tuple[Any, Any, Any]:
        """Profiles of vision (preprocessing included) and of the forwards stock generate
        makes: one whole-prompt prefill (default dynamic cache), then decode_steps greedy steps
        on that cache."""
        with _profiling() as vision:
            pixels = torch.from_numpy(preprocess_image(frame, self.preprocess))[None]
            features = self.ref.image_features(pixels)
        embeds = self.ref.embeds(self.prompt_ids(QUESTION), features)
        with _profiling() as prefill:
            out = self.ref.phi(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
        # transformers 5.24 names it cache (past_key_values deprecated); 5.17 (the GPU
        # machine's) has only past_key_values
        key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = {key: getattr(out, key)}
        with _profiling() as decode:
            for _ in range(decode_steps):
                out = self.ref.phi(input_ids=torch.tensor([[token]], device=self.device),
                                   **cache, use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].argmax())
        return vision, prefill, decode

    def close(self) -> None:
        """Drop the transformers modules."""
        del self.ref
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


Runner = ProductRunner | TransformersRunner


def split_variant(variant: str) -> tuple[str, str, int]:
    """A --backend entry: 'onnxruntime:int4:1' -> ('onnxruntime', 'int4', 1) (an export with
    int4 weights, MatMulNBits accuracy level 1); a bare name has float weights."""
    name, _, rest = variant.partition(":")
    weights, _, level = rest.partition(":")
    try:
        return name, weights or "float", int(level) if level else DEFAULT_ACCURACY_LEVEL
    except ValueError:
        return name, weights, -1


def decode_path(variant: str) -> str:
    """A torch --backend entry's decode path: 'torch:fused' -> 'fused'; bare 'torch': auto."""
    return variant.partition(":")[2] or "auto"


def resolve_device(s: BenchSettings) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype every backend uses; BenchError (exit 2) when unusable."""
    from .backends.base import BackendError
    from .backends.torch_backend import check_device, resolve_dtype

    try:
        device = check_device(s.device)
        return device, resolve_dtype(s.dtype, device.type)
    except BackendError as exc:
        raise BenchError(str(exc), EXIT_USAGE) from exc


def build_runners(s: BenchSettings, source: Source, names: Sequence[str]) -> list[Runner]:
    """One runner per name on the source's weights. The baseline copies them first; the last
    product backend takes the source model itself (it is cast in place), earlier ones copies."""
    import copy

    device, dtype = resolve_device(s)
    built: dict[str, Runner] = {}
    if BASELINE in names:
        start = time.perf_counter()
        built[BASELINE] = TransformersRunner(source, s, device, dtype)
        progress(f"built {BASELINE} in {time.perf_counter() - start:.1f} s")
    products = [n for n in names if n != BASELINE]
    for i, name in enumerate(products):
        start = time.perf_counter()
        last = i == len(products) - 1
        weights = source.model if last else copy.deepcopy(source.model)
        if last:
            source.model = None
        assert weights is not None
        built[name] = ProductRunner(name, source, weights, s)
        progress(f"built {name} in {time.perf_counter() - start:.1f} s")
    return [built[n] for n in names]


# ----- memory --------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise BenchError(f"/proc/self/status has no {field}")
    return int(match.group(1))


class PeakMemory:
    """Peak memory above a starting point. CUDA: torch.cuda.max_memory_allocated after a reset.
    CPU: anonymous resident memory (RssAnon: where tensors live; library code paged in from
    disk is file-backed and left out) sampled every 2 ms by a thread; the kernel's exact peak of
    the whole resident set (VmHWM, reset through /proc/self/clear_refs) is kept beside it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                       f"RssAnon sampled every {SAMPLE_S * 1000:.0f} ms")
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self._hwm_reset = False

    def current(self) -> int:
        """Bytes in use now (allocated on CUDA, anonymous resident on CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("RssAnon") * 1024

    def reset(self) -> None:
        """Start a new peak from the memory in use now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
            self._hwm_reset = True
        except OSError as exc:
            progress(f"cannot reset VmHWM ({exc}); only RssAnon is sampled")
        self._sampled = self.current()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sampled = max(self._sampled, self.current())

    def peak(self) -> int:
        """The highest memory in use since reset()."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        return max(self._sampled, self.current())

    def peak_rss(self) -> int | None:
        """VmHWM since reset() (CPU, where the reset is allowed): all resident pages."""
        return _status_kib("VmHWM") * 1024 if self._hwm_reset else None


def measure_peak_memory(s: BenchSettings, name: str) -> dict[str, Any]:
    """One backend alone in this (fresh) process: its weights are built, the source they were
    copied from freed, then the peak is taken over one request pair (new frame, then the same
    frame again) and reported above the memory in use before any weights existed. So weights,
    KV caches and activations count; the source the weights were copied from does not, nor
    do imports and one-time initialisation (a random-tiny run of the same backend first)."""
    device, _ = resolve_device(s)
    if s.threads:
        torch.set_num_threads(s.threads)
    tiny = replace(s, config="random-tiny", model_dir=None, layers=None)
    runner = build_runners(tiny, build_source(tiny), [name])[0]
    runner.sample(make_frame("336"))  # imports every module the backend's path needs
    runner.close()
    del runner
    meter = PeakMemory(device)
    gc.collect()
    before = meter.current()
    rss_before = _status_kib("VmRSS") * 1024 if device.type == "cpu" else 0
    source = build_source(s)
    runner = build_runners(s, source, [name])[0]
    del source
    gc.collect()
    resident = meter.current() - before
    meter.reset()
    frame = make_frame(s.image, s.seed)
    for _ in range(MEMORY_REQUESTS):
        runner.sample(frame)
    peak = meter.peak() - before
    peak_rss = meter.peak_rss()
    runner.close()
    return {"peak_mib": peak / 2**20, "resident_after_build_mib": resident / 2**20,
            "peak_rss_mib": None if peak_rss is None else (peak_rss - rss_before) / 2**20,
            "method": f"{meter.method} over {MEMORY_REQUESTS} request pairs in a fresh child "
                      f"process ({', '.join(f'{k}={v}' for k, v in CHILD_MALLOC_ENV.items())}), "
                      "above its memory before the weights"}


def _memory_child(s: BenchSettings, name: str, conn: Any) -> None:
    try:
        conn.send(("ok", measure_peak_memory(s, name)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def peak_memory_in_child(s: BenchSettings, name: str) -> dict[str, Any]:
    """measure_peak_memory in a spawned process, so no other backend's memory (or what the
    allocator kept of it) is there; {"error": ...} when the child fails."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(s, name, child), daemon=True)
    saved = {k: os.environ.get(k) for k in CHILD_MALLOC_ENV}
    os.environ.update(CHILD_MALLOC_ENV)  # the spawned interpreter's glibc reads them at start
    try:
        proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", "the child process died without a result"
    proc.join()
    if status != "ok":
        progress(f"peak memory of {name} not measured: {value} (exit code {proc.exitcode})")
        return {"error": value}
    return value


# ----- the run -------------------------------------------------------------------------------
def describe_sample(name: str, sample: dict[str, Any]) -> str:
    """One progress line's numbers."""
    return (f"{name}: vision {sample['vision_ms']:.0f} ms, prefill {sample['prefill_ms']:.0f} ms, "
            f"first token {sample['ttft_ms']:.0f} ms, again {sample['repeat_ttft_ms']:.0f} ms, "
            f"decode {sample['decode_tok_s']:.2f} tok/s")


def run_interleaved(runners: Sequence[Runner], frame: np.ndarray, repeats: int,
                    warmup: int) -> dict[str, list[dict[str, Any]]]:
    """Every backend once per repeat, in turn (A, B, A, B, ...); warm-up samples are flagged."""
    samples: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runners}
    total = warmup + repeats
    for i in range(total):
        tag = f"warm-up {i + 1}/{warmup}" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
        for runner in runners:
            sample = runner.sample(frame) | {"warmup": i < warmup, "round": i}
            samples[runner.name].append(sample)
            progress(f"[{tag}] {describe_sample(runner.name, sample)}")
    return samples


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every timed metric over the measured (not warm-up) samples."""
    measured = [x for x in samples if not x["warmup"]]
    out = {}
    for key in TIMED:
        values = [float(x[key]) for x in measured]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def ratio(metric: Metric, backend: float | None, baseline: float | None) -> float | None:
    """How many times better than the baseline (> 1: better): ms and MiB baseline / backend,
    tokens/s backend / baseline."""
    if backend is None or baseline is None or backend <= 0 or baseline <= 0:
        return None
    return backend / baseline if metric.higher_is_better else baseline / backend


def paired_ratios(samples: Sequence[dict[str, Any]],
                  baseline: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each repeat's ratio against the baseline's sample of the same repeat (they ran back to
    back, so a slow spell of the machine hits both): median, min, max per timed metric."""
    out = {}
    for metric in METRICS:
        if metric.key not in TIMED:
            continue
        values = [ratio(metric, a[metric.key], b[metric.key])
                  for a, b in zip(samples, baseline, strict=True) if not a["warmup"]]
        values = [v for v in values if v is not None]
        if values:
            out[metric.key] = {"median": statistics.median(values), "min": min(values),
                               "max": max(values)}
    return out


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model and count, torch threads, GPU name, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError as exc:
        progress(f"cannot read /proc/cpuinfo: {exc}")
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                            "cpus_usable": len(os.sched_getaffinity(0))
                            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "gpu": None}
    try:
        info["memory_gib"] = round(_status_mem_total() / 2**30, 1)
    except (OSError, BenchError) as exc:
        progress(f"cannot read the memory size: {exc}")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _status_mem_total() -> int:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    if match is None:
        raise BenchError("/proc/meminfo has no MemTotal")
    return int(match.group(1)) * 1024


def versions() -> dict[str, Any]:
    """torch, transformers, numpy, Python, and the git commit of the source tree (dirty: with
    uncommitted changes to tracked files)."""
    out: dict[str, Any] = {"torch": torch.__version__, "numpy": np.__version__,
                                  "python": platform.python_version(), "transformers": None}
    if find_spec("transformers") is not None:
        import transformers

        out["transformers"] = transformers.__version__
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10,
            check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None  # not a git checkout (an installed wheel)
    return out


def check_memory_fits(s: BenchSettings, cfg: LlavaPhiConfig) -> None:
    """Refuse a CPU run whose fp32 weight copies (one per backend) cannot fit the memory
    available now, before spending minutes building them."""
    if s.device != "cpu":
        return
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return  # not Linux: let the run try
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    if match is None:
        return
    with torch.device("meta"):  # shapes only, no memory
        n_params = sum(p.numel() for p in LlavaPhiForCausalLM(cfg).parameters())
    copies = max(2 if BASELINE in s.backends else 1, len(s.backends))
    needed = n_params * 4 * copies * 1.2  # + 20% for caches and activations
    available = int(match.group(1)) * 1024
    if needed > available:
        raise BenchError(f"{cfg.text.num_hidden_layers} decoder layers need about "
                         f"{needed / 2**30:.1f} GiB ({copies} fp32 weight copies); "
                         f"{available / 2**30:.1f} GiB are available (try --layers 4)")


def run_bench(args: argparse.Namespace) -> int:
    """`llava-phi bench`: build, measure interleaved, report (table, JSON, plot)."""
    s = settings_from_args(args)
    if s.threads:
        torch.set_num_threads(s.threads)
    device, dtype = resolve_device(s)
    cfg = resolve_config(s)
    check_memory_fits(s, cfg)
    progress(f"building the weights ({s.model_dir or s.config}, "
             f"{cfg.text.num_hidden_layers} decoder layers)")
    start = time.perf_counter()
    source = build_source(s)
    assert source.model is not None
    counts = parameter_counts(source.model)
    weight_bytes = decode_weight_bytes(source.model, dtype)
    progress(f"{counts['total'] / 1e9:.3f} B parameters in {time.perf_counter() - start:.1f} s")
    prompt_ids = tokenize_prompt(build_prompt(QUESTION), source.tokenizer, num_images=1)
    positions = len(prompt_ids) - 1 + cfg.num_image_tokens
    max_context = cfg.text.max_position_embeddings
    if positions + s.new_tokens > max_context:
        raise BenchError(f"the prompt ({positions} positions) and {s.new_tokens} new tokens do not "
                         f"fit the context of {max_context}", EXIT_USAGE)
    frame = make_frame(s.image, s.seed)
    runners = build_runners(s, source, s.backends)
    info = {"name": source.name, "weights": source.weights,
            "decoder_layers": cfg.text.num_hidden_layers,
            "vision_layers": cfg.vision.num_hidden_layers, "parameters": counts,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "image": s.image, "frame_size": list(IMAGES[s.image]),
            "vision_input": cfg.vision.image_size, "image_positions": cfg.num_image_tokens,
            "prompt_positions": positions, "new_tokens": s.new_tokens, "repeats": s.repeats,
            "warmup": s.warmup, "max_context": max_context,
            "questions": [QUESTION, QUESTION_AGAIN],
            "tokenizer": ("byte-level, 257 ids: prompt lengths are byte counts (the image's "
                          f"{cfg.num_image_tokens} positions dominate)") if source.byte_tokenizer
            else "the checkpoint's"}
    del source
    gc.collect()
    try:
        samples = run_interleaved(runners, frame, s.repeats, s.warmup)
        labels = {r.name: r.label for r in runners}
        weights = {r.name: r.weights_mib() for r in runners}
        if s.profile_path:
            write_profile(runners, frame, Path(s.profile_path), s.command_line())
    finally:
        for runner in runners:
            runner.close()
        del runners
        gc.collect()
    ceiling = None
    if s.ceiling:
        progress("copy bandwidth (1 GiB device copies) and the decode ceiling")
        copy = copy_bandwidth(device)
        ceiling = {"copy": copy, "decode_weight_bytes": weight_bytes,
                   "decode_ceiling_tok_s": decode_ceiling(copy["bandwidth_gb_s"], weight_bytes)}
    memory = {}
    if s.memory:
        for name in s.backends:
            progress(f"peak memory of {name} (child process)")
            memory[name] = peak_memory_in_child(s, name)
    report = build_report(s, info, samples, labels, weights, memory, machine_info(device),
                          ceiling)
    print(format_report(report))
    if s.json_path:
        path = Path(s.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        progress(f"wrote {path}")
    if s.plot_path:
        write_plot(report, Path(s.plot_path))
        progress(f"wrote {s.plot_path}")
    return 0


def build_report(s: BenchSettings, info: dict[str, Any],
                 samples: dict[str, list[dict[str, Any]]], labels: dict[str, str],
                 weights: dict[str, float], memory: dict[str, dict[str, Any]],
                 machine: dict[str, Any], ceiling: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The JSON document: settings, machine, versions, medians, ratios and every sample."""
    backends: dict[str, Any] = {}
    for name in s.backends:
        stats = summarize(samples[name])
        peak = memory.get(name, {}).get("peak_mib")
        if peak is not None:
            stats["peak_memory_mb"] = {"median": peak, "min": peak, "max": peak}
        measured = [x["token_ids"] for x in samples[name] if not x["warmup"]]
        backends[name] = {"label": labels[name], "weights_mib": weights[name],
                          "medians": {k: v["median"] for k, v in stats.items()},
                          "stats": stats, "memory": memory.get(name),
                          "deterministic": all(t == measured[0] for t in measured),
                          "token_ids": measured[0], "samples": samples[name]}
    ratios: dict[str, dict[str, float | None]] = {}
    paired: dict[str, dict[str, dict[str, float]]] = {}
    tokens: dict[str, Any] = {}
    if BASELINE in backends:
        base = backends[BASELINE]
        for name in s.backends:
            if name == BASELINE:
                continue
            ratios[name] = {m.key: ratio(m, backends[name]["medians"].get(m.key),
                                         base["medians"].get(m.key)) for m in METRICS}
            paired[name] = paired_ratios(samples[name], samples[BASELINE])
            diverge = first_divergence(backends[name]["token_ids"], base["token_ids"])
            tokens[name] = {"same_as_baseline": diverge is None, "first_divergence": diverge}
    return {"schema": 1, "command": s.command_line(), "argv": sys.argv,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": info, "machine": machine, "versions": versions(),
            "metrics": [asdict(m) for m in METRICS], "baseline": BASELINE,
            "backends": backends, "ratios": ratios, "paired_ratios": paired,
            "greedy_tokens": tokens, "ceiling": with_shares(ceiling, backends),
            "notes": report_notes(s, info)}


def with_shares(ceiling: dict[str, Any] | None,
                backends: dict[str, Any]) -> dict[str, Any] | None:
    """The ceiling with each backend's decode tokens/s as a fraction of it."""
    if ceiling is None:
        return None
    limit = ceiling["decode_ceiling_tok_s"]
    return ceiling | {"fraction_of_ceiling": {
        n: b["medians"]["decode_tok_s"] / limit for n, b in backends.items()}}


def report_notes(s: BenchSettings, info: dict[str, Any]) -> list[str]:
    """What the table's numbers mean."""
    notes = [
        f"ratio = how many times better than {BASELINE} (> 1: better): ms and MiB "
        f"{BASELINE}/backend, tokens/s backend/{BASELINE}; of the medians, and in brackets the "
        "median of each repeat's own ratio (the two samples of a repeat ran back to back)",
        f"medians of {s.repeats} repeats after {s.warmup} warm-up; backends interleaved repeat by "
        "repeat on the same weights, frame and questions",
        ("vision: the product's preprocessing (bit-exact with CLIPImageProcessor) on both sides"
         if s.preprocess == "exact" else
         "vision: the torch backends preprocess on their device (preprocess_device.py, within "
         f"{DEVICE_TOLERANCE_LEVELS} uint8 levels of the exact path), the others on the CPU, "
         "bit-exact with CLIPImageProcessor") +
        ", then the tower and projector; stock CLIPVisionModel also runs its last layer, which "
        "LLaVA's hidden_states[-2] discards",
        "prefill: the whole prompt (the product's prefix cache is cleared first); "
        f"{BASELINE}: one forward over inputs_embeds with logits_to_keep=1, as its generate does",
        "repeated-frame time to first token: the same frame asked a second question; the product "
        "reuses the encoded image and its KV prefix and prefills only the question; stock "
        f"{BASELINE} has no cross-call cache and recomputes vision and the whole prompt",
        f"decode: {s.new_tokens} tokens forced on every side (no stop token), greedy; tokens/s "
        f"over the {s.new_tokens - 1} steps after the first token; {BASELINE}: stock generate "
        "(dynamic cache), timed by a streamer",
        "peak memory: one backend alone in a fresh child process (weights, KV cache, "
        f"activations): anonymous resident memory sampled every {SAMPLE_S * 1000:.0f} ms over "
        f"{MEMORY_REQUESTS} request pairs, above the child's memory before the weights; the "
        "child's glibc returns freed blocks at once, so what earlier requests left in the "
        "allocator does not count",
        f"prompt: {info['prompt_positions']} positions; tokenizer: {info['tokenizer']}",
    ]
    return notes


def _fmt(metric: Metric, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.unit == "tokens/s":
        return f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The stdout summary: one line of settings, a Markdown table, the notes."""
    c, m = report["config"], report["machine"]
    names = list(report["backends"])
    others = [n for n in names if n != BASELINE and BASELINE in names]
    where = m["gpu"] or f"{m['cpu']}, {m['cpus_usable']} CPUs, {m['torch_threads']} torch threads"
    head = (f"{c['name']}: {c['decoder_layers']} decoder layers, vision {c['vision_layers']} "
            f"layers, {c['parameters']['total'] / 1e9:.3f} B parameters ({c['weights']}); "
            f"{c['dtype']} on {c['device']} ({where}); frame {c['frame_size'][0]}x"
            f"{c['frame_size'][1]}; prompt {c['prompt_positions']} positions; "
            f"{c['new_tokens']} new tokens")
    cols = ["metric", *names, *[f"{n} vs {BASELINE}" for n in others]]
    lines = [head, "", "| " + " | ".join(cols) + " |",
             "|" + "---|" + "---:|" * (len(cols) - 1)]
    for metric in METRICS:
        row = [f"{metric.label}, {metric.unit}"]
        row += [_fmt(metric, report["backends"][n]["medians"].get(metric.key)) for n in names]
        for n in others:
            r = report["ratios"][n][metric.key]
            pair = report["paired_ratios"][n].get(metric.key)
            row.append(("n/a" if r is None else f"{r:.2f}x") + (
                "" if pair is None else f" ({pair['median']:.2f}x)"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    ceiling = report.get("ceiling")
    if ceiling is not None:
        shares = ", ".join(f"{n} {f:.1%}" for n, f in ceiling["fraction_of_ceiling"].items())
        lines.append(f"- decode ceiling: {ceiling['copy']['bandwidth_gb_s']:,.0f} GB/s copy "
                     f"bandwidth (read + write of a {ceiling['copy']['bytes'] / 2**30:.0f} GiB "
                     f"copy) / {ceiling['decode_weight_bytes'] / 1e9:.4g} GB of weights per "
                     f"token = {ceiling['decode_ceiling_tok_s']:,.1f} tokens/s; reached: "
                     f"{shares}")
    for n, t in report["greedy_tokens"].items():
        lines.append(f"- greedy tokens of {n} and {BASELINE}: " + (
            "identical" if t["same_as_baseline"] else f"differ from token {t['first_divergence']}"))
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


def write_profile(runners: Sequence[Runner], frame: np.ndarray, path: Path,
                  command: str, rows: int = 25) -> None:
    """torch.profiler's top ops by self CPU time, tables per backend and part, in a text file."""
    sections = [f"# {command}", f"# per backend: vision (preprocessing included), one "
                f"whole-prompt prefill, then {PROFILE_DECODE_STEPS} greedy decode steps; ops "
                "sorted by self CPU time", ""]
    for runner in runners:
        progress(f"profiling {runner.name}")
        for part, prof in zip(("vision", "prefill", f"{PROFILE_DECODE_STEPS} decode steps"),
                              runner.profiled(frame, PROFILE_DECODE_STEPS), strict=True):
            sections += [f"## {runner.name}: {part} ({runner.label})",
                         prof.key_averages().table(sort_by="self_cpu_time_total",
                                                   row_limit=rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sections))
    progress(f"wrote {path}")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """One bar chart per metric, the backends side by side (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    names = list(report["backends"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        values = [report["backends"][n]["medians"].get(metric.key) for n in names]
        heights = [0.0 if v is None or math.isnan(v) else v for v in values]
        bars = ax.bar(names, heights, color=colors[:len(names)])
        for bar, name, value in zip(bars, names, values, strict=True):
            text = _fmt(metric, value)
            r = report["ratios"].get(name, {}).get(metric.key)
            if r is not None:
                text += f"\n{r:.2f}x"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{metric.label}\n{metric.unit} ({better} is better)", fontsize=10)
        ax.margins(y=0.25)
    c = report["config"]
    fig.suptitle(f"{c['name']}, {c['decoder_layers']} decoder layers, {c['dtype']} on "
                 f"{c['device']}, frame {c['frame_size'][0]}x{c['frame_size'][1]}: medians of "
                 f"{c['repeats']} (ratio vs {BASELINE})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["BenchError", "BenchSettings", "METRICS", "add_bench_arguments", "run_bench",
           "settings_from_args"]
