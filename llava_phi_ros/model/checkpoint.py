"""Checkpoint directories: read every supported layout, verify it, write the canonical one.

Layouts (chosen by config.json `model_type`), all mapped to the model's own state_dict keys:
- `llava_phi` (original LLaVA-Phi, also the project's canonical layout): keys as the model's;
  LLaVA-1.5's extra level `model.vision_tower.vision_tower.vision_model.*` is mapped away.
- `llava` (transformers LlavaForConditionalGeneration with a Phi text_config), two key styles:
  transformers >= 4.52 in memory (`model.language_model.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.linear_{1,2}.*`, `lm_head.*`) and the older style that
  `save_pretrained` still writes (`language_model.model.*`, `language_model.lm_head.*`,
  `vision_tower.*`, `multi_modal_projector.*`). The CLIP keys carry a `vision_model.` level up to
  transformers 4.x and none from transformers 5 (CLIPVisionModel dropped it); both are read.

Weight files: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
pytorch_model.bin.index.json (shards). Every key, shape and dtype is checked against the model
that the config describes before anything is built, from tensor metadata alone (safetensors
headers, parsed and validated here; a .bin's memory-mapped torch.load); all problems are reported
together. Only a stored CLIP position_ids buffer and lm_head.bias are read for the checks.

Memory: load_model builds the model on the meta device and reads one tensor at a time (straight
into the new parameter, or through one reused staging buffer when it is cast or moved), so for
safetensors host memory peaks at about the loaded model plus its largest tensor, not twice the
weights (benchmarks/bench_load_memory.py measures it). Parameters own their memory: none is a
view of a file mmap. convert_checkpoint streams the same way; the writers write safetensors one
tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import ConfigError, LlavaPhiConfig
from .llava_phi import LlavaPhiForCausalLM
from .preprocess import ImagePreprocessConfig, PreprocessConfigError
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Looked for in this order: the first one present is read.
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)

LAYOUT_ORIGINAL = "llava_phi"
LAYOUT_HF_NEW = "llava_hf_new"
LAYOUT_HF_OLD = "llava_hf_old"
LAYOUT_DESCRIPTIONS = {
    LAYOUT_ORIGINAL: "original LLaVA-Phi",
    LAYOUT_HF_NEW: "transformers llava (>= 4.52 keys)",
    LAYOUT_HF_OLD: "transformers llava (pre-4.52 / save_pretrained keys)",
}

DEFAULT_PROGRESS_THRESHOLD_BYTES = 200 * 1024**2
_MAX_NAMES = 50  # problems named per category in a message; the exception keeps them all

_VISION = "model.vision_tower.vision_model."
_POSITION_IDS = _VISION + "embeddings.position_ids"
_LLAVA15_VISION = "model.vision_tower.vision_tower."


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read, or does not match its config."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """A config.json that does not describe a LLaVA-Phi model (also a ConfigError)."""


class CheckpointMismatchError(CheckpointError):
    """Weights that do not match the model their config describes; every problem is kept."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loader read: directory, layout, weight files, stored dtypes."""

    path: Path
    layout: str  # one of LAYOUT_DESCRIPTIONS
    weight_format: str  # "safetensors" or "bin"
    files: tuple[str, ...]  # file names read, the index first when sharded
    dtypes: tuple[str, ...]  # dtypes the tensors are stored in, e.g. ("bfloat16",)
    num_parameters: int
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        files = self.files[0] if len(self.files) == 1 else \
            f"{self.files[0]} + {len(self.files) - 1} shards"
        text = (f"{self.path}: {LAYOUT_DESCRIPTIONS.get(self.layout, self.layout)} layout, "
                f"{files}, {'/'.join(self.dtypes)}, {self.num_parameters / 1e6:.1f}M parameters")
        return text + "".join(f"; {n}" for n in self.notes)


# ----- key mapping ---------------------------------------------------------------------------
def _original_to_canonical(key: str) -> str | None:
    """Original layout -> model key (LLaVA-1.5's `vision_tower.vision_tower.` level removed)."""
    if key.startswith(_LLAVA15_VISION):
        return "model.vision_tower." + key[len(_LLAVA15_VISION):]
    return key


def _hf_to_canonical(key: str) -> str | None:
    """transformers llava key (either style) -> model key; None when it has no place."""
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return "model.vision_tower." + (rest if rest.startswith("vision_model.")
                                            else "vision_model." + rest)
    for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):
        if key.startswith(prefix):
            name, _, rest = key[len(prefix):].partition(".")
            index = {"linear_1": "0", "linear_2": "2"}.get(name)
            return None if index is None or not rest else f"model.mm_projector.{index}.{rest}"
    for prefix, target in (("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                           ("language_model.model.", "model."),
                           ("model.language_model.", "model.")):
        if key.startswith(prefix):
            return target + key[len(prefix):]
    return None


def _canonical_to_hf(key: str, key_style: str, clip_vision_model_level: bool) -> str:
    """Model key -> transformers llava key in `key_style` ("new" or "old")."""
    new = key_style == "new"
    if key.startswith("lm_head."):
        return key if new else "language_model." + key
    if key.startswith(_VISION):
        level = "vision_model." if clip_vision_model_level else ""
        return ("model." if new else "") + "vision_tower." + level + key[len(_VISION):]
    if key.startswith("model.mm_projector."):
        index, _, rest = key[len("model.mm_projector."):].partition(".")
        name = {"0": "linear_1", "2": "linear_2"}[index]
        return ("model." if new else "") + f"multi_modal_projector.{name}.{rest}"
    rest = key[len("model."):]
    return ("model.language_model." if new else "language_model.model.") + rest


def _hf_key_style(keys: list[str]) -> tuple[str, bool]:
    """("new" or "old", whether CLIP keys have a `vision_model.` level) of llava keys."""
    new = any(k.startswith(("model.", "lm_head.")) for k in keys)
    level = any(".vision_tower.vision_model." in "." + k for k in keys)
    return ("new" if new else "old"), level


# ----- reading -------------------------------------------------------------------------------
def _read_config(d: Path) -> tuple[LlavaPhiConfig, str]:
    """Parse config.json: the config and its model_type."""
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    path = d / CONFIG_FILE
    if not path.is_file():
        empty = "" if any(d.iterdir()) else " (the directory is empty)"
        raise CheckpointError(f"{d}: no {CONFIG_FILE}{empty}")
    raw = _read_json_object(path)
    try:
        return LlavaPhiConfig.from_dict(raw), str(raw.get("model_type"))
    except ConfigError as exc:
        raise CheckpointConfigError(f"{path}: {exc}") from exc


def read_config(model_dir: str | Path) -> LlavaPhiConfig:
    """The LlavaPhiConfig of a checkpoint directory (either config layout)."""
    return _read_config(Path(model_dir))[0]


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse the index: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: no weight_map of tensor name -> shard file")
    outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
    if outside:
        raise CheckpointError(f"{path}: names shard files outside the directory: "
                              f"{', '.join(outside)}")
    return weight_map


def _find_weights(d: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, files to read (index first when sharded), weight_map or None)."""
    for name in WEIGHT_FILES:
        path = d / name
        if not path.is_file():
            continue
        fmt = "safetensors" if name.startswith(SAFETENSORS_FILE) else "bin"
        if not name.endswith(".index.json"):
            return fmt, [path], None
        weight_map = _read_index(path)
        shards = list(dict.fromkeys(weight_map.values()))
        absent = [s for s in shards if not (d / s).is_file()]
        if absent:
            raise CheckpointError(f"{path}: names shard files that do not exist: "
                                  f"{', '.join(absent)}")
        return fmt, [path] + [d / s for s in shards], weight_map
    raise CheckpointError(f"{d}: no weight files (looked for {', '.join(WEIGHT_FILES)})")


# safetensors dtype names -> torch dtypes, in safetensors' own order of the names (its writer
# stores the tensors of later names first; _write_safetensors does the same). Names this torch
# has no dtype for are left out (F4, F6_*; uint16/32/64 are torch >= 2.3).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E8M0", "float8_e8m0fnu"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("I16", "int16"),
        ("U16", "uint16"), ("F16", "float16"), ("BF16", "bfloat16"), ("I32", "int32"),
        ("U32", "uint32"), ("F32", "float32"), ("C64", "complex64"), ("F64", "float64"),
        ("I64", "int64"), ("U64", "uint64"))
    if hasattr(torch, attr)}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses bigger headers too


@dataclass(frozen=True)
class _Stored:
    """One tensor as a weight file stores it: what verification needs, without its data."""

    name: str  # as stored
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Path
    offset: int = -1  # absolute byte offset of the data in a .safetensors file; -1 for .bin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _safetensors_header(path: Path) -> dict[str, _Stored]:
    """The tensors of one .safetensors file (sorted by name), from its header alone.

    The header is checked as the safetensors library checks it: known dtypes, byte sizes equal
    to dtype x shape, data ranges that tile the data section exactly (no gap, no overlap) and end
    where the file ends. Nothing past the header is read.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors file: {why}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise corrupt(f"a header of {n} bytes in a file of {size} bytes")
            text = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(text.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise corrupt(f"the header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise corrupt("__metadata__ is not a JSON object")

    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, _Stored] = {}
    spans: list[tuple[int, int, str]] = []
    for name in sorted(header):
        entry = header[name]
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ints = [*shape, begin, end]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name}: not a {{dtype, shape, data_offsets}} entry: "
                          f"{str(entry)[:200]}") from None
        if not all(type(x) is int and x >= 0 for x in ints) or begin > end:
            raise corrupt(f"tensor {name}: bad shape {shape} or data_offsets {[begin, end]}")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise corrupt(f"tensor {name}: unsupported dtype {dtype_name!r}")
        stored = _Stored(name, tuple(shape), dtype, path, data_start + begin)
        if end - begin != stored.nbytes:
            raise corrupt(f"tensor {name}: data_offsets {[begin, end]} hold {end - begin} bytes, "
                          f"but shape {list(shape)} of {dtype_name} needs {stored.nbytes}")
        out[name] = stored
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise corrupt(f"tensor {name}: data starts at byte {begin} of the data section, "
                          f"expected {position} ({'overlap' if begin < position else 'gap'})")
        position = end
    if position != data_size:
        raise corrupt(f"the header describes {position} bytes of tensor data, the file holds "
                      f"{data_size}" + (" (truncated?)" if position > data_size else ""))
    return out


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one PyTorch .bin file: weights_only, memory-mapped when zip-serialised.

    A memory-mapped tensor's data is read from disk only when it is touched.
    """
    try:
        # mmap needs the zip serialisation (torch >= 1.6 default); legacy files are read whole.
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or unsafe PyTorch .bin file: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                              ) from exc
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict of tensor name -> tensor")
    return obj


class _WeightSource:
    """Reads one stored tensor at a time: safetensors by offset, .bin from torch.load's mmap.

    A safetensors tensor is read with readinto straight into a new CPU tensor (no mmap, so no
    file pages stay mapped into the process). A .bin tensor is the torch.load tensor itself
    (memory-mapped for zip files, in memory for legacy ones): callers that keep it copy it.
    """

    def __init__(self, bins: dict[Path, dict[str, torch.Tensor]]):
        self._bins = bins
        self._files: dict[Path, Any] = {}

    def read(self, stored: _Stored, staging: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor as stored (dtype and shape), on the CPU.

        A safetensors tensor is read into a new tensor, or into the front of `staging` (a uint8
        CPU tensor of at least stored.nbytes) when given: the result is then a view of it.
        """
        if stored.offset < 0:
            return self._bins[stored.path][stored.name]
        raw = torch.empty(stored.nbytes, dtype=torch.uint8) if staging is None \
            else staging[:stored.nbytes]
        view = memoryview(raw.numpy())
        try:
            f = self._files.get(stored.path)
            if f is None:
                f = self._files[stored.path] = open(stored.path, "rb", buffering=0)  # noqa: SIM115
            f.seek(stored.offset)
            done = 0
            while done < stored.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(
                        f"{stored.path}: corrupt safetensors file: it ends inside tensor "
                        f"{stored.name} (was it changed while being read?)")
                done += got
        except OSError as exc:
            raise CheckpointError(f"{stored.path}: cannot read: {exc}") from exc
        return raw.view(stored.dtype).reshape(stored.shape)

    def release(self, stored: _Stored) -> None:
        """Drop this source's reference to a .bin tensor (a legacy file's memory goes with it)."""
        if stored.offset < 0:
            self._bins[stored.path].pop(stored.name, None)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bins.clear()  # a .bin file's mmap is unmapped once no tensor of it is left

    def __enter__(self) -> _WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan_weights(d: Path) -> tuple[str, list[Path], dict[str, _Stored], _WeightSource]:
    """Every tensor of the directory's weight files, keyed as stored, described but not read."""
    fmt, files, weight_map = _find_weights(d)
    data_files = files[1:] if weight_map is not None else files
    stored: dict[str, _Stored] = {}
    where: dict[str, str] = {}
    bins: dict[Path, dict[str, torch.Tensor]] = {}
    for path in data_files:
        if fmt == "safetensors":
            part = _safetensors_header(path)
        else:
            bins[path] = _read_bin(path)
            part = {k: _Stored(k, tuple(t.shape), t.dtype, path) for k, t in bins[path].items()}
        twice = sorted(k for k in part if k in stored)
        if twice:
            raise CheckpointError(f"{path}: tensors also stored in {where[twice[0]]}: "
                                  f"{_names(twice)}")
        stored.update(part)
        where.update(dict.fromkeys(part, path.name))
    if weight_map is not None:
        lost = sorted(k for k, shard in weight_map.items() if where.get(k) != shard)
        if lost:
            raise CheckpointError(f"{files[0]}: tensors not found in the shard the index names: "
                                  + ", ".join(f"{k} ({weight_map[k]})" for k in lost[:_MAX_NAMES]))
    return fmt, files, stored, _WeightSource(bins)


# ----- verification --------------------------------------------------------------------------
def _names(items: list[str]) -> str:
    """A comma-separated list, cut after _MAX_NAMES with a count of the rest."""
    more = len(items) - _MAX_NAMES
    return ", ".join(items[:_MAX_NAMES]) + (f", ... and {more} more" if more > 0 else "")


def expected_shapes(cfg: LlavaPhiConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of the model `cfg` describes, with its shape (built on meta)."""
    with torch.device("meta"):
        model = LlavaPhiForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _map_and_verify(raw: dict[str, _Stored], cfg: LlavaPhiConfig, model_type: str, d: Path,
                    read: Callable[[_Stored], torch.Tensor],
                    ) -> tuple[dict[str, _Stored], str, list[str]]:
    """Map stored keys to model keys and check them all: (model key -> stored, layout, notes).

    Works on the tensors' metadata; `read` is called only for a position_ids buffer of the
    right size and a correctly shaped lm_head.bias (both a few hundred kB at most).
    """
    keys = list(raw)
    notes: list[str] = []
    if model_type == "llava":
        key_style, clip_level = _hf_key_style(keys)
        layout = LAYOUT_HF_NEW if key_style == "new" else LAYOUT_HF_OLD
        to_canonical = _hf_to_canonical
        stored_name = partial(_canonical_to_hf, key_style=key_style,
                              clip_vision_model_level=clip_level)
        if not clip_level:
            notes.append("CLIP keys without a vision_model. level (transformers >= 5)")
    else:
        layout, to_canonical, stored_name = LAYOUT_ORIGINAL, _original_to_canonical, str
        if any(k.startswith(_LLAVA15_VISION) for k in keys):
            notes.append("mapped LLaVA-1.5 model.vision_tower.vision_tower.* keys")

    expected = expected_shapes(cfg)
    state: dict[str, _Stored] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    problems: list[str] = []
    for key, tensor in raw.items():
        canonical = to_canonical(key)
        if canonical is None:
            unexpected.append(key)
        elif canonical in state:
            problems.append(f"{source[canonical]} and {key} both map to {canonical}")
        else:
            state[canonical], source[canonical] = tensor, key

    # Old CLIP checkpoints (transformers < 4.31) persisted the position_ids buffer. It is
    # arange(num_positions), which the model computes itself: harmless, so check it and drop it.
    if _POSITION_IDS in state:
        ids, n = state.pop(_POSITION_IDS), cfg.vision.num_patches + 1
        if ids.numel == n and len(ids.shape) <= 2 and not ids.dtype.is_floating_point \
                and torch.equal(read(ids).flatten().long(), torch.arange(n)):
            notes.append(f"dropped {source[_POSITION_IDS]} (equal to arange({n}))")
        else:
            unexpected.append(f"{source[_POSITION_IDS]} (a position_ids buffer that is not "
                              f"arange({n}): shape {ids.shape}, dtype {ids.dtype})")

    bias = state.get("lm_head.bias")
    if bias is not None and bias.dtype.is_floating_point \
            and bias.shape == expected.get("lm_head.bias") and not read(bias).any():
        notes.append("lm_head.bias is all zeros: Phi-2's is not, so it was probably dropped and "
                     "re-created on the way (transformers 4.48.0 or >= 4.52 llava)")
    unexpected += [source[k] for k in state if k not in expected]
    missing = [stored_name(k) for k in expected if k not in state]
    mismatched = [
        f"{source[k]} (expected {expected[k]}, found {state[k].shape})"
        for k in expected if k in state and state[k].shape != expected[k]]
    mismatched += [f"{source[k]} (dtype {state[k].dtype} is not floating point)"
                   for k in expected if k in state and not state[k].dtype.is_floating_point]

    bias_trap = layout != LAYOUT_ORIGINAL and "lm_head.bias" not in state
    if bias_trap:
        bias_name = stored_name("lm_head.bias")
        missing.remove(bias_name)
        problems.append(
            f"missing {bias_name}: this transformers-llava checkpoint has no lm_head bias, which "
            "is what transformers >= 4.52 LlavaForConditionalGeneration saves (it builds lm_head "
            "without bias, so a Phi-2 backbone saved through it loses lm_head.bias); Phi-2's "
            "lm_head has a bias and loading without it would silently change every logit. "
            "Convert from the original LLaVA-Phi checkpoint or one saved with transformers < 4.52")
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    if problems:
        hint = ""
        if len(missing) > len(expected) // 2:
            hint = f" (is config.json's model_type {model_type!r} right for these weights?)"
        raise CheckpointMismatchError(
            f"{d}: weights do not match config.json ({LAYOUT_DESCRIPTIONS[layout]} layout)"
            f"{hint}: " + "; ".join(problems),
            missing + (["lm_head.bias"] if bias_trap else []), unexpected, mismatched)
    return state, layout, notes


@dataclass
class _Verified:
    """A checkpoint whose config, keys, shapes and dtypes passed, before any weight is read."""

    cfg: LlavaPhiConfig
    info: CheckpointInfo
    state: dict[str, _Stored]  # model key -> stored tensor
    source: _WeightSource

    def in_file_order(self) -> list[tuple[str, _Stored]]:
        """(model key, stored) file by file, each file front to back (sequential reads)."""
        files = {s.path: i for i, s in enumerate(self.state.values())}
        return sorted(self.state.items(), key=lambda kv: (files[kv[1].path], kv[1].offset))

    def progress(self, threshold: int) -> tqdm:
        total = sum(s.nbytes for s in self.state.values())
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    desc=f"reading {self.info.path.name}", disable=total <= threshold,
                    leave=False)


def _verify(model_dir: str | Path) -> _Verified:
    """Config and weight-file headers read and checked; no tensor data read but the tiny ones
    _map_and_verify needs."""
    d = Path(model_dir)
    cfg, model_type = _read_config(d)
    fmt, files, raw, source = _scan_weights(d)
    try:
        state, layout, notes = _map_and_verify(raw, cfg, model_type, d, source.read)
    except BaseException:
        source.close()
        raise
    info = CheckpointInfo(
        path=d, layout=layout, weight_format=fmt, files=tuple(p.name for p in files),
        dtypes=tuple(sorted({str(s.dtype).removeprefix("torch.") for s in state.values()})),
        num_parameters=sum(s.numel for s in state.values()), notes=tuple(notes))
    return _Verified(cfg, info, state, source)


def read_checkpoint(model_dir: str | Path,
                    progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
                    ) -> tuple[LlavaPhiConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """Config, verified state dict (model keys, tensors as stored) and what was read.

    Holds every tensor in memory (.bin ones memory-mapped); load_model and convert_checkpoint
    read one tensor at a time instead.
    """
    ckpt = _verify(model_dir)
    state: dict[str, torch.Tensor] = {}
    with ckpt.source, ckpt.progress(progress_threshold_bytes) as bar:
        for key, stored in ckpt.in_file_order():
            state[key] = ckpt.source.read(stored)
            bar.update(stored.nbytes)
    return ckpt.cfg, {k: state[k] for k in ckpt.state}, ckpt.info


@contextmanager
def stream_checkpoint(model_dir: str | Path,
                      progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
                      ) -> Iterator[tuple[LlavaPhiConfig, Mapping[str, torch.Tensor]]]:
    """A verified checkpoint's config and tensors, each read (as stored) only when asked for.

    The mapping's keys are model keys in file order (sequential reads); a consumer that drops
    each tensor after use holds one at a time (`llava-phi export` does).
    """
    ckpt = _verify(model_dir)
    with ckpt.source, ckpt.progress(progress_threshold_bytes) as bar:
        def produce(key: str) -> torch.Tensor:
            tensor = ckpt.source.read(ckpt.state[key])
            bar.update(ckpt.state[key].nbytes)
            return tensor

        yield ckpt.cfg, _LazyTensors({k: (s.dtype, s.shape) for k, s in ckpt.in_file_order()},
                                     produce)


def _assign(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Make `value` the parameter (or buffer) `key`, as load_state_dict(assign=True) would."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(
            value, requires_grad=True if old is None else old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise RuntimeError(f"{key} is neither a parameter nor a buffer of the model")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32,
               progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
               ) -> LlavaPhiForCausalLM:
    """Read, verify and build a model in eval mode; dtype None keeps the stored dtype.

    Every key, shape and dtype is verified from the weight files' headers first. The model is
    built on the meta device (no random initialisation) and then takes its tensors one at a
    time: read, cast to `dtype`, moved to `device`, made the parameter. For safetensors (the
    canonical format) host memory therefore peaks at the model on the CPU plus, when tensors are
    cast or go to another device, one staging buffer the size of the largest tensor as stored
    (measured on LLaVA-Phi-3B: 1.01x fp16 -> fp16, 1.06x bf16 -> fp16, 1.03x fp16 -> fp32; the
    old read-everything path: 2.0x bf16 -> fp16). A zip .bin is memory-mapped and each tensor
    copied: the file's pages that were read stay in the process's RSS until loading ends (clean
    page cache the kernel can reclaim, but RSS peaks at up to the file plus the model: 2.0x fp16
    -> fp16); a legacy (pre-zip) .bin is read whole first. `model.checkpoint_info` says what was
    read.
    """
    ckpt = _verify(model_dir)
    with ckpt.source:
        if dtype is None:
            stored = {s.dtype for s in ckpt.state.values()}
            if len(stored) > 1:
                raise CheckpointError(f"{ckpt.info.path}: tensors are stored in several dtypes "
                                      f"({', '.join(ckpt.info.dtypes)}); pass an explicit dtype")
            dtype = stored.pop()
        with torch.device("meta"):
            model = LlavaPhiForCausalLM(ckpt.cfg)
        on_cpu = torch.device(device).type == "cpu"
        # A safetensors tensor that is already in the target dtype (on the CPU) is read straight
        # into the tensor that becomes the parameter. Any other is read into one staging buffer,
        # reused for every tensor, and .to() makes the parameter from it: one transient the size
        # of the largest such tensor, instead of a temporary per tensor (which the allocator may
        # not give back, leaving the heap fragmented).
        staged = [s.nbytes for s in ckpt.state.values()
                  if s.offset >= 0 and not (on_cpu and s.dtype == dtype)]
        staging = torch.empty(max(staged), dtype=torch.uint8) if staged else None
        with ckpt.progress(progress_threshold_bytes) as bar:
            for key, stored_tensor in ckpt.in_file_order():
                direct = stored_tensor.offset < 0 or (on_cpu and stored_tensor.dtype == dtype)
                tensor = ckpt.source.read(stored_tensor, None if direct else staging)
                # .bin tensors are copied: they belong to the file's mmap (or to the dict a
                # legacy torch.load returned); a staged one always is, by .to() itself.
                value = tensor.to(device=device, dtype=dtype, copy=stored_tensor.offset < 0)
                del tensor
                ckpt.source.release(stored_tensor)
                _assign(model, key, value)
                del value
                bar.update(stored_tensor.nbytes)
            del staging
    # cos/sin are computed on the CPU in fp32 and then moved with everything else, exactly as
    # for a model built normally and moved with .to(device, dtype) (which leaves the tensors
    # just loaded as they are: they already have that device and dtype).
    model.rebuild_buffers("cpu")
    model.to(device=device, dtype=dtype)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a new non-persistent buffer that rebuild_buffers does not know
        raise RuntimeError(f"tensors left on the meta device after loading: {_names(still_meta)}")
    model.checkpoint_info = ckpt.info
    return model.eval()


# ----- writing -------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} is not empty; pass overwrite=True to replace it")


@contextmanager
def _atomic_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory next to out_dir, renamed to out_dir only when the body succeeds."""
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        _check_out_dir(out, overwrite)  # again: something may have appeared meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
    except BaseException:  # also on KeyboardInterrupt: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors whose dtype and shape are known up front, each produced only when asked for.

    The writers take these where they take a state dict, and write them one at a time (convert
    streams a checkpoint through one; the memory benchmark writes random weights through one).
    """

    def __init__(self, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 produce: Callable[[str], torch.Tensor]):
        self.specs = dict(specs)
        self._produce = produce

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.specs:
            raise KeyError(key)
        return self._produce(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def _spec(state: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of one tensor of a state dict, without producing a lazy one."""
    if isinstance(state, _LazyTensors):
        return state.specs[key]
    return state[key].dtype, tuple(state[key].shape)


def _spec_nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    return math.prod(spec[1]) * spec[0].itemsize


def _write_safetensors(path: Path, state: Mapping[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written one tensor at a time (only one is ever produced at once).

    Byte for byte what safetensors' save_file writes (same tensor order: later dtype names
    first, then by name; header padded with spaces to a multiple of 8), without its in-memory
    copy of every tensor.
    """
    specs = {k: _spec(state, k) for k in state}
    unknown = sorted({str(dt) for dt, _ in specs.values() if dt not in _SAFETENSORS_NAMES})
    if unknown:
        raise ValueError(f"safetensors cannot store {', '.join(unknown)}")
    rank = {dt: i for i, dt in enumerate(_SAFETENSORS_DTYPES.values())}
    order = sorted(specs, key=lambda k: (-rank[specs[k][0]], k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    position = 0
    for key in order:
        dtype, shape = specs[key]
        end = position + _spec_nbytes(specs[key])
        header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                       "data_offsets": [position, end]}
        position = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            tensor = state[key].detach().cpu().contiguous()
            if (tensor.dtype, tuple(tensor.shape)) != specs[key]:
                raise ValueError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"announced {specs[key][0]} {specs[key][1]}")
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor


def _split_by_bytes(state: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Consecutive key groups of at most max_bytes each (a bigger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in state:
        nbytes = _spec_nbytes(_spec(state, key))
        if max_bytes is not None and groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _split_by_count(keys: list[str], shards: int) -> list[list[str]]:
    """`shards` consecutive key groups of nearly equal length."""
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be in 1..{len(keys)}, got {shards}")
    bounds = [round(i * len(keys) / shards) for i in range(shards + 1)]
    return [keys[a:b] for a, b in pairwise(bounds)]


def _write_weights(state: Mapping[str, torch.Tensor], d: Path, fmt: str,
                   groups: list[list[str]]) -> list[str]:
    """Write one file, or shards plus a standard index; returns the file names written.

    safetensors files are written one tensor at a time (`state` may be a _LazyTensors).
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if len(groups) == 1:
        names = [SAFETENSORS_FILE if fmt == "safetensors" else BIN_FILE]
    else:
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        names = [f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}" for i in range(1, len(groups) + 1)]
    for name, keys in zip(names, groups, strict=True):
        if fmt == "safetensors":
            _write_safetensors(d / name, _LazyTensors({k: _spec(state, k) for k in keys},
                                                      state.__getitem__),
                               metadata={"format": "pt"})
        else:
            torch.save({k: state[k].detach().cpu().contiguous() for k in keys}, d / name)
    if len(groups) == 1:
        return names
    weight_map = {k: name for name, keys in zip(names, groups, strict=True) for k in keys}
    index = {"metadata": {"total_size": sum(_spec_nbytes(_spec(state, k)) for k in state)},
             "weight_map": weight_map}
    index_name = SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX
    _write_json(d / index_name, index)
    return [index_name, *names]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_extras(d: Path, tokenizer: Tokenizer | None,
                  preprocess_config: ImagePreprocessConfig | None) -> None:
    """Tokenizer files and preprocessor_config.json, each when given."""
    if tokenizer is not None:
        tokenizer.save(d)
    if preprocess_config is not None:
        _write_json(d / PREPROCESSOR_FILE, preprocess_config.to_dict())


def _model_state(model: LlavaPhiForCausalLM) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, on the CPU, as they are (no dtype change)."""
    return {k: t.detach().cpu() for k, t in model.state_dict().items()}


def _default_preprocess(cfg: LlavaPhiConfig) -> ImagePreprocessConfig:
    """CLIP preprocessing for the vision tower's input size (CLIP ViT-L/14-336's at 336)."""
    return ImagePreprocessConfig.for_image_size(cfg.vision.image_size,
                                                pad_to_square=cfg.image_aspect_ratio == "pad")


def _write_canonical(state: Mapping[str, torch.Tensor], cfg: LlavaPhiConfig, out_dir: str | Path,
                     tokenizer: Tokenizer | None, preprocess_config: ImagePreprocessConfig | None,
                     max_shard_bytes: int | None, overwrite: bool) -> Path:
    """config.json + model.safetensors (or shards) + tokenizer + preprocessor_config.json."""
    eos = None if tokenizer is None else tokenizer.eos_token_id
    with _atomic_dir(out_dir, overwrite) as tmp:
        _write_json(tmp / CONFIG_FILE, cfg.to_original_dict(eos_token_id=eos))
        _write_weights(state, tmp, "safetensors", _split_by_bytes(state, max_shard_bytes))
        _write_extras(tmp, tokenizer, preprocess_config or _default_preprocess(cfg))
    return Path(out_dir)


def save_canonical(model: LlavaPhiForCausalLM, out_dir: str | Path,
                   tokenizer: Tokenizer | None = None,
                   preprocess_config: ImagePreprocessConfig | None = None,
                   max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write the canonical (original LLaVA-Phi) layout, atomically, in the model's dtype.

    preprocess_config None writes the default CLIP preprocessing for the vision image size;
    tokenizer None writes no tokenizer files.
    """
    return _write_canonical(_model_state(model), model.config, out_dir, tokenizer,
                            preprocess_config, max_shard_bytes, overwrite)


def save_original_layout(model: LlavaPhiForCausalLM, out_dir: str | Path,
                         fmt: str = "safetensors", shards: int = 1,
                         tokenizer: Tokenizer | None = None,
                         preprocess_config: ImagePreprocessConfig | None = None,
                         llava15_vision_tower: bool = False, overwrite: bool = False) -> Path:
    """Write the original layout as safetensors or .bin, in `shards` files (index when > 1).

    llava15_vision_tower adds LLaVA-1.5's extra `model.vision_tower.vision_tower.` key level.
    """
    state = _model_state(model)
    if llava15_vision_tower:
        state = {(_LLAVA15_VISION + k[len("model.vision_tower."):]
                  if k.startswith(_VISION) else k): t for k, t in state.items()}
    eos = None if tokenizer is None else tokenizer.eos_token_id
    with _atomic_dir(out_dir, overwrite) as tmp:
        _write_json(tmp / CONFIG_FILE, model.config.to_original_dict(eos_token_id=eos))
        _write_weights(state, tmp, fmt, _split_by_count(list(state), shards))
        _write_extras(tmp, tokenizer, preprocess_config)
    return Path(out_dir)


def save_llava_hf_layout(model: LlavaPhiForCausalLM, out_dir: str | Path,
                         key_style: str = "new", drop_lm_head_bias: bool = False,
                         tokenizer: Tokenizer | None = None,
                         preprocess_config: ImagePreprocessConfig | None = None,
                         clip_vision_model_level: bool | None = None, fmt: str = "safetensors",
                         shards: int = 1, overwrite: bool = False) -> Path:
    """Write the transformers llava layout (model_type llava, Phi text_config), as safetensors
    or .bin, in `shards` files (index when > 1).

    key_style "new" = transformers >= 4.52 in-memory keys, "old" = pre-4.52 / save_pretrained
    keys. clip_vision_model_level None picks what that transformers writes: no `vision_model.`
    level for "new" (transformers 5), one for "old" (transformers 4). drop_lm_head_bias
    reproduces the >= 4.52 LlavaForConditionalGeneration trap (for tests).
    """
    if key_style not in ("new", "old"):
        raise ValueError(f"key_style must be 'new' or 'old', got {key_style!r}")
    if model.config.projector_type != "mlp2x_gelu":
        raise ValueError(f"the llava layout has no {model.config.projector_type!r} projector")
    level = key_style == "old" if clip_vision_model_level is None else clip_vision_model_level
    state = {_canonical_to_hf(k, key_style, level): t for k, t in _model_state(model).items()
             if not (drop_lm_head_bias and k == "lm_head.bias")}
    with _atomic_dir(out_dir, overwrite) as tmp:
        _write_json(tmp / CONFIG_FILE, model.config.to_llava_hf_dict())
        _write_weights(state, tmp, fmt, _split_by_count(list(state), shards))
        _write_extras(tmp, tokenizer, preprocess_config)
    return Path(out_dir)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object, or a CheckpointError naming the file and the problem."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse {path.name}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: {path.name} is not a JSON object")
    return raw


def read_preprocess_config(src: Path, cfg: LlavaPhiConfig) -> ImagePreprocessConfig:
    """src's preprocessor_config.json, else the default CLIP preprocessing for the config."""
    path = src / PREPROCESSOR_FILE
    if not path.is_file():
        return _default_preprocess(cfg)
    raw = _read_json_object(path)
    try:
        pre = ImagePreprocessConfig.from_dict(raw, pad_to_square=cfg.image_aspect_ratio == "pad")
    except PreprocessConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if pre.image_size != cfg.vision.image_size:
        raise CheckpointError(f"{path}: crop size {pre.image_size} != the vision tower's "
                              f"image_size {cfg.vision.image_size}")
    return pre


def convert_checkpoint(src_dir: str | Path, dst_dir: str | Path, overwrite: bool = False,
                       max_shard_bytes: int | None = None,
                       progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
                       ) -> CheckpointInfo:
    """Any supported layout -> the canonical one, with tokenizer and preprocessing; atomic.

    Tensors are written exactly as stored (each keeps its dtype: no up- or down-cast); only the
    key names and the file layout change. They are read and written one at a time (for a
    safetensors source host memory holds one tensor; a .bin source is memory-mapped). Returns
    what was read from src_dir.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: converting a checkpoint onto itself is not supported")
    _check_out_dir(dst, overwrite)  # before reading gigabytes
    ckpt = _verify(src)
    with ckpt.source:
        try:
            tokenizer = load_tokenizer(src)
        except TokenizerError as exc:
            raise CheckpointError(f"{src}: convert writes a complete directory and needs the "
                                  f"tokenizer: {exc}") from exc
        preprocess = read_preprocess_config(src, ckpt.cfg)
        with ckpt.progress(progress_threshold_bytes) as bar:
            def produce(key: str) -> torch.Tensor:  # one tensor at a time, straight to the file
                tensor = ckpt.source.read(ckpt.state[key])
                bar.update(ckpt.state[key].nbytes)
                return tensor

            state = _LazyTensors({k: (s.dtype, s.shape) for k, s in ckpt.state.items()}, produce)
            _write_canonical(state, ckpt.cfg, dst, tokenizer, preprocess, max_shard_bytes,
                             overwrite)
    return ckpt.info
