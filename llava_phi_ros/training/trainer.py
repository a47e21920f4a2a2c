"""Staged LLaVA-Phi training (`llava-phi train`): the paper's stages 1 and 2, plus a stage 0.

Stages (what trains; everything else is frozen: requires_grad False and not in the optimizer):
- 0a: the LLM alone, on the scene text: each conversation with its image's caption written where
  the image will be (captions.json + instruct.json), loss on the assistant's answers;
- 0b: the vision tower alone, on a supervised pretext: a temporary linear head on the features
  LLaVA reads (layer -2, CLS dropped) predicts, per patch, the area of each colour and shape,
  whether an object's centre is there, and the third of the image it is in (from scenes.json);
  the head is discarded;
- 0: 0a and 0b together (disjoint parameters: one optimizer step updates both);
- 1: the projector only, on captions.json (vision tower and LLM frozen);
- 2: projector + LLM (and the vision tower with tune_vision_tower), on instruct.json.
A from-scratch model needs stage 0 because its parts are random; the paper's pretrained CLIP and
Phi-2 skip it.

Shared: AdamW (no decay on biases, LayerNorms and other 1-d parameters), linear warm-up then
cosine decay, gradient accumulation (the loss is the mean over all unmasked tokens of the
accumulated batch), gradient-norm clipping, a tqdm bar with loss and samples/s, periodic
checkpoints, exact resume, and the canonical checkpoint layout that `llava-phi ask` loads.

Output directory (`--out`):
  config.json, model.safetensors, tokenizer*.json, preprocessor_config.json  (the model)
  train_config.json   what was run (settings, data, parameter counts, timings)
  train_log.jsonl     one line per log_every steps
  train_state/state.pt  weights, optimizer, step, RNG states: what --resume needs; removed when
                      training finishes unless keep_state
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..model.checkpoint import CheckpointError, load_model, read_preprocess_config, save_canonical
from ..model.config import ConfigError, LlavaPhiConfig
from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.preprocess import ImagePreprocessConfig
from ..model.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from .data import (
    IGNORE_INDEX,
    Batch,
    ConversationDataset,
    DataError,
    ImageStore,
    PatchBatch,
    PatchLabelDataset,
    Record,
    captions_by_image,
    conversation_texts,
    read_llava_json,
    read_scenes_json,
)
from .presets import PRESETS, PresetError, build_model, parameter_counts
from .scenes import MC_DRILL_FILE
from .tokenizer_train import DEFAULT_VOCAB_SIZE, TokenizerTrainingError, train_tokenizer

STAGES = ("0", "0a", "0b", "1", "2")
DEFAULT_LR = {"0": 1e-3, "0a": 1e-3, "0b": 1e-3, "1": 1e-3, "2": 5e-4}
CAPTIONS_FILE = "captions.json"
INSTRUCT_FILE = "instruct.json"
SCENES_FILE = "scenes.json"
STATE_DIR = "train_state"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
STATE_VERSION = 1
# Settings that may change on --resume: they do not change the numbers computed.
RUNTIME_FIELDS = ("device", "log_every", "save_every", "threads")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class TrainError(RuntimeError):
    """Training cannot start or continue (bad data, model, output directory or state)."""


class TrainUsageError(TrainError):
    """Settings that cannot work together (reported as a usage error, exit code 2)."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (the data and the starting point included)."""

    stage: str = "2"
    init: str = "tiny"  # a preset name or a checkpoint directory
    data: str | None = None  # a `llava-phi scenes` directory
    json_files: list[str] = field(default_factory=list)  # LLaVA JSON instead of the stage's file
    image_root: str | None = None  # images of json_files are relative to this
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the stage
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # None: 3% of steps (LLaVA's warmup_ratio)
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    clip_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": autocast (CUDA); weights and optimizer stay fp32
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and when halted)
    tune_vision_tower: bool = False  # stage 2
    vocab_size: int = DEFAULT_VOCAB_SIZE  # the trained tokenizer's size limit (preset init)
    max_length: int | None = None  # None: the model's max_position_embeddings
    threads: int | None = None  # torch CPU threads; None: torch's default
    # A focus set (stages 0a, 2): LLaVA JSON drawn as its own micro-batch each step, its loss the
    # mean over its own tokens, added with focus_weight. A one-token answer in a long
    # conversation is a sliver of the token-mean loss; this gives such answers their own weight.
    focus_json: list[str] = field(default_factory=list)
    focus_batch_size: int = 0
    focus_weight: float = 1.0

    @property
    def learning_rate(self) -> float:
        """The peak learning rate."""
        return DEFAULT_LR[self.stage] if self.lr is None else self.lr

    @property
    def warmup(self) -> int:
        """Warm-up steps."""
        return max(1, round(0.03 * self.steps)) if self.warmup_steps is None \
            else self.warmup_steps

    def validate(self) -> TrainConfig:
        """Raise TrainUsageError naming the bad setting; return self."""
        if self.stage not in STAGES:
            raise TrainUsageError(f"unknown stage {self.stage!r} (choose from {', '.join(STAGES)})")
        positive = ("steps", "batch_size", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainUsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainUsageError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.clip_norm < 0 or self.log_every < 1 or \
                self.save_every < 0 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainUsageError("weight_decay, clip_norm, warmup_steps and save_every must be "
                                  ">= 0, log_every >= 1 and min_lr_ratio in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainUsageError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if bool(self.focus_json) != (self.focus_batch_size > 0):
            raise TrainUsageError("a focus set needs both --focus-json and --focus-batch-size")
        if self.focus_json and self.stage not in ("0a", "2"):
            raise TrainUsageError(f"a focus set is a stage 0a or 2 setting, not {self.stage}")
        if self.focus_batch_size < 0 or not (self.focus_weight > 0 and
                                             math.isfinite(self.focus_weight)):
            raise TrainUsageError("focus_batch_size must be >= 0 and focus_weight positive")
        if self.tune_vision_tower and self.stage != "2":
            raise TrainUsageError("tune_vision_tower is a stage-2 setting")
        if self.data is None and not self.json_files:
            raise TrainUsageError("give a data directory (--data) or LLaVA JSON files (--json)")
        if self.stage in ("0", "0a", "0b") and self.data is None:
            raise TrainUsageError(f"stage {self.stage} needs --data (a `llava-phi scenes` "
                                  f"directory: {CAPTIONS_FILE}, {SCENES_FILE})")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of asdict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    peak, warmup = cfg.learning_rate, cfg.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# ----- what trains ---------------------------------------------------------------------------
def model_parts(model: LlavaPhiForCausalLM) -> dict[str, list[nn.Module]]:
    """The three parts LLaVA trains or freezes: vision tower, projector, LLM."""
    m = model.model
    return {"vision_tower": [m.vision_tower], "mm_projector": [m.mm_projector],
            "llm": [m.embed_tokens, m.layers, m.final_layernorm, model.lm_head]}


def trained_parts(stage: str, tune_vision_tower: bool = False) -> list[str]:
    """Names of the parts (model_parts keys) a stage trains."""
    return {
        "0": ["llm", "vision_tower"],
        "0a": ["llm"],
        "0b": ["vision_tower"],
        "1": ["mm_projector"],
        "2": ["mm_projector", "llm", *(["vision_tower"] if tune_vision_tower else [])],
    }[stage]


def freeze_for_stage(model: LlavaPhiForCausalLM, stage: str,
                     tune_vision_tower: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad for the stage; return the trainable (name, parameter) pairs."""
    model.requires_grad_(False)
    parts = model_parts(model)
    for name in trained_parts(stage, tune_vision_tower):
        for module in parts[name]:
            module.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(named: Sequence[tuple[str, nn.Parameter]],
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (and embeddings), none on biases, norms, 1-d vectors."""
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class PatchPretextHead(nn.Module):
    """Stage 0b's temporary linear head on each patch feature: colour and shape class logits,
    an object-centre logit and the image-third logits (so the features keep all four)."""

    def __init__(self, hidden_size: int, n_colours: int, n_shapes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.colour = nn.Linear(hidden_size, n_colours)
        self.shape = nn.Linear(hidden_size, n_shapes)
        self.centre = nn.Linear(hidden_size, 1)
        self.third = nn.Linear(hidden_size, 3)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        # features: (B, P, D) -> colour (B, P, C), shape (B, P, S), centre (B, P), third (B, P, 3)
        h = self.norm(features)
        return {"colour": self.colour(h), "shape": self.shape(h),
                "centre": self.centre(h).squeeze(-1), "third": self.third(h)}


# ----- losses --------------------------------------------------------------------------------
def image_embeddings(model: LlavaPhiForCausalLM, pixels: torch.Tensor,
                     train_vision: bool) -> torch.Tensor:
    """encode_images with the vision tower under no_grad when it is frozen: (K, N, D)."""
    with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
        features = model.model.vision_tower(pixels.to(model.device, model.dtype))  # (K, N, Dv)
    return model.model.mm_projector(features)  # (K, N, D)


def batch_logits(model: LlavaPhiForCausalLM, batch: Batch,
                 train_vision: bool = False) -> torch.Tensor:
    """fp32 logits (B, T, V) of a collated batch (image features at image_mask positions)."""
    embeds = model.model.embed_tokens(batch.input_ids)  # (B, T, D)
    if batch.pixels is not None:
        feats = image_embeddings(model, batch.pixels, train_vision)  # (K, N, D)
        n_slots = int(batch.image_mask.sum())
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise DataError(f"the batch has {n_slots} image positions but its "
                            f"{feats.shape[0]} images give {feats.shape[0] * feats.shape[1]}")
        embeds = embeds.masked_scatter(batch.image_mask.unsqueeze(-1), feats.to(embeds.dtype))
    return model.forward_embeds(embeds, None, 0, last_only=False)


def lm_loss(model: LlavaPhiForCausalLM, batch: Batch, total_tokens: int,
            train_vision: bool = False) -> torch.Tensor:
    """Summed next-token cross entropy over the batch's unmasked labels, / total_tokens."""
    logits = batch_logits(model, batch, train_vision)  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / max(1, total_tokens)


def pretext_loss(model: LlavaPhiForCausalLM, head: PatchPretextHead,
                 batch: PatchBatch) -> tuple[torch.Tensor, float]:
    """Soft cross entropy of the patch colour and shape areas + object-centre BCE + image-third
    cross entropy; and the colour-and-shape argmax accuracy on patches mostly covered by an
    object (background patches would flatter it)."""
    features = model.model.vision_tower(batch.pixels.to(model.device, model.dtype))  # (B, P, Dv)
    out = head(features.float())
    loss = F.cross_entropy(out["colour"].flatten(0, 1), batch.colours.flatten(0, 1)) + \
        F.cross_entropy(out["shape"].flatten(0, 1), batch.shapes.flatten(0, 1)) + \
        F.binary_cross_entropy_with_logits(out["centre"], batch.centres) + \
        F.cross_entropy(out["third"].flatten(0, 1), batch.thirds.flatten())
    with torch.no_grad():
        colour_target, shape_target = batch.colours.argmax(-1), batch.shapes.argmax(-1)  # (B, P)
        on_object = colour_target != 0
        hits = (out["colour"].argmax(-1) == colour_target) & (out["shape"].argmax(-1) ==
                                                              shape_target)
        acc = float(hits[on_object].float().mean()) if bool(on_object.any()) else 1.0
    return loss, acc


# ----- data order ----------------------------------------------------------------------------
class SampleStream:
    """An endless, seeded order over n samples: a fresh permutation each epoch.

    Position p of the stream is sample perm(epoch = p // n)[p % n], so any position is known
    from (seed, stream id, p) alone: resuming needs only the number of samples consumed.
    """

    def __init__(self, n: int, seed: int, stream_id: int):
        self.n, self.seed, self.stream_id = n, seed, stream_id
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, self.stream_id, epoch])
            self._perm = (epoch, rng.permutation(self.n))
        return self._perm[1]

    def take(self, start: int, count: int) -> list[int]:
        """Sample indices at stream positions start .. start + count - 1."""
        return [int(self._permutation(p // self.n)[p % self.n])
                for p in range(start, start + count)]


# ----- the run -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a call to train() did."""

    out: Path
    stage: str
    start_step: int
    step: int  # steps done in total (resumed ones included)
    finished: bool  # reached cfg.steps (False when halted early)
    losses: list[float]  # the loss of each step this call ran
    seconds: float
    samples_per_s: float
    pretext_accuracy: float | None = None  # stage 0/0b: the last step's patch accuracy

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of the steps this call ran."""
        return self.seconds / max(1, len(self.losses))


@dataclass
class _Setup:
    """The model and data of a run."""

    model: LlavaPhiForCausalLM
    tokenizer: Tokenizer
    preprocess: ImagePreprocessConfig
    text: ConversationDataset | None = None  # LM data (stages 0, 0a, 1, 2)
    focus: ConversationDataset | None = None  # the focus set (stages 0a, 2)
    vision: PatchLabelDataset | None = None  # pretext data (stages 0, 0b)
    head: PatchPretextHead | None = None


def _json_paths(cfg: TrainConfig, default: Sequence[str]) -> list[Path]:
    """The LLaVA JSON files a stage reads: json_files, else `default` names in the data dir."""
    if cfg.json_files:
        return [Path(p) for p in cfg.json_files]
    assert cfg.data is not None
    paths = [Path(cfg.data) / name for name in default]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"stage {cfg.stage} needs {', '.join(missing)} (write a scene set with "
                        f"`llava-phi scenes --out {cfg.data}`)")
    drills = Path(cfg.data) / MC_DRILL_FILE
    focus = {Path(p).resolve() for p in cfg.focus_json}
    if cfg.stage in ("0", "0a", "2") and drills.is_file() and drills.resolve() not in focus:
        paths.append(drills)  # text-only, mixed in (unless they are drawn as a focus set)
    return paths


def _read_records(paths: Sequence[Path], image_root: str | None) -> list[Record]:
    records: list[Record] = []
    for path in paths:
        records += read_llava_json(path, image_root)
    return records


def _tokenizer_texts(cfg: TrainConfig) -> list[str]:
    """The text a preset's tokenizer is trained on: every conversation the data holds."""
    if cfg.json_files:
        paths = [Path(p) for p in cfg.json_files]
    else:
        assert cfg.data is not None
        paths = [Path(cfg.data) / n for n in (CAPTIONS_FILE, INSTRUCT_FILE, MC_DRILL_FILE)
                 if (Path(cfg.data) / n).is_file()]
    if not paths:
        raise DataError(f"no LLaVA JSON in {cfg.data} to train the tokenizer on (looked for "
                        f"{CAPTIONS_FILE}, {INSTRUCT_FILE})")
    return conversation_texts(_read_records(paths, cfg.image_root))


def _init_model(cfg: TrainConfig) -> tuple[LlavaPhiForCausalLM, Tokenizer, ImagePreprocessConfig]:
    """A preset built from scratch (with a tokenizer trained on the data) or a checkpoint."""
    if cfg.init in PRESETS:
        tokenizer = train_tokenizer(_tokenizer_texts(cfg), cfg.vocab_size)
        model = build_model(cfg.init, tokenizer.vocab_size, seed=cfg.seed)
        return model, tokenizer, ImagePreprocessConfig.for_image_size(
            model.config.vision.image_size)
    path = Path(cfg.init)
    if not path.is_dir():
        raise TrainUsageError(f"--init {cfg.init!r} is neither a preset "
                              f"({', '.join(PRESETS)}) nor a checkpoint directory")
    try:
        model = load_model(path, device="cpu", dtype=torch.float32)
        return model, load_tokenizer(path), read_preprocess_config(path, model.config)
    except (CheckpointError, ConfigError, TokenizerError) as exc:
        raise TrainError(f"cannot load --init {path}: {exc}") from exc


def _build_data(cfg: TrainConfig, setup: _Setup) -> None:
    """The stage's datasets (and the stage-0b head)."""
    model, tokenizer = setup.model, setup.tokenizer
    max_length = cfg.max_length or model.config.text.max_position_embeddings
    images = ImageStore(setup.preprocess)
    captions: dict[Path, str] | None = None  # stage 0/0a: each image's caption stands in for it
    if cfg.stage in ("0", "0a"):
        assert cfg.data is not None
        paths = _json_paths(cfg, (CAPTIONS_FILE, INSTRUCT_FILE))
        caption_file = Path(cfg.data) / CAPTIONS_FILE
        if not caption_file.is_file():
            raise DataError(f"stage {cfg.stage} needs {caption_file}: each image's caption "
                            "stands in for the image")
        captions = captions_by_image(_read_records([caption_file], cfg.image_root))
        records = _read_records(paths, cfg.image_root)
        setup.text = ConversationDataset(records, tokenizer, "caption", max_length=max_length,
                                         captions=captions)
    elif cfg.stage in ("1", "2"):
        paths = _json_paths(cfg, (CAPTIONS_FILE,) if cfg.stage == "1" else (INSTRUCT_FILE,))
        setup.text = ConversationDataset(_read_records(paths, cfg.image_root), tokenizer,
                                         "image", images, model.config.num_image_tokens,
                                         max_length)
    if cfg.focus_json:  # validate() allows it in stages 0a and 2 only: the mode of their text
        assert setup.text is not None
        setup.focus = ConversationDataset(
            _read_records([Path(p) for p in cfg.focus_json], cfg.image_root), tokenizer,
            setup.text.mode, images, model.config.num_image_tokens, max_length, captions)
    if cfg.stage in ("0", "0b"):
        assert cfg.data is not None
        scenes = read_scenes_json(Path(cfg.data) / SCENES_FILE, cfg.image_root)
        if model.config.vision_select_feature != "patch":
            raise TrainError("the vision pretext needs patch features (vision_select_feature "
                             "'patch')")
        setup.vision = PatchLabelDataset(scenes, images, model.config.vision.patch_size)
        setup.head = PatchPretextHead(model.config.vision.hidden_size,
                                      len(setup.vision.colour_names),
                                      len(setup.vision.shape_names))


def _check_out(out: Path, resume: bool, overwrite: bool, init: str) -> None:
    """Refuse an output directory that would lose something."""
    if out.exists() and not out.is_dir():
        raise TrainUsageError(f"--out {out} exists and is not a directory")
    if init not in PRESETS and Path(init).resolve() == out.resolve():
        raise TrainUsageError("--out must differ from --init (the starting checkpoint)")
    if resume:
        if not (out / STATE_DIR / STATE_FILE).is_file():
            raise TrainUsageError(f"nothing to resume: {out / STATE_DIR / STATE_FILE} not found")
        return
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TrainUsageError(f"--out {out} is not empty; pass --overwrite to replace a "
                                  "previous training output, or --resume to continue it")
        if not (out / CONFIG_FILE).is_file():
            raise TrainUsageError(f"--out {out} is not empty and holds no {CONFIG_FILE}; "
                                  "--overwrite only replaces a previous training output")
        shutil.rmtree(out)


def save_model_files(model: LlavaPhiForCausalLM, tokenizer: Tokenizer,
                     preprocess: ImagePreprocessConfig, out: Path) -> None:
    """Write the canonical checkpoint files into `out`, each replaced atomically; other files
    there (the training state and log) stay."""
    tmp = out / f".model-{os.getpid()}"
    save_canonical(model, tmp, tokenizer, preprocess, overwrite=True)
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
    tmp.rmdir()


def _rng_state() -> dict[str, Any]:
    """python, numpy and torch RNG states, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fingerprint(setup: _Setup) -> dict[str, Any]:
    """Sizes of the data, to refuse resuming on different data."""
    out: dict[str, Any] = {"tokenizer_size": setup.tokenizer.vocab_size}
    if setup.text is not None:
        out |= {"text_samples": len(setup.text), "label_tokens": setup.text.stats.label_tokens}
    if setup.focus is not None:
        out |= {"focus_samples": len(setup.focus)}
    if setup.vision is not None:
        out |= {"scenes": len(setup.vision), "colours": setup.vision.colour_names,
                "shapes": setup.vision.shape_names}
    return out


def resume_config(out: str | Path) -> TrainConfig:
    """The TrainConfig stored in an output directory's training state."""
    path = Path(out) / STATE_DIR / STATE_FILE
    if not path.is_file():
        raise TrainUsageError(f"nothing to resume: {path} not found")
    return TrainConfig.from_dict(_load_state(path)["train_config"])


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise TrainError(f"cannot read the training state {path}: {exc}") from exc


def _resume_setup(out: Path, cfg: TrainConfig) -> tuple[_Setup, dict[str, Any]]:
    """Model (weights from the state), tokenizer and preprocessing of a run to resume."""
    state = _load_state(out / STATE_DIR / STATE_FILE)
    if state.get("version") != STATE_VERSION:
        raise TrainError(f"training state version {state.get('version')} is not "
                         f"{STATE_VERSION}")
    stored = TrainConfig.from_dict(state["train_config"])
    changed = [f.name for f in fields(TrainConfig) if f.name not in RUNTIME_FIELDS
               and getattr(stored, f.name) != getattr(cfg, f.name)]
    if changed:
        raise TrainUsageError("--resume continues the stored run; these settings differ from "
                              f"it: {', '.join(changed)}")
    try:
        model_cfg = LlavaPhiConfig.from_dict(state["model_config"])
        tokenizer = load_tokenizer(out)
        preprocess = read_preprocess_config(out, model_cfg)
    except (ConfigError, TokenizerError, CheckpointError) as exc:
        raise TrainError(f"cannot resume from {out}: {exc}") from exc
    with torch.device("meta"):
        model = LlavaPhiForCausalLM(model_cfg)
    model.load_state_dict(state["model"], strict=True, assign=True)
    model.rebuild_buffers("cpu")
    return _Setup(model, tokenizer, preprocess), state


@dataclass
class _Log:
    """Per-step numbers between two log lines."""

    losses: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)
    focus: list[float] = field(default_factory=list)
    pretext: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    def line(self, step: int, lr: float, elapsed: float) -> dict[str, Any]:
        out: dict[str, Any] = {"step": step, "loss": float(np.mean(self.losses)), "lr": lr}
        if self.lm and (self.pretext or self.focus):
            out |= {"lm_loss": float(np.mean(self.lm))}
        if self.focus:
            out |= {"focus_loss": float(np.mean(self.focus))}
        if self.pretext:
            out |= {"pretext_loss": float(np.mean(self.pretext)),
                    "pretext_accuracy": float(np.mean(self.accuracy))}
        out |= {"samples_per_s": self.samples / max(self.seconds, 1e-9),
                "elapsed_s": round(elapsed, 3)}
        return out


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the state that is being resumed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the interruption
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@dataclass
class _StepLosses:
    """The losses of one optimizer step."""

    lm: float = 0.0  # mean over all unmasked tokens of the step's text micro-batches
    focus: float = 0.0  # mean over the focus micro-batches' tokens (unweighted)
    pretext: float = 0.0  # mean over the pretext micro-batches
    accuracy: float | None = None  # pretext accuracy

    def total(self, cfg: TrainConfig) -> float:
        """What the step minimised."""
        return self.lm + cfg.focus_weight * self.focus + self.pretext


def _lm_backward(model: LlavaPhiForCausalLM, data: ConversationDataset, stream: SampleStream,
                 batch_size: int, step: int, cfg: TrainConfig, weight: float,
                 device: torch.device, amp: Any) -> float:
    """Forward and backward the grad_accum micro-batches of `batch_size` samples that step
    `step` draws from `stream`; return their loss, the mean over all their unmasked tokens
    (the gradient is that loss times `weight`)."""
    batches = [data.batch(stream.take((step * cfg.grad_accum + k) * batch_size,
                                      batch_size)).to(device)
               for k in range(cfg.grad_accum)]
    total = sum(b.num_label_tokens for b in batches)
    train_vision = cfg.stage == "2" and cfg.tune_vision_tower
    value = 0.0
    for batch in batches:
        with amp:
            loss = lm_loss(model, batch, total, train_vision)
        (weight * loss).backward()  # x 1.0 is exact: the text loss's gradient is unchanged
        value += loss.item()
    return value


def _accumulate_gradients(model: LlavaPhiForCausalLM, setup: _Setup, cfg: TrainConfig,
                          step: int, streams: dict[str, SampleStream], device: torch.device,
                          amp: Any) -> _StepLosses:
    """Forward and backward every micro-batch of optimizer step `step`."""
    first = step * cfg.batch_size * cfg.grad_accum  # stream position of the step's data
    out = _StepLosses()
    text_stream, vision_stream = streams.get("text"), streams.get("vision")
    if setup.text is not None and text_stream is not None:
        out.lm = _lm_backward(model, setup.text, text_stream, cfg.batch_size, step, cfg, 1.0,
                              device, amp)
    focus_stream = streams.get("focus")
    if setup.focus is not None and focus_stream is not None:
        out.focus = _lm_backward(model, setup.focus, focus_stream, cfg.focus_batch_size, step,
                                 cfg, cfg.focus_weight, device, amp)
    if setup.vision is not None and vision_stream is not None and setup.head is not None:
        accs = []
        for k in range(cfg.grad_accum):
            pbatch = setup.vision.batch(vision_stream.take(first + k * cfg.batch_size,
                                                           cfg.batch_size)).to(device)
            with amp:
                loss, acc = pretext_loss(model, setup.head, pbatch)
            (loss / cfg.grad_accum).backward()
            out.pretext += loss.item() / cfg.grad_accum
            accs.append(acc)
        out.accuracy = float(np.mean(accs))
    return out


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, halt_after: int | None = None,
          time_limit_s: float | None = None, keep_state: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or resume) one stage; write the canonical model and the training record to `out`.

    halt_after / time_limit_s stop early (after that global step / wall time) with the state
    saved, as an interruption would; `resume=True` then continues exactly where it stopped.
    on_step(step, loss) is called after each optimizer step (e.g. for the caller's own eval).
    """
    cfg.validate()
    out = Path(out)
    _check_out(out, resume, overwrite, cfg.init)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainUsageError(f"device {cfg.device!r} requested but CUDA is not available")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    state: dict[str, Any] | None = None
    if resume:
        setup, state = _resume_setup(out, cfg)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model, tokenizer, preprocess = _init_model(cfg)
        setup = _Setup(model, tokenizer, preprocess)
    _build_data(cfg, setup)
    if state is not None:
        if state["fingerprint"] != _fingerprint(setup):
            raise TrainError(f"the data differ from the run being resumed: "
                             f"{state['fingerprint']} != {_fingerprint(setup)}")
        if setup.head is not None:
            setup.head.load_state_dict(state["head"])

    model = setup.model.to(device).train()
    named = freeze_for_stage(model, cfg.stage, cfg.tune_vision_tower)
    if setup.head is not None:
        setup.head.to(device).train()
        named += [(f"pretext_head.{n}", p) for n, p in setup.head.named_parameters()]
    trainable = [p for _, p in named]
    optimizer = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        _set_rng_state(state["rng"])

    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR).mkdir(exist_ok=True)
    log_path = out / LOG_FILE
    if resume:
        _truncate_log(log_path, start_step)
    elapsed_before = float(state["elapsed_s"]) if state is not None else 0.0
    record = _run_record(cfg, setup, resume)
    _write_json(out / CONFIG_FILE, record)

    streams = {name: SampleStream(len(data), cfg.seed, stream_id) for name, data, stream_id in
               (("text", setup.text, 0), ("vision", setup.vision, 1), ("focus", setup.focus, 2))
               if data is not None}
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" \
        else nullcontext()
    per_step = cfg.batch_size * cfg.grad_accum

    def save(step: int, elapsed: float) -> None:
        save_model_files(model, setup.tokenizer, setup.preprocess, out)
        payload = {
            "version": STATE_VERSION,
            "train_config": asdict(cfg),
            "model_config": model.config.to_original_dict(),
            "step": step,
            "samples_seen": step * per_step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "head": None if setup.head is None else
            {k: v.detach().cpu() for k, v in setup.head.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
            "fingerprint": _fingerprint(setup),
            "elapsed_s": elapsed,
        }
        tmp = out / STATE_DIR / (STATE_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, out / STATE_DIR / STATE_FILE)

    losses: list[float] = []
    window = _Log()
    accuracy: float | None = None
    started = time.perf_counter()
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"stage {cfg.stage}", unit="step",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        while step < cfg.steps:
            if (halt_after is not None and step >= halt_after) or (
                    time_limit_s is not None and time.perf_counter() - started >= time_limit_s):
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_losses = _accumulate_gradients(model, setup, cfg, step, streams, device, amp)
            if step_losses.accuracy is not None:
                accuracy = step_losses.accuracy
            loss_value = step_losses.total(cfg)
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss became {loss_value} at step {step + 1}; lower --lr "
                                 "or raise --clip-norm")
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)
            optimizer.step()
            step += 1
            dt = time.perf_counter() - t0
            losses.append(loss_value)
            window.losses.append(loss_value)
            if setup.text is not None:
                window.lm.append(step_losses.lm)
            if setup.focus is not None:
                window.focus.append(step_losses.focus)
            if setup.vision is not None:
                window.pretext.append(step_losses.pretext)
                window.accuracy.append(accuracy or 0.0)
            window.samples += per_step
            window.seconds += dt
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", sps=f"{per_step / max(dt, 1e-9):.0f}")
            if on_step is not None:
                on_step(step, loss_value)
            elapsed = elapsed_before + time.perf_counter() - started
            if step % cfg.log_every == 0 or step == cfg.steps:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(window.line(step, lr, elapsed)) + "\n")
                window = _Log()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step, elapsed)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    elapsed = elapsed_before + seconds
    finished = step >= cfg.steps
    if step > start_step or not (out / STATE_DIR / STATE_FILE).is_file():
        save(step, elapsed)
    if finished and not keep_state:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    record |= {"steps_done": step, "finished": finished, "train_seconds": round(elapsed, 3),
               "seconds_per_step_last_run": round(seconds / max(1, step - start_step), 4)}
    if losses:
        record["final_loss"] = losses[-1]
    if accuracy is not None:
        record["final_pretext_accuracy"] = accuracy
    _write_json(out / CONFIG_FILE, record)
    return TrainResult(out, cfg.stage, start_step, step, finished, losses, seconds,
                       len(losses) * per_step / max(seconds, 1e-9), accuracy)


def _run_record(cfg: TrainConfig, setup: _Setup, resumed: bool) -> dict[str, Any]:
    """train_config.json: the settings, the data, the model and the software."""
    stats: dict[str, Any] = {}
    if setup.text is not None:
        stats["text"] = asdict(setup.text.stats) | {"mode": setup.text.mode}
    if setup.focus is not None:
        stats["focus"] = asdict(setup.focus.stats) | {"mode": setup.focus.mode}
    if setup.vision is not None:
        stats["vision"] = {"scenes": len(setup.vision), "colours": setup.vision.colour_names,
                           "shapes": setup.vision.shape_names}
    return {
        "stage": cfg.stage,
        "settings": asdict(cfg) | {"lr": cfg.learning_rate, "warmup_steps": cfg.warmup},
        "resumed": resumed,
        "data": stats,
        "tokenizer_size": setup.tokenizer.vocab_size,
        "parameters": parameter_counts(setup.model),
        "trained_parts": trained_parts(cfg.stage, cfg.tune_vision_tower),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }


# ----- command line --------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llava-phi train` (defaults None = the stored value on --resume)."""
    d = TrainConfig()
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help="0 = 0a + 0b (pretrain the parts of a from-scratch model), 0a = "
                             "the LLM on caption-context text, 0b = the vision tower on patch "
                             "colour/shape, 1 = the projector on captions, 2 = projector + LLM "
                             "on instructions (required unless --resume)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help=f"a `llava-phi scenes` directory ({CAPTIONS_FILE}, {INSTRUCT_FILE}, "
                             f"{SCENES_FILE}, images/)")
    parser.add_argument("--json", action="append", default=None, dest="json_files",
                        metavar="FILE", help="LLaVA JSON file to train on instead of the "
                                             "stage's file in --data (repeatable)")
    parser.add_argument("--focus-json", action="append", default=None, dest="focus_json",
                        metavar="FILE", help="stages 0a and 2: LLaVA JSON drawn as an extra "
                        "micro-batch each step, its own token-mean loss added (repeatable; "
                        "e.g. the scene set's mc.json and mc_text.json)")
    parser.add_argument("--focus-batch-size", type=int, default=None,
                        help="samples per focus micro-batch (needed with --focus-json)")
    parser.add_argument("--focus-weight", type=float, default=None,
                        help=f"weight of the focus loss (default {d.focus_weight})")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="directory the JSON's image paths are relative to (default: the "
                             "JSON's directory, then its images/)")
    parser.add_argument("--init", default=None, metavar="PRESET|DIR",
                        help=f"a size preset ({', '.join(PRESETS)}: random weights and a "
                             "tokenizer trained on the data) or a checkpoint directory to "
                             "continue from (default: tiny)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: the model in the canonical layout, plus "
                             f"{CONFIG_FILE}, {LOG_FILE} and {STATE_DIR}/ while unfinished")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"samples per micro-batch (default {d.batch_size})")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help=f"micro-batches per optimizer step (default {d.grad_accum})")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default per stage: " +
                             ", ".join(f"{k}: {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up steps (default 3%% of --steps)")
    parser.add_argument("--min-lr-ratio", type=float, default=None,
                        help=f"the cosine decays to lr x this (default {d.min_lr_ratio})")
    parser.add_argument("--clip-norm", type=float, default=None,
                        help=f"gradient-norm clipping, 0 = off (default {d.clip_norm})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"initialisation and data order (default {d.seed})")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="float32, or bfloat16 autocast on CUDA (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tune-vision-tower", action="store_true", default=None,
                        help="stage 2: train the vision tower too (the reference code does)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"tokenizer size limit for a preset (default {d.vocab_size})")
    parser.add_argument("--log-every", type=int, default=None,
                        help=f"steps per {LOG_FILE} line (default {d.log_every})")
    parser.add_argument("--save-every", type=int, default=None,
                        help="steps between checkpoints (default 0: at the end only)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the unfinished run in --out (from {STATE_DIR}/)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous training output in --out")
    parser.add_argument("--halt-after", type=int, default=None, metavar="STEP",
                        help="stop after this global step, saving the state for --resume")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop after this wall time, saving the state for --resume")
    parser.add_argument("--keep-state", action="store_true",
                        help=f"keep {STATE_DIR}/ (optimizer state) after the last step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_ARG_FIELDS = ("stage", "init", "data", "json_files", "image_root", "steps", "batch_size",
               "grad_accum", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "clip_norm",
               "seed", "device", "dtype", "threads", "tune_vision_tower", "vocab_size",
               "log_every", "save_every", "focus_json", "focus_batch_size", "focus_weight")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed arguments (the stored one, updated by them, on --resume)."""
    given = {name: getattr(args, name) for name in _ARG_FIELDS
             if getattr(args, name, None) is not None}
    if args.resume:
        stored = resume_config(args.out)
        changed = sorted(k for k, v in given.items()
                         if k not in RUNTIME_FIELDS and getattr(stored, k) != v)
        if changed:
            raise TrainUsageError("--resume continues the stored run; these arguments differ "
                                  f"from it: {', '.join(changed)}")
        base = asdict(stored)
        base.update({k: v for k, v in given.items() if k in RUNTIME_FIELDS})
        return TrainConfig.from_dict(base).validate()
    if "stage" not in given:
        raise TrainUsageError("--stage is required (unless --resume)")
    return TrainConfig.from_dict(given).validate()


def run_train(args: argparse.Namespace) -> int:
    """`llava-phi train`: 0 ok (finished or halted as asked), 1 failure, 2 usage."""
    try:
        cfg = config_from_args(args)
        result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, halt_after=args.halt_after,
                       time_limit_s=args.time_limit, keep_state=args.keep_state)
    except TrainUsageError as exc:
        print(f"llava-phi train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainError, DataError, PresetError, TokenizerTrainingError, ConfigError,
            OSError) as exc:
        print(f"llava-phi train: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        saved = (Path(args.out) / STATE_DIR / STATE_FILE).is_file()
        print("llava-phi train: interrupted; " + (
            "--resume continues from the last checkpoint" if saved else
            "no checkpoint was saved yet (--save-every N saves one every N steps)"),
            file=sys.stderr)
        return 130
    done = "finished" if result.finished else f"halted (resume with --resume --out {args.out})"
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"stage {result.stage}: {done} at step {result.step}/{cfg.steps}{last}, "
          f"{result.seconds_per_step:.3f} s/step, {result.samples_per_s:.1f} samples/s; "
          f"model in {result.out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (`python -m llava_phi_ros.training.trainer`)."""
    parser = argparse.ArgumentParser(prog="llava-phi train",
                                     description="Train LLaVA-Phi stages (0, 1, 2).")
    add_train_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m llava_phi_ros.training.trainer`."""
    return run_train(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
