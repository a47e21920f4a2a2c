"""Procedurally generated scenes (Pillow) with captions, questions and an evaluation split.

A scene is 1-4 flat-coloured shapes on a pale background in a non-square image. Everything is
derived from a seed: scene ``i`` of seed ``s`` is drawn from ``np.random.default_rng([s, i])``
(a redraw, if it duplicated an earlier scene of the set, from ``[s, i, attempt]``), so a set is
reproducible, its first ``k`` scenes do not depend on ``n``, and two seeds draw from independent
streams. Every spec carries exact pixel geometry and per-object colour jitter, so two seeds
repeating a scene spec is vanishingly unlikely (the tests check it); within a set duplicates are
redrawn.

Layout rule (keeps "position" questions unambiguous): the image is split into three vertical
thirds, left / middle / right. Every object lies entirely inside one third, so the third its
centre is in is its position. With 1-3 objects each object has a third of its own. With 4 objects
one third holds two objects stacked (top half / bottom half) and the other two thirds one each;
position questions are asked only about objects alone in their third. Each (colour, shape) pair
occurs at most once per scene, so "the red circle" always names one object. "The circle" (colour
question) and "the red object" (shape question) are asked only when that shape / colour occurs
once in the scene.

Answer vocabulary (short answers are one lowercase word; see ``ANSWER_VOCABULARY``):
colour: red green blue yellow purple orange; shape: circle square triangle diamond;
count: one two three four; position: left middle right; yesno: yes no; mc: A B C D (the option's
letter); describe: the caption, e.g. "A red circle on the left and a blue square on the right."
Sizes (small / large) vary the pictures and are recorded in the spec; no question asks about them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SCENES_FORMAT_VERSION = 1

# Saturated, far apart (min pairwise distance ~ 90). red and blue are mirror images under an
# R <-> B channel swap, so a swapped red object is exactly palette blue and vice versa.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 30, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_OBJECTS = 4
COLOUR_JITTER = 12  # per channel, so a drawn colour stays far nearer its palette entry than others

# Pale, unsaturated colours (never close to an object colour, before or after an R <-> B swap).
BACKGROUND_COLOURS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 240), (205, 205, 205), (150, 150, 150), (70, 70, 70),
    (230, 220, 195), (205, 220, 235), (215, 230, 210), (240, 220, 225),
)
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise")
IMAGE_SIZES: tuple[tuple[int, int], ...] = (  # (width, height), none square
    (160, 120), (200, 150), (224, 168), (240, 135), (150, 200),
)

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "yesno", "mc",
                                   "describe")
ANSWER_VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": POSITIONS,
    "yesno": ("yes", "no"),
    "mc": ("A", "B", "C", "D"),
}  # "describe" answers are captions (see caption())

DESCRIBE_QUESTION = "Describe the image briefly."
# The stage-1 caption prompts: a few of LLaVA's brief-description instructions.
CAPTION_PROMPTS: tuple[str, ...] = (
    DESCRIBE_QUESTION,
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
)
MC_DRILL_FILE = "mc_text.json"
MC_DRILL_EVERY = 2  # one text-only mc drill per this many scenes
MC_FILE = "mc.json"  # one single-turn image mc question per scene (a focus set for training)
SINGLE_FILE = "single.json"  # every question type asked alone with its image, one per record
COLOURS_FILE = "colours.json"  # the colour of every uniquely shaped object, asked in turn
MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA ScienceQA
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What color is the {shape}?",
               "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} object?", "What is the shape of the {colour} object?"),
    "count": ("How many objects are there?", "How many objects are in the image?",
              "How many shapes are there?"),
    "position": ("Where is the {colour} {shape}?",
                 "Is the {colour} {shape} on the left, in the middle or on the right?"),
    "yesno": ("Is there a {colour} {shape} in the image?", "Is there a {colour} {shape}?"),
}
_PLACE_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


class SceneError(ValueError):
    """Bad arguments for scene generation or an unusable output directory."""


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, where it is (bbox = left, top, right, bottom; right/bottom
    exclusive, like PIL's crop box) and the exact RGB it is drawn in."""

    shape: str
    colour: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding box in pixels (x, y)."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        """'red circle'."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """plain: colour; gradient: colour -> colour2 along direction; noise: colour + N(0, sigma)."""

    kind: str
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int] | None = None
    direction: str | None = None  # "horizontal" or "vertical" for gradients
    noise_sigma: float = 0.0
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """Objects (in the order they were drawn) on a background, in a width x height image."""

    objects: tuple[SceneObject, ...]
    background: Background
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready spec."""
        return {"width": self.width, "height": self.height,
                "background": asdict(self.background),
                "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        """Inverse of to_dict."""
        bg = dict(d["background"])
        bg["colour"] = tuple(bg["colour"])
        if bg.get("colour2") is not None:
            bg["colour2"] = tuple(bg["colour2"])
        objects = tuple(SceneObject(shape=o["shape"], colour=o["colour"], size=o["size"],
                                    position=o["position"], bbox=tuple(o["bbox"]),
                                    rgb=tuple(o["rgb"])) for o in d["objects"])
        return Scene(objects=objects, background=Background(**bg), width=int(d["width"]),
                     height=int(d["height"]))

    def ordered(self) -> list[SceneObject]:
        """Objects left to right (top to bottom within a shared third): the caption's order."""
        return sorted(self.objects, key=lambda o: (POSITIONS.index(o.position), o.centre[1]))

    def alone_in_third(self) -> list[SceneObject]:
        """Objects whose third holds no other object (the subjects of position questions)."""
        counts = {p: sum(o.position == p for o in self.objects) for p in POSITIONS}
        return [o for o in self.ordered() if counts[o.position] == 1]


@dataclass
class QA:
    """One question about a scene; options (texts, without letters) only for mc."""

    question: str
    answer: str
    question_type: str
    options: list[str] | None = None


@dataclass
class SceneSetInfo:
    """What write_scenes wrote."""

    out_dir: Path
    seed: int
    n_scenes: int
    n_caption_records: int
    n_instruct_records: int
    n_eval_questions: int
    eval_counts: dict[str, int] = field(default_factory=dict)
    yesno_yes_fraction: float = 0.0
    seconds: float = 0.0


class _Rng:
    """One interface over random.Random and np.random.Generator."""

    def __init__(self, rng: random.Random | np.random.Generator | _Rng):
        if isinstance(rng, _Rng):
            rng = rng.rng
        if not isinstance(rng, (random.Random, np.random.Generator)):
            raise TypeError(f"rng must be random.Random or numpy.random.Generator, "
                            f"got {type(rng).__name__}")
        self.rng = rng

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        if isinstance(self.rng, random.Random):
            return self.rng.randint(lo, hi)
        return int(self.rng.integers(lo, hi + 1))

    def random(self) -> float:
        """Uniform float in [0, 1)."""
        return float(self.rng.random())

    def uniform(self, lo: float, hi: float) -> float:
        """Uniform float in [lo, hi)."""
        return lo + (hi - lo) * self.random()

    def choice(self, seq: Sequence[Any]) -> Any:
        """One element of a non-empty sequence."""
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: list[Any]) -> None:
        """Shuffle in place (Fisher-Yates, the same on both generators' draws)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(0, i)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[Any], k: int) -> list[Any]:
        """k distinct elements in random order."""
        items = list(seq)
        self.shuffle(items)
        return items[:k]


def _jitter(rgb: tuple[int, int, int], amount: int, r: _Rng) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + r.randint(-amount, amount))) for c in rgb)  # type: ignore


def _random_background(r: _Rng) -> Background:
    kind = r.choice(BACKGROUND_KINDS)
    base = r.choice(BACKGROUND_COLOURS)
    colour = _jitter(base, 8, r)
    if kind == "gradient":
        other = [c for c in BACKGROUND_COLOURS if c != base]
        return Background(kind, colour, _jitter(r.choice(other), 8, r),
                          r.choice(("horizontal", "vertical")))
    if kind == "noise":
        return Background(kind, colour, noise_sigma=round(r.uniform(3.0, 8.0), 2),
                          noise_seed=r.randint(0, 2**31 - 1))
    return Background(kind, colour)


def _place(r: _Rng, x_lo: float, x_hi: float, y_lo: float, y_hi: float, size: int
           ) -> tuple[int, int, int, int]:
    """A size x size box inside the cell [x_lo, x_hi) x [y_lo, y_hi), 2 px clear of its edges."""
    x0 = r.randint(int(np.ceil(x_lo)) + 2, int(np.floor(x_hi)) - 2 - size)
    y0 = r.randint(int(np.ceil(y_lo)) + 2, int(np.floor(y_hi)) - 2 - size)
    return (x0, y0, x0 + size, y0 + size)


def random_scene(rng: random.Random | np.random.Generator, n_objects: int | None = None,
                 image_size: tuple[int, int] | None = None) -> Scene:
    """Draw a scene: n_objects (default uniform 1-4) distinct (colour, shape) pairs, laid out by
    the module's rule (each object inside one horizontal third; with 4, one third holds two)."""
    r = _Rng(rng)
    if n_objects is None:
        n_objects = r.randint(1, MAX_OBJECTS)
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise SceneError(f"n_objects must be 1..{MAX_OBJECTS}, got {n_objects}")
    width, height = image_size if image_size is not None else r.choice(IMAGE_SIZES)
    if min(width, height) < 48:
        raise SceneError(f"image size {width}x{height} is too small (min side 48)")
    pairs = r.sample([(c, s) for c in COLOURS for s in SHAPES], n_objects)
    if n_objects <= 3:
        cells = [(p, 0, 1) for p in r.sample(POSITIONS, n_objects)]  # (third, row, rows)
    else:
        stacked = r.choice(POSITIONS)
        cells = [(stacked, 0, 2), (stacked, 1, 2)] + [(p, 0, 1) for p in POSITIONS
                                                       if p != stacked]
        r.shuffle(cells)
    third = width / 3
    objects = []
    for (colour, shape), (pos, row, rows) in zip(pairs, cells, strict=True):
        cell_h = height / rows
        base = 0.9 * min(third, cell_h) - 4
        size_name = r.choice(SIZES)
        frac = r.uniform(0.52, 0.64) if size_name == "small" else r.uniform(0.84, 1.0)
        size = max(8, int(base * frac))
        col = POSITIONS.index(pos)
        bbox = _place(r, col * third, (col + 1) * third, row * cell_h, (row + 1) * cell_h, size)
        objects.append(SceneObject(shape, colour, size_name, pos, bbox,
                                   _jitter(PALETTE[colour], COLOUR_JITTER, r)))
    return Scene(tuple(objects), _random_background(r), width, height)


def _background_array(bg: Background, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 background."""
    base = np.empty((height, width, 3), dtype=np.float32)
    base[:] = bg.colour
    if bg.kind == "gradient":
        if bg.colour2 is None or bg.direction not in ("horizontal", "vertical"):
            raise SceneError(f"gradient background needs colour2 and a direction: {bg}")
        n = width if bg.direction == "horizontal" else height
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)
        t = t[None, :, None] if bg.direction == "horizontal" else t[:, None, None]
        base = (1 - t) * np.asarray(bg.colour, np.float32) + t * np.asarray(bg.colour2,
                                                                           np.float32)
        base = np.broadcast_to(base, (height, width, 3))
    elif bg.kind == "noise":
        noise = np.random.default_rng(bg.noise_seed).normal(0.0, bg.noise_sigma,
                                                            (height, width, 3))
        base = base + noise.astype(np.float32)
    elif bg.kind != "plain":
        raise SceneError(f"unknown background kind {bg.kind!r}; expected {BACKGROUND_KINDS}")
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def _shape_points(shape: str, bbox: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = bbox
    r, b = x1 - 1, y1 - 1  # inclusive drawing coordinates
    cx, cy = (x0 + r) / 2, (y0 + b) / 2
    if shape == "triangle":
        return [(cx, y0), (r, b), (x0, b)]
    if shape == "diamond":
        return [(cx, y0), (r, cy), (cx, b), (x0, cy)]
    raise SceneError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image (deterministic: the spec fixes every pixel)."""
    image = Image.fromarray(_background_array(scene.background, scene.width, scene.height), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        box = (x0, y0, x1 - 1, y1 - 1)
        if obj.shape == "circle":
            draw.ellipse(box, fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle(box, fill=obj.rgb)
        else:
            draw.polygon(_shape_points(obj.shape, obj.bbox), fill=obj.rgb)
    return image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """'A red circle on the left and a blue square on the right.' (objects left to right)."""
    parts = [f"{_article(o.colour)} {o.colour} {o.shape} {_PLACE_PHRASE[o.position]}"
             for o in scene.ordered()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def available_types(scene: Scene) -> list[str]:
    """The question types this scene can be asked (colour/shape need a unique shape/colour)."""
    out = []
    for qtype in QUESTION_TYPES:
        if qtype == "colour" and not _unique(scene, "shape"):
            continue
        if qtype == "shape" and not _unique(scene, "colour"):
            continue
        out.append(qtype)
    return out


def _unique(scene: Scene, attr: str) -> list[SceneObject]:
    """Objects whose `attr` value occurs once in the scene."""
    values = [getattr(o, attr) for o in scene.objects]
    return [o for o in scene.ordered() if values.count(getattr(o, attr)) == 1]


def _base_question(scene: Scene, qtype: str, r: _Rng) -> QA:
    """A colour/shape/count/position question (the bases of mc questions too)."""
    if qtype == "colour":
        obj = r.choice(_unique(scene, "shape"))
        return QA(r.choice(TEMPLATES["colour"]).format(shape=obj.shape), obj.colour, qtype)
    if qtype == "shape":
        obj = r.choice(_unique(scene, "colour"))
        return QA(r.choice(TEMPLATES["shape"]).format(colour=obj.colour), obj.shape, qtype)
    if qtype == "count":
        return QA(r.choice(TEMPLATES["count"]), COUNT_WORDS[len(scene.objects) - 1], qtype)
    if qtype == "position":
        obj = r.choice(scene.alone_in_third())
        return QA(r.choice(TEMPLATES["position"]).format(colour=obj.colour, shape=obj.shape),
                  obj.position, qtype)
    raise SceneError(f"no base question of type {qtype!r}")


def _yesno(scene: Scene, r: _Rng, answer_yes: bool | None) -> QA:
    yes = r.random() < 0.5 if answer_yes is None else answer_yes
    present = {(o.colour, o.shape) for o in scene.objects}
    if yes:
        colour, shape = r.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # Half the negatives share a colour or a shape with a present object (POPE's
        # "adversarial" flavour: only binding colour to shape tells them apart).
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = r.choice(near if near and r.random() < 0.5 else absent)
    return QA(r.choice(TEMPLATES["yesno"]).format(colour=colour, shape=shape),
              "yes" if yes else "no", "yesno")


def _multiple_choice(scene: Scene, r: _Rng) -> QA:
    base_types = [t for t in ("colour", "shape", "count", "position")
                  if t in available_types(scene)]
    base = _base_question(scene, r.choice(base_types), r)
    vocab = ANSWER_VOCABULARY[base.question_type]
    n_options = min(len(vocab), r.choice((3, 4)))
    # Distractors present elsewhere in the scene first: telling them apart needs the image.
    attr = {"colour": "colour", "shape": "shape", "position": "position"}.get(base.question_type)
    in_scene = sorted({getattr(o, attr) for o in scene.objects} - {base.answer}) if attr else []
    rest = [v for v in vocab if v != base.answer and v not in in_scene]
    distractors = (r.sample(in_scene, len(in_scene)) + r.sample(rest, len(rest)))[:n_options - 1]
    options = [base.answer] + distractors
    r.shuffle(options)
    letters = "ABCD"
    lines = [f"{letters[i]}. {opt}" for i, opt in enumerate(options)]
    text = "\n".join([base.question, *lines, MC_SUFFIX])
    return QA(text, letters[options.index(base.answer)], "mc", options)


def mc_drill(scene: Scene, rng: random.Random | np.random.Generator) -> QA | None:
    """A text-only multiple-choice question whose answer is stated in its first line: the
    letter-lookup half of an mc question on its own (None when the scene has no mc question)."""
    qa = make_question(scene, "mc", rng)
    if qa is None or qa.options is None:
        return None
    word = qa.options["ABCD".index(qa.answer)]
    return QA(f"Context: the answer is {word}.\n{qa.question}", qa.answer, "mc_drill",
              qa.options)


def make_question(scene: Scene, question_type: str, rng: random.Random | np.random.Generator,
                  answer_yes: bool | None = None) -> QA | None:
    """One question of the given type, or None when the scene cannot be asked it; answer_yes
    forces the answer of a yes/no question."""
    r = _Rng(rng)
    if question_type not in QUESTION_TYPES:
        raise SceneError(f"unknown question type {question_type!r}; expected {QUESTION_TYPES}")
    if question_type not in available_types(scene):
        return None
    if question_type == "yesno":
        return _yesno(scene, r, answer_yes)
    if question_type == "mc":
        return _multiple_choice(scene, r)
    if question_type == "describe":
        return QA(DESCRIBE_QUESTION, caption(scene), "describe")
    return _base_question(scene, question_type, r)


def questions(scene: Scene, rng: random.Random | np.random.Generator) -> list[QA]:
    """One question of every type the scene allows, in QUESTION_TYPES order (yes/no 50/50)."""
    r = _Rng(rng)
    out = [make_question(scene, t, r) for t in available_types(scene)]
    return [qa for qa in out if qa is not None]


def scene_key(scene: Scene) -> str:
    """A canonical string of the full spec: equal keys = identical scenes."""
    return json.dumps(scene.to_dict(), sort_keys=True, separators=(",", ":"))


def _conversation(turns: Sequence[tuple[str, str]], image: bool = True) -> list[dict[str, str]]:
    """LLaVA messages of (question, answer) turns; `<image>` opens the first when image."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 and image else "") + q})
        conv.append({"from": "gpt", "value": a})
    return conv


def single_turn_records(scene: Scene, scene_id: str, image: str, seed: int, index: int
                        ) -> list[dict[str, Any]]:
    """LLaVA records of one question of every type the scene allows, each asked alone with the
    image (scene `index` of `seed`; its own random stream, apart from the conversation's)."""
    r = _Rng(np.random.default_rng([seed, index, 2**32 - 4]))
    return [_single_turn_record(f"{scene_id}_{qa.question_type}", image, qa)
            for qa in questions(scene, r)]


def _single_turn_record(record_id: str, image: str, qa: QA) -> dict[str, Any]:
    """A LLaVA record of one question asked with its image."""
    return {"id": record_id, "image": image, "question_types": [qa.question_type],
            "conversations": _conversation([(qa.question, qa.answer)])}


def colour_conversation(scene: Scene, scene_id: str, image: str, seed: int, index: int
                        ) -> list[dict[str, Any]]:
    """One LLaVA record asking the colour of each uniquely shaped object in a random order (none
    for a scene of one object, whose colour question needs no binding)."""
    unique = _unique(scene, "shape")
    if len(scene.objects) < 2 or not unique:
        return []
    r = _Rng(np.random.default_rng([seed, index, 2**32 - 5]))
    turns = [(r.choice(TEMPLATES["colour"]).format(shape=o.shape), o.colour)
             for o in r.sample(unique, len(unique))]
    return [{"id": f"{scene_id}_colours", "image": image, "question_types": ["colour"] * len(turns),
             "conversations": _conversation(turns)}]


def _eval_quota(n_questions: int) -> dict[str, int]:
    k, extra = divmod(n_questions, len(QUESTION_TYPES))
    return {t: k + (i < extra) for i, t in enumerate(QUESTION_TYPES)}


def _eval_questions(scenes: Sequence[Scene], image_paths: Sequence[str], n_questions: int,
                    seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Balanced over types (yes/no alternating yes, no), interleaved so any prefix is balanced
    too; (question line, answer line) pairs."""
    r = _Rng(np.random.default_rng([seed, 2**32 - 1]))  # a stream no scene index uses
    per_type: dict[str, list[tuple[int, QA]]] = {}
    for qtype, quota in _eval_quota(n_questions).items():
        order = list(range(len(scenes)))
        r.shuffle(order)
        chosen: list[tuple[int, QA]] = []
        seen: set[tuple[int, str]] = set()
        stalled = 0
        pos = 0
        while len(chosen) < quota:
            idx = order[pos % len(order)]
            pos += 1
            want_yes = len(chosen) % 2 == 0 if qtype == "yesno" else None
            qa = make_question(scenes[idx], qtype, r, answer_yes=want_yes)
            if qa is not None and (idx, qa.question) not in seen:
                seen.add((idx, qa.question))
                chosen.append((idx, qa))
                stalled = 0
            else:
                stalled += 1
                if stalled > 50 * len(order):
                    raise SceneError(f"cannot make {quota} distinct {qtype!r} questions from "
                                     f"{len(scenes)} scenes; lower --eval-questions or raise --n")
        per_type[qtype] = chosen
    lines = []
    qid = 0
    for i in range(max((len(v) for v in per_type.values()), default=0)):
        for qtype in QUESTION_TYPES:
            if i < len(per_type[qtype]):
                idx, qa = per_type[qtype][i]
                q = {"question_id": qid, "image": image_paths[idx], "text": qa.question,
                     "category": qtype}
                a = {"question_id": qid, "answer": qa.answer, "category": qtype}
                if qa.options is not None:
                    a["options"] = qa.options
                lines.append((q, a))
                qid += 1
    return lines


_README = """\
Synthetic scenes written by `llava-phi scenes` (llava_phi_ros.training.scenes), seed {seed}.

images/*.png        {n} scenes: 1-4 shapes on a pale background, non-square sizes
scenes.json         every scene's spec (objects with shape, colour, size, position, bbox, rgb;
                    background; image size) with its id and caption, for tests and debugging
captions.json       LLaVA JSON, stage-1 captions: {{"id", "image", "conversations": [human
                    "<image>\\n<caption prompt>", gpt caption]}}
instruct.json       LLaVA JSON, stage-2 instructions: multi-turn conversations mixing the question
                    types; each record has an extra "question_types" list (one per turn)
mc_text.json        LLaVA JSON, text only: multiple-choice drills that state the answer
                    ("Context: the answer is red." + an mc question), one per {every} scenes; they
                    teach the tiny LLM to pick an option's letter, which it cannot learn from
                    the image questions alone
mc.json             LLaVA JSON: one more multiple-choice question per scene, single turn with its
                    image, for a focus batch (`llava-phi train --focus-json`): an mc answer is
                    one token of a long conversation, too little of the loss to be learnt
single.json         LLaVA JSON: one more question of every type per scene, each asked alone
                    with its image (a record per question), as the eval asks them: in a
                    conversation an earlier turn often states the answer of a later one ("Where
                    is the red circle?" before "What colour is the circle?"), a text shortcut
colours.json        LLaVA JSON: for every scene of 2+ objects, one conversation asking the colour
                    of each uniquely shaped object in turn (no turn states another's answer):
                    finding an object by its shape and reading its colour is the hardest
                    binding for the tiny model
eval/questions.jsonl  LLaVA eval style: {{"question_id", "image", "text", "category"}}; one
                    question per line, balanced over categories, yes/no half yes
eval/answers.jsonl  {{"question_id", "answer", "category"}} (+ "options" for mc)

Categories and answers: colour (red green blue yellow purple orange), shape (circle square triangle
diamond), count (one two three four), position (left middle right; the third of the image the
object is in), yesno (yes no), mc (A B C D: the option's letter), describe (the caption).
Image paths are relative to this directory. Score a model with `llava-phi eval --data DIR`.
"""


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SceneError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SceneError(f"{out} is not empty; use --overwrite to replace a scene set there")
        if not (out / "scenes.json").is_file():
            raise SceneError(f"{out} is not empty and holds no scenes.json; --overwrite only "
                             f"replaces a scene set written by this command")
        for name in ("images", "eval"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in ("scenes.json", "captions.json", "instruct.json", MC_DRILL_FILE, MC_FILE,
                     SINGLE_FILE, COLOURS_FILE, "README.txt"):
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)


def generate_scenes(n: int, seed: int, object_counts: Sequence[int] = (1, 2, 3, 4)
                    ) -> list[Scene]:
    """The n scenes of a seed, no two identical (scene i from default_rng([seed, i]))."""
    counts = _check_counts(object_counts)
    scenes, keys = [], set()
    for i in range(n):
        for attempt in range(100):
            entropy = [seed, i] if attempt == 0 else [seed, i, attempt]
            r = _Rng(np.random.default_rng(entropy))
            scene = random_scene(r, n_objects=r.choice(counts))
            key = scene_key(scene)
            if key not in keys:
                break
        else:  # pragma: no cover - needs ~1e10 scenes
            raise SceneError(f"scene {i}: 100 draws all duplicated earlier scenes")
        keys.add(key)
        scenes.append(scene)
    return scenes


def _check_counts(object_counts: Sequence[int]) -> list[int]:
    counts = sorted(set(int(c) for c in object_counts))
    if not counts or counts[0] < 1 or counts[-1] > MAX_OBJECTS:
        raise SceneError(f"object counts must be within 1..{MAX_OBJECTS}, got "
                         f"{list(object_counts)}")
    return counts


def write_scenes(out_dir: str | Path, n: int, seed: int, eval_questions: int | None = None,
                 object_counts: Sequence[int] = (1, 2, 3, 4), overwrite: bool = False,
                 progress: bool = True) -> SceneSetInfo:
    """Render n scenes of a seed and write images, captions.json, instruct.json, the eval split,
    scenes.json and README.txt into out_dir (eval_questions default: 7 per scene, one per
    type)."""
    start = time.perf_counter()
    if n < 1:
        raise SceneError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise SceneError(f"seed must be >= 0, got {seed}")
    n_eval = len(QUESTION_TYPES) * n if eval_questions is None else eval_questions
    if n_eval < 0:
        raise SceneError(f"eval_questions must be >= 0, got {n_eval}")
    out = Path(out_dir)
    scenes = generate_scenes(n, seed, object_counts)
    _prepare_out_dir(out, overwrite)
    from tqdm import tqdm

    ids = [f"s{seed}_{i:06d}" for i in range(n)]
    paths = [f"images/{sid}.png" for sid in ids]
    captions, instruct, specs, drills, mcs, singles, colours = [], [], [], [], [], [], []
    for i in tqdm(range(n), desc="scenes", unit="scene", disable=not progress or n < 100,
                  file=sys.stderr):
        scene = scenes[i]
        render_scene(scene).save(out / paths[i], compress_level=1)
        r = _Rng(np.random.default_rng([seed, i, 2**32 - 1]))  # text stream of scene i
        text = caption(scene)
        captions.append({"id": ids[i], "image": paths[i],
                         "conversations": _conversation([(r.choice(CAPTION_PROMPTS), text)])})
        qas = [qa for qa in questions(scene, r) if qa.question_type != "describe"]
        if r.random() < 0.5:
            qas.append(QA(DESCRIBE_QUESTION, text, "describe"))
        r.shuffle(qas)
        instruct.append({"id": ids[i], "image": paths[i],
                         "conversations": _conversation([(q.question, q.answer) for q in qas]),
                         "question_types": [q.question_type for q in qas]})
        specs.append({"id": ids[i], "image": paths[i], "caption": text} | scene.to_dict())
        if i % MC_DRILL_EVERY == 0:
            drill = mc_drill(scene, np.random.default_rng([seed, i, 2**32 - 2]))
            if drill is not None:
                drills.append({"id": f"{ids[i]}_mc", "conversations": _conversation(
                    [(drill.question, drill.answer)], image=False), "question_types": ["mc_drill"]})
        mc = make_question(scene, "mc", np.random.default_rng([seed, i, 2**32 - 3]))
        if mc is not None:
            mcs.append(_single_turn_record(f"{ids[i]}_mc1", paths[i], mc))
        singles += single_turn_records(scene, ids[i], paths[i], seed, i)
        colours += colour_conversation(scene, ids[i], paths[i], seed, i)
    pairs = _eval_questions(scenes, paths, n_eval, seed)
    _write_json(out / "captions.json", captions)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / MC_DRILL_FILE, drills)
    _write_json(out / MC_FILE, mcs)
    _write_json(out / SINGLE_FILE, singles)
    _write_json(out / COLOURS_FILE, colours)
    _write_json(out / "scenes.json", {"format_version": SCENES_FORMAT_VERSION, "seed": seed,
                                      "n": n, "object_counts": _check_counts(object_counts),
                                      "scenes": specs})
    with open(out / "eval" / "questions.jsonl", "w") as fq, \
            open(out / "eval" / "answers.jsonl", "w") as fa:
        for q, a in pairs:
            fq.write(json.dumps(q) + "\n")
            fa.write(json.dumps(a) + "\n")
    (out / "README.txt").write_text(_README.format(seed=seed, n=n, every=MC_DRILL_EVERY))
    eval_counts = {t: sum(q["category"] == t for q, _ in pairs) for t in QUESTION_TYPES}
    yn = [a["answer"] for _, a in pairs if a["category"] == "yesno"]
    return SceneSetInfo(out, seed, n, len(captions), len(instruct), len(pairs), eval_counts,
                        yn.count("yes") / len(yn) if yn else 0.0, time.perf_counter() - start)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def add_scenes_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llava-phi scenes`."""
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--n", type=int, required=True, help="number of scenes (>= 1)")
    parser.add_argument("--seed", type=int, required=True,
                        help="seed (>= 0); different seeds give disjoint scene sets")
    parser.add_argument("--eval-questions", type=int, default=None, metavar="N",
                        help="questions in eval/ (default: 7 per scene, one per type)")
    parser.add_argument("--objects", default="1,2,3,4", metavar="COUNTS",
                        help="comma-separated object counts to draw from (default 1,2,3,4; "
                             "e.g. 1 for a one-object curriculum set)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a scene set already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_scenes(args: argparse.Namespace) -> int:
    """`llava-phi scenes`: 0 ok, 1 failure (I/O), 2 usage (bad arguments, unusable --out)."""
    try:
        counts = [int(c) for c in str(args.objects).split(",") if c.strip()]
    except ValueError:
        print(f"llava-phi scenes: error: --objects must be comma-separated integers, got "
              f"{args.objects!r}", file=sys.stderr)
        return 2
    try:
        info = write_scenes(args.out, args.n, args.seed, eval_questions=args.eval_questions,
                            object_counts=counts, overwrite=args.overwrite,
                            progress=not args.no_progress)
    except SceneError as exc:
        print(f"llava-phi scenes: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llava-phi scenes: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    per_type = ", ".join(f"{t} {c}" for t, c in info.eval_counts.items())
    print(f"wrote {info.n_scenes} scenes (seed {info.seed}) to {info.out_dir} in "
          f"{info.seconds:.1f} s: captions.json {info.n_caption_records} records, instruct.json "
          f"{info.n_instruct_records} records, eval {info.n_eval_questions} questions "
          f"({per_type})")
    return 0
