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
pytorch_model.bin.index.json (shards). Every key and shape is checked against the model that the
config describes before anything is built; all problems are reported together.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


def _read_safetensors(path: Path, bar: tqdm) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, as stored."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[key] = f.get_tensor(key)
                bar.update(out[key].nbytes)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    return out


def _read_bin(path: Path, bar: tqdm) -> dict[str, torch.Tensor]:
    """All tensors of one PyTorch .bin file: weights_only, memory-mapped when zip-serialised."""
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
    bar.update(path.stat().st_size)
    return obj


def _read_weights(d: Path, threshold: int) -> tuple[str, list[Path], dict[str, torch.Tensor]]:
    """Every tensor of the directory's weight files, keyed as stored."""
    fmt, files, weight_map = _find_weights(d)
    data_files = files[1:] if weight_map is not None else files
    total = sum(p.stat().st_size for p in data_files)
    read = _read_safetensors if fmt == "safetensors" else _read_bin
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              desc=f"reading {d.name}", disable=total <= threshold, leave=False) as bar:
        for path in data_files:
            part = read(path, bar)
            twice = sorted(k for k in part if k in tensors)
            if twice:
                raise CheckpointError(f"{path}: tensors also stored in {where[twice[0]]}: "
                                      f"{_names(twice)}")
            tensors.update(part)
            where.update(dict.fromkeys(part, path.name))
    if weight_map is not None:
        lost = sorted(k for k, shard in weight_map.items() if where.get(k) != shard)
        if lost:
            raise CheckpointError(f"{files[0]}: tensors not found in the shard the index names: "
                                  + ", ".join(f"{k} ({weight_map[k]})" for k in lost[:_MAX_NAMES]))
    return fmt, files, tensors


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


def _map_and_verify(raw: dict[str, torch.Tensor], cfg: LlavaPhiConfig, model_type: str,
                    d: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map stored keys to model keys and check them all: (state dict, layout, notes)."""
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
    state: dict[str, torch.Tensor] = {}
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
        if ids.numel() == n and ids.dim() <= 2 and not ids.is_floating_point() \
                and torch.equal(ids.flatten().long(), torch.arange(n)):
            notes.append(f"dropped {source[_POSITION_IDS]} (equal to arange({n}))")
        else:
            unexpected.append(f"{source[_POSITION_IDS]} (a position_ids buffer that is not "
                              f"arange({n}): shape {tuple(ids.shape)}, dtype {ids.dtype})")

    bias = state.get("lm_head.bias")
    if bias is not None and bias.is_floating_point() and not bias.any():
        notes.append("lm_head.bias is all zeros: Phi-2's is not, so it was probably dropped and "
                     "re-created on the way (transformers 4.48.0 or >= 4.52 llava)")
    unexpected += [source[k] for k in state if k not in expected]
    missing = [stored_name(k) for k in expected if k not in state]
    mismatched = [
        f"{source[k]} (expected {expected[k]}, found {tuple(state[k].shape)})"
        for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    mismatched += [f"{source[k]} (dtype {state[k].dtype} is not floating point)"
                   for k in expected if k in state and not state[k].is_floating_point()]

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


def read_checkpoint(model_dir: str | Path,
                    progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
                    ) -> tuple[LlavaPhiConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """Config, verified state dict (model keys, tensors as stored) and what was read."""
    d = Path(model_dir)
    cfg, model_type = _read_config(d)
    fmt, files, raw = _read_weights(d, progress_threshold_bytes)
    state, layout, notes = _map_and_verify(raw, cfg, model_type, d)
    info = CheckpointInfo(
        path=d, layout=layout, weight_format=fmt, files=tuple(p.name for p in files),
        dtypes=tuple(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})),
        num_parameters=sum(t.numel() for t in state.values()), notes=tuple(notes))
    return cfg, state, info


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32,
               progress_threshold_bytes: int = DEFAULT_PROGRESS_THRESHOLD_BYTES,
               ) -> LlavaPhiForCausalLM:
    """Read, verify and build a model in eval mode; dtype None keeps the stored dtype.

    The model is built on the meta device and takes the checkpoint's tensors as its parameters
    (no random initialisation); `model.checkpoint_info` says what was read.
    """
    cfg, state, info = read_checkpoint(model_dir, progress_threshold_bytes)
    if dtype is None:
        stored = {t.dtype for t in state.values()}
        if len(stored) > 1:
            raise CheckpointError(f"{info.path}: tensors are stored in several dtypes "
                                  f"({', '.join(info.dtypes)}); pass an explicit dtype")
        dtype = stored.pop()
    with torch.device("meta"):
        model = LlavaPhiForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # cos/sin are computed on the CPU in fp32 and then moved and cast with everything else,
    # exactly as for a model built normally and moved with .to(device, dtype).
    model.rebuild_buffers("cpu")
    model.to(device=device, dtype=dtype)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a new non-persistent buffer that rebuild_buffers does not know
        raise RuntimeError(f"tensors left on the meta device after loading: {_names(still_meta)}")
    model.checkpoint_info = info
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


def _split_by_bytes(state: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Consecutive key groups of at most max_bytes each (a bigger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        if max_bytes is not None and groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += tensor.nbytes
    return groups


def _split_by_count(keys: list[str], shards: int) -> list[list[str]]:
    """`shards` consecutive key groups of nearly equal length."""
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be in 1..{len(keys)}, got {shards}")
    bounds = [round(i * len(keys) / shards) for i in range(shards + 1)]
    return [keys[a:b] for a, b in pairwise(bounds)]


def _write_weights(state: Mapping[str, torch.Tensor], d: Path, fmt: str,
                   groups: list[list[str]]) -> list[str]:
    """Write one file, or shards plus a standard index; returns the file names written."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    tensors = {k: t.detach().cpu().contiguous() for k, t in state.items()}
    if len(groups) == 1:
        names = [SAFETENSORS_FILE if fmt == "safetensors" else BIN_FILE]
    else:
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        names = [f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}" for i in range(1, len(groups) + 1)]
    for name, keys in zip(names, groups, strict=True):
        part = {k: tensors[k] for k in keys}
        if fmt == "safetensors":
            save_file(part, str(d / name), metadata={"format": "pt"})
        else:
            torch.save(part, d / name)
    if len(groups) == 1:
        return names
    weight_map = {k: name for name, keys in zip(names, groups, strict=True) for k in keys}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
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
    key names and the file layout change. Returns what was read from src_dir.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: converting a checkpoint onto itself is not supported")
    _check_out_dir(dst, overwrite)  # before reading gigabytes
    cfg, state, info = read_checkpoint(src, progress_threshold_bytes)
    try:
        tokenizer = load_tokenizer(src)
    except TokenizerError as exc:
        raise CheckpointError(f"{src}: convert writes a complete directory and needs the "
                              f"tokenizer: {exc}") from exc
    preprocess = read_preprocess_config(src, cfg)
    _write_canonical(state, cfg, dst, tokenizer, preprocess, max_shard_bytes, overwrite)
    return info
