"""Training data: LLaVA-JSON conversations and scene specs, tokenised and batched for training.

Everything a sample goes through is what inference does to a question: `preprocess_image` (pad to
square, resize, normalise), the phi-2_v0 template (`build_prompt` / `render_conversation`) and
`tokenize_prompt`. Labels keep only the assistant's tokens: each answer after "ASSISTANT:"
(with its leading space) and its closing `<|endoftext|>`; the system prompt, the USER turns,
"ASSISTANT:", the image positions and the padding are IGNORE_INDEX.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..model.preprocess import ImagePreprocessConfig, load_image, pixel_values, square_crop
from ..model.prompt import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    STOP_STRING,
    PromptError,
    TextTokenizer,
    build_prompt,
    render_conversation,
    strip_image_token,
    tokenize_prompt,
)

IGNORE_INDEX = -100
BACKGROUND = "background"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
MODES = ("image", "text", "caption")


class DataError(ValueError):
    """A data file or record that cannot be used for training."""


class TokenizationMismatchError(DataError):
    """Turn-by-turn tokenisation differs from tokenising the whole conversation."""


# ----- LLaVA JSON ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One LLaVA-JSON conversation about (at most) one image."""

    id: str
    image: Path | None  # resolved path, None for a text-only record
    turns: tuple[tuple[str, str], ...]  # (question, answer), `<image>` removed


def _read_json(path: Path) -> Any:
    """Parse a JSON file; DataError naming the file on any failure."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def resolve_image(name: str, json_dir: Path, image_root: Path | None = None) -> Path:
    """An image path from a record: under image_root, else the JSON's directory or its images/."""
    candidates = [image_root / name] if image_root is not None else \
        [json_dir / name, json_dir / "images" / name]
    for path in candidates:
        if path.is_file():
            return path.resolve()  # one key per file, whichever JSON names it
    raise DataError(f"image {name!r} not found (looked for {', '.join(map(str, candidates))})")


def _turns(item: Mapping[str, Any], rid: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of a record: strictly alternating human / gpt messages."""
    messages = item.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"record {rid}: 'conversations' must be a non-empty list")
    roles: list[str] = []
    values: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("value"), str):
            raise DataError(f"record {rid}: message {i} needs 'from' and a string 'value'")
        roles.append(str(msg.get("from", "")).lower())
        values.append(msg["value"])
    start = 0
    while start < len(roles) and roles[start] in ASSISTANT_ROLES:  # as LLaVA: skip a leading gpt
        start += 1
    turns = []
    for i in range(start, len(roles), 2):
        if roles[i] not in HUMAN_ROLES or i + 1 >= len(roles) or \
                roles[i + 1] not in ASSISTANT_ROLES:
            raise DataError(f"record {rid}: messages must alternate human, gpt (got "
                            f"{roles[i:i + 2]} at message {i})")
        question, answer = strip_image_token(values[i]), values[i + 1].strip()
        if not question or not answer:
            raise DataError(f"record {rid}: empty question or answer at message {i}")
        if STOP_STRING in question or STOP_STRING in answer or IMAGE_TOKEN in answer:
            raise DataError(f"record {rid}: message {i} holds a special token "
                            f"({STOP_STRING!r} or {IMAGE_TOKEN!r} in an answer)")
        turns.append((question, answer))
    if not turns:
        raise DataError(f"record {rid}: no (human, gpt) turn")
    return tuple(turns)


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Records of a LLaVA-JSON file ({"id", "image", "conversations": [{"from", "value"}]})."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    root = None if image_root is None else Path(image_root)
    records = []
    for index, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise DataError(f"{path}: record {index} is not an object")
        rid = str(item.get("id", index))
        turns = _turns(item, rid)
        image = item.get("image")
        if image is None:
            if any(IMAGE_TOKEN in str(m.get("value", "")) for m in item["conversations"]):
                raise DataError(f"{path}: record {rid} has {IMAGE_TOKEN!r} but no 'image'")
            records.append(Record(rid, None, turns))
            continue
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: record {rid}: 'image' must be a file name (one image)")
        records.append(Record(rid, resolve_image(image, path.parent, root), turns))
    return records


def captions_by_image(records: Iterable[Record]) -> dict[Path, str]:
    """The first answer of each image's first record: its caption, for caption-mode text."""
    out: dict[Path, str] = {}
    for record in records:
        if record.image is not None and record.image not in out:
            out[record.image] = record.turns[0][1]
    return out


def conversation_texts(records: Iterable[Record]) -> list[str]:
    """Each record rendered with the template (no image): the tokenizer's training text."""
    return [render_conversation(r.turns, with_image=False) for r in records]


# ----- tokenisation --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedConversation:
    """Prompt ids (IMAGE_TOKEN_INDEX for the image) and labels of equal length."""

    ids: list[int]
    labels: list[int]  # IGNORE_INDEX except the assistant's tokens
    answer_spans: list[tuple[int, int]]  # [start, end) in ids of each answer + its stop token
    prompt_ends: list[int]  # length of the inference prompt of each turn


def tokenize_conversation(turns: Sequence[tuple[str, str]], tokenizer: TextTokenizer,
                          with_image: bool = True, system: str | None = None,
                          ) -> TokenizedConversation:
    """Tokenise a conversation turn by turn, labelling only answers (+ their stop token).

    Each turn's prompt is the text `build_prompt` gives at inference after the earlier turns, and
    each answer is what follows it in `render_conversation`: " ANSWER<|endoftext|>". The pieces
    are tokenised apart, and the result must equal tokenising the whole text at once (else
    TokenizationMismatchError), so the labels line up with what the model sees.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    prompt_ends: list[int] = []
    done = ""
    try:
        for k, (question, _answer) in enumerate(turns):
            prompt = build_prompt(question, turns[:k], system, with_image)
            rendered = render_conversation(turns[:k + 1], system, with_image)
            if not prompt.startswith(done) or not rendered.startswith(prompt):
                raise DataError(f"turn {k}: the template's prompt does not extend the earlier "
                                "turns")  # cannot happen with phi-2_v0; guards template changes
            piece = tokenize_prompt(prompt[len(done):], tokenizer)
            answer = tokenizer.encode(rendered[len(prompt):])  # " ANSWER<|endoftext|>"
            if eos is not None and (not answer or answer[-1] != eos or eos in answer[:-1]):
                raise DataError(f"turn {k}: the answer does not tokenise to text + one stop token")
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            prompt_ends.append(len(ids))
            spans.append((len(ids), len(ids) + len(answer)))
            ids += answer
            labels += answer
            done = rendered
    except PromptError as exc:
        raise DataError(str(exc)) from exc
    whole = tokenize_prompt(done, tokenizer)
    if whole != ids:
        first = next((i for i, (a, b) in enumerate(zip(whole, ids, strict=False))
                      if a != b),
                     min(len(whole), len(ids)))
        raise TokenizationMismatchError(
            f"turn-by-turn tokenisation differs from the whole conversation's at token {first} "
            f"({len(ids)} vs {len(whole)} tokens): labels would not line up")
    return TokenizedConversation(ids, labels, spans, prompt_ends)


# ----- images --------------------------------------------------------------------------------
class ImageStore:
    """Loads and preprocesses images with inference's `preprocess_image`; keeps them as uint8.

    The cache holds the padded, resized, cropped uint8 image (4x smaller than float32); the
    rescale and normalisation are redone on each use by the same two halves preprocess_image
    runs, so `pixels(path)` equals `preprocess_image(load_image(path), cfg)` bit for bit.
    """

    def __init__(self, preprocess: ImagePreprocessConfig, cache: bool = True):
        self.preprocess = preprocess
        self.cache = cache
        self._raw: dict[Path, np.ndarray] = {}
        self.sizes: dict[Path, tuple[int, int]] = {}  # (width, height) of each file, once read

    def _load_raw(self, path: Path) -> np.ndarray:
        raw = self._raw.get(path)
        if raw is not None:
            return raw
        image = load_image(path)
        self.sizes[path] = image.size
        raw = square_crop(image, self.preprocess)  # (3, S, S) uint8
        if self.cache:
            self._raw[path] = raw
        return raw

    def pixels(self, path: Path) -> np.ndarray:
        """float32 (3, S, S) pixel values of one image file."""
        return pixel_values(self._load_raw(path), self.preprocess)

    def batch(self, paths: Sequence[Path]) -> torch.Tensor:
        """(K, 3, S, S) float32 pixel values of K image files."""
        return torch.from_numpy(np.stack([self.pixels(p) for p in paths]))

    def size(self, path: Path) -> tuple[int, int]:
        """(width, height) of an image file before preprocessing."""
        if path not in self.sizes:
            self._load_raw(path)
        return self.sizes[path]


# ----- conversation dataset ------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One tokenised record: ids with at most one IMAGE_TOKEN_INDEX, labels, its image."""

    ids: list[int]
    labels: list[int]
    image: Path | None
    record_id: str


@dataclass
class Batch:
    """Right-padded model inputs; image placeholders expanded to their N positions."""

    input_ids: torch.Tensor  # (B, T) long; image positions and padding hold pad_id
    labels: torch.Tensor  # (B, T) long; IGNORE_INDEX except assistant tokens
    image_mask: torch.Tensor  # (B, T) bool; True at the image positions
    pixels: torch.Tensor | None  # (K, 3, S, S), one per sample with an image, in batch order
    lengths: torch.Tensor  # (B,) real length of each row

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device), self.labels.to(device),
                     self.image_mask.to(device),
                     None if self.pixels is None else self.pixels.to(device),
                     self.lengths.to(device))

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss counts (each predicted from the position before it)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def expanded(ids: Sequence[int], labels: Sequence[int], num_image_tokens: int,
             pad_id: int) -> tuple[list[int], list[int], list[bool]]:
    """Replace each IMAGE_TOKEN_INDEX by num_image_tokens pad ids labelled IGNORE_INDEX."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    mask: list[bool] = []
    for token, label in zip(ids, labels, strict=True):
        if token == IMAGE_TOKEN_INDEX:
            out_ids += [pad_id] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
            mask += [True] * num_image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
            mask.append(False)
    return out_ids, out_labels, mask


def collate(samples: Sequence[Sample], images: ImageStore | None, num_image_tokens: int,
            pad_id: int) -> Batch:
    """Expand image placeholders, right-pad to the longest row, load the images."""
    rows = [expanded(s.ids, s.labels, num_image_tokens, pad_id) for s in samples]
    t = max(len(r[0]) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros((b, t), dtype=torch.bool)
    for i, (ids, labs, mask) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        labels[i, :n] = torch.tensor(labs)
        image_mask[i, :n] = torch.tensor(mask)
    paths = [s.image for s in samples if IMAGE_TOKEN_INDEX in s.ids]
    if paths and images is None:
        raise DataError("samples hold images but no ImageStore was given")
    pixels = images.batch(paths) if paths else None  # type: ignore[union-attr]
    lengths = torch.tensor([len(r[0]) for r in rows])
    return Batch(input_ids, labels, image_mask, pixels, lengths)


@dataclass
class DatasetStats:
    """What building a dataset kept and left out."""

    records: int = 0
    samples: int = 0
    skipped_no_caption: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    max_length: int = 0  # longest expanded sample kept
    label_tokens: int = 0


class ConversationDataset:
    """Tokenised conversations, in one of three modes.

    - "image": as LLaVA trains: `<image>` first, the image's features spliced in;
    - "text": the conversation alone, no image (plain language-model text);
    - "caption": the image's caption (from `captions`) in the image's place, as text: the
      stage-0 LLM learns to answer from a scene description where the image will later be.
    """

    def __init__(self, records: Sequence[Record], tokenizer: TextTokenizer, mode: str = "image",
                 images: ImageStore | None = None, num_image_tokens: int = 0,
                 max_length: int | None = None, captions: Mapping[Path, str] | None = None,
                 system: str | None = None):
        if mode not in MODES:
            raise DataError(f"unknown dataset mode {mode!r} (choose from {', '.join(MODES)})")
        if mode == "image" and (images is None or num_image_tokens < 1):
            raise DataError("image mode needs an ImageStore and num_image_tokens >= 1")
        if mode == "caption" and captions is None:
            raise DataError("caption mode needs captions")
        self.mode = mode
        self.images = images if mode == "image" else None
        self.num_image_tokens = num_image_tokens
        self.pad_id = int(getattr(tokenizer, "eos_token_id", 0) or 0)
        self.stats = DatasetStats(records=len(records))
        self.samples: list[Sample] = []
        for record in records:
            sample = self._sample(record, tokenizer, captions, system, max_length)
            if sample is not None:
                self.samples.append(sample)
        if not self.samples:
            raise DataError(f"no usable samples among {len(records)} records ({self.stats})")
        self.stats.samples = len(self.samples)

    def _sample(self, record: Record, tokenizer: TextTokenizer,
                captions: Mapping[Path, str] | None, system: str | None,
                max_length: int | None) -> Sample | None:
        """One record tokenised (None when it cannot be used in this mode)."""
        turns = record.turns
        with_image = self.mode == "image" and record.image is not None
        if self.mode == "caption" and record.image is not None:  # text-only records as they are
            caption = captions.get(record.image)  # type: ignore[union-attr]
            if caption is None:
                self.stats.skipped_no_caption += 1
                return None
            turns = ((f"{caption}\n{turns[0][0]}", turns[0][1]), *turns[1:])
        try:
            tok = tokenize_conversation(turns, tokenizer, with_image, system)
        except DataError as exc:
            raise DataError(f"record {record.id}: {exc}") from exc
        ids, labels = tok.ids, tok.labels
        n_image = ids.count(IMAGE_TOKEN_INDEX)
        length = len(ids) + n_image * (self.num_image_tokens - 1)
        if max_length is not None and length > max_length:
            keep = max_length - n_image * (self.num_image_tokens - 1)
            if keep <= tok.prompt_ends[0]:  # not even the first answer's first token fits
                self.stats.skipped_too_long += 1
                return None
            ids, labels = ids[:keep], labels[:keep]
            self.stats.truncated += 1
            length = max_length
        self.stats.max_length = max(self.stats.max_length, length)
        self.stats.label_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
        return Sample(ids, labels, record.image if with_image else None, record.id)

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The collated batch of these sample indices."""
        return collate([self.samples[i] for i in indices], self.images, self.num_image_tokens,
                       self.pad_id)


# ----- scene specs and the vision pretext ----------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """One drawn object: names and its box in image pixels (x0, y0, x1, y1; x1, y1 exclusive)."""

    shape: str
    colour: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneSpec:
    """An image and the objects drawn on it, bottom to top."""

    image: Path
    objects: tuple[ObjectSpec, ...]
    size: tuple[int, int] | None = None  # (width, height) when the spec gives it


def _bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1] (list) or {"x0", "y0", "x1", "y1"} -> a checked tuple."""
    if isinstance(value, Mapping):
        value = [value.get(k) for k in ("x0", "y0", "x1", "y1")]
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: bbox must be [x0, y0, x1, y1], got {value!r}") from None
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"{where}: bbox {value!r} is empty (needs x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def _object_spec(obj: Any, where: str) -> ObjectSpec:
    """One entry of a scene's "objects" list."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: not an object")
    colour = obj.get("colour", obj.get("color"))
    shape = obj.get("shape")
    if not isinstance(colour, str) or not isinstance(shape, str):
        raise DataError(f"{where}: needs string 'shape' and 'colour' (or 'color'), got "
                        f"{sorted(obj)}")
    return ObjectSpec(shape, colour, _bbox(obj.get("bbox", obj.get("box")), where))


def read_scenes_json(path: str | Path, image_root: str | Path | None = None) -> list[SceneSpec]:
    """Scene specs, as `llava-phi scenes` writes them: {"scenes": [...]} (or a bare list) of
    {"image", "width", "height", "objects": [{"shape", "colour", "bbox": [x0, y0, x1, y1]}]},
    objects in drawing order; other keys are ignored."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, Mapping):
        data = data.get("scenes")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of scenes (or {{'scenes': [...]}})")
    root = None if image_root is None else Path(image_root)
    scenes = []
    for i, item in enumerate(data):
        where = f"{path}: scene {item.get('id', i) if isinstance(item, Mapping) else i}"
        if not isinstance(item, Mapping) or not isinstance(item.get("image"), str):
            raise DataError(f"{where}: needs a string 'image'")
        objects = item.get("objects")
        if not isinstance(objects, list):
            raise DataError(f"{where}: needs an 'objects' list")
        size = None
        if isinstance(item.get("width"), int) and isinstance(item.get("height"), int):
            size = (item["width"], item["height"])
        scenes.append(SceneSpec(resolve_image(item["image"], path.parent, root),
                                tuple(_object_spec(o, f"{where} object {j}")
                                      for j, o in enumerate(objects)), size))
    if not scenes:
        raise DataError(f"{path}: no scenes")
    return scenes


def object_raster(scene: SceneSpec, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8: 1 + the index of the topmost object on each pixel, 0 for background.

    Shapes are drawn as `llava-phi scenes` draws them (circle = inscribed ellipse, triangle =
    apex at the top centre, diamond = the edge midpoints, square and anything else = the box).
    """
    if len(scene.objects) > 254:
        raise DataError(f"{scene.image}: more than 254 objects")
    raster = Image.new("L", size, 0)
    draw = ImageDraw.Draw(raster)
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.bbox
        r, b = x1 - 1, y1 - 1  # inclusive drawing coordinates
        cx, cy = (x0 + r) / 2, (y0 + b) / 2
        shape = obj.shape.lower()
        if shape in ("circle", "ellipse", "oval"):
            draw.ellipse((x0, y0, r, b), fill=k + 1)
        elif shape == "triangle":
            draw.polygon([(cx, y0), (r, b), (x0, b)], fill=k + 1)
        elif shape == "diamond":
            draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=k + 1)
        else:
            draw.rectangle((x0, y0, r, b), fill=k + 1)
    return np.asarray(raster)


def crop_to_original(size: tuple[int, int], cfg: ImagePreprocessConfig
                     ) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy): a point (X, Y) of the preprocessed crop is (X*sx + ox, Y*sy + oy) in
    the original image, through the pad to square, the shortest-edge resize and the crop."""
    if not (cfg.do_resize and cfg.do_center_crop) or cfg.shortest_edge < cfg.image_size:
        raise DataError("patch labels need resize + centre crop with shortest_edge >= image_size")
    w, h = size
    pad_x = pad_y = 0
    if cfg.pad_to_square:
        side = max(w, h)
        pad_x, pad_y, w, h = (side - w) // 2, (side - h) // 2, side, side
    short, long = min(w, h), max(w, h)
    new_long = int(cfg.shortest_edge * long / short)  # as preprocess: the long side truncated
    rw, rh = (cfg.shortest_edge, new_long) if w <= h else (new_long, cfg.shortest_edge)
    left, top = (rw - cfg.image_size) // 2, (rh - cfg.image_size) // 2
    sx, sy = w / rw, h / rh
    return sx, sy, left * sx - pad_x, top * sy - pad_y


def pixel_labels(scene: SceneSpec, size: tuple[int, int],
                 cfg: ImagePreprocessConfig) -> np.ndarray:
    """(S, S) object index + 1 (0 = background or padding) at each preprocessed pixel centre."""
    sx, sy, ox, oy = crop_to_original(size, cfg)
    centres = np.arange(cfg.image_size) + 0.5
    xs = np.floor(centres * sx + ox).astype(np.int64)  # (S,) original column of each column
    ys = np.floor(centres * sy + oy).astype(np.int64)
    raster = object_raster(scene, size)  # (H, W)
    inside = (ys[:, None] >= 0) & (ys[:, None] < size[1]) & (xs[None] >= 0) & \
        (xs[None] < size[0])  # (S, S)
    labels = raster[np.clip(ys, 0, size[1] - 1)[:, None], np.clip(xs, 0, size[0] - 1)[None]]
    return np.where(inside, labels, 0)


@dataclass(frozen=True)
class PatchTargets:
    """What the stage-0b head learns to read off each patch feature (row-major patches)."""

    colours: torch.Tensor  # (P, n_colours) area fraction of each colour, class 0 = background
    shapes: torch.Tensor  # (P, n_shapes) area fraction of each shape, class 0 = background
    centres: torch.Tensor  # (P,) 1.0 where an object's bbox centre lies, else 0.0
    thirds: torch.Tensor  # (P,) long: the third of the original image's width (0 left .. 2)


def patch_targets(scene: SceneSpec, size: tuple[int, int], cfg: ImagePreprocessConfig,
                  patch_size: int, colours: Mapping[str, int], shapes: Mapping[str, int]
                  ) -> PatchTargets:
    """Per patch: the area of each colour and shape class (rows sum to 1), whether an object's
    centre is in it (what counting needs) and which third of the image it lies in (what
    left / middle / right needs), through the same pad / resize / crop as the pixels."""
    labels = pixel_labels(scene, size, cfg)  # (S, S)
    g = cfg.image_size // patch_size
    cells = labels[:g * patch_size, :g * patch_size].reshape(g, patch_size, g, patch_size)
    cells = cells.transpose(0, 2, 1, 3).reshape(g * g, patch_size * patch_size)  # (P, p*p)
    colour = np.zeros((g * g, len(colours)), dtype=np.float32)
    shape = np.zeros((g * g, len(shapes)), dtype=np.float32)
    for k in range(len(scene.objects) + 1):
        frac = (cells == k).mean(axis=1, dtype=np.float32)  # (P,)
        if k == 0:
            colour[:, 0] += frac
            shape[:, 0] += frac
        else:
            obj = scene.objects[k - 1]
            colour[:, colours[obj.colour]] += frac
            shape[:, shapes[obj.shape]] += frac
    sx, sy, ox, oy = crop_to_original(size, cfg)
    centres = np.zeros(g * g, dtype=np.float32)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        col = int(((x0 + x1) / 2 - ox) / sx // patch_size)  # original -> crop -> patch
        row = int(((y0 + y1) / 2 - oy) / sy // patch_size)
        if 0 <= row < g and 0 <= col < g:
            centres[row * g + col] = 1.0
    x_centre = (np.arange(g) + 0.5) * patch_size * sx + ox  # (G,) original x of each column
    thirds = np.clip(np.floor(3 * x_centre / size[0]), 0, 2).astype(np.int64)
    return PatchTargets(torch.from_numpy(colour), torch.from_numpy(shape),
                        torch.from_numpy(centres), torch.from_numpy(np.tile(thirds, g)))


@dataclass
class PatchBatch:
    """Images and per-patch targets for the vision pretext."""

    pixels: torch.Tensor  # (B, 3, S, S)
    colours: torch.Tensor  # (B, P, n_colours) area fractions, class 0 = background
    shapes: torch.Tensor  # (B, P, n_shapes)
    centres: torch.Tensor  # (B, P) 0/1
    thirds: torch.Tensor  # (B, P) long 0..2

    def to(self, device: torch.device | str) -> PatchBatch:
        """The same batch on `device`."""
        return PatchBatch(self.pixels.to(device), self.colours.to(device),
                          self.shapes.to(device), self.centres.to(device),
                          self.thirds.to(device))


@dataclass
class PatchLabelDataset:
    """Scenes with per-patch targets (class 0 = background) for the stage-0b pretext."""

    scenes: list[SceneSpec]
    images: ImageStore
    patch_size: int
    colour_names: list[str] = field(default_factory=list)  # index 0 = background
    shape_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scenes:
            raise DataError("no scenes for the vision pretext")
        if not self.colour_names:
            self.colour_names = [BACKGROUND, *sorted({o.colour for s in self.scenes
                                                      for o in s.objects})]
        if not self.shape_names:
            self.shape_names = [BACKGROUND, *sorted({o.shape for s in self.scenes
                                                     for o in s.objects})]
        colours = {n: i for i, n in enumerate(self.colour_names)}
        shapes = {n: i for i, n in enumerate(self.shape_names)}
        self._targets: list[PatchTargets] = []
        for scene in self.scenes:
            unknown = ({o.colour for o in scene.objects} - colours.keys()) | \
                ({o.shape for o in scene.objects} - shapes.keys())
            if unknown:
                raise DataError(f"{scene.image}: names outside the label set: {sorted(unknown)}")
            size = scene.size or self.images.size(scene.image)
            self._targets.append(patch_targets(scene, size, self.images.preprocess,
                                               self.patch_size, colours, shapes))

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, indices: Sequence[int]) -> PatchBatch:
        """Pixels and targets of these scene indices."""
        pixels = self.images.batch([self.scenes[i].image for i in indices])
        targets = [self._targets[i] for i in indices]
        return PatchBatch(pixels, *(torch.stack([getattr(t, name) for t in targets])
                                    for name in ("colours", "shapes", "centres", "thirds")))
