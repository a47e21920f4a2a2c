"""Score a model on LLaVA-style question/answer jsonl files: per category, POPE-style yes/no,
ScienceQA-style multiple choice, normalised exact match, caption token F1; JSON report and chart.

Input files (LLaVA's eval style; `llava-phi scenes` writes them under DATA/eval/):
questions.jsonl lines ``{"question_id", "image", "text", "category"?}`` (image relative to the
image folder); answers jsonl lines ``{"question_id", "answer" | "text" | "label", "category"?,
"options"?}``.

How an answer is scored depends on its kind, taken from the category when it is one of the scene
question types, else inferred from the reference:
- ``yesno`` (category yesno, or a yes/no reference): the prediction says yes if its first word is
  "yes", no if its first word is "no" or its first sentence has no/not; otherwise it is unparsed,
  which is wrong and never counts as a "yes" (POPE's own parser would count it as yes).
  Precision, recall and F1 treat "yes" as the positive class; yes-ratio = parsed yes / all.
- ``mc`` (category mc, or a one-letter reference with "A. ..." option lines): the letter is
  extracted ScienceQA style (extract_choice_letter) and compared with the reference letter.
- ``describe``: normalised exact match (what counts) and, reported beside it, token F1.
- ``short`` (anything else): normalised exact match (normalize_answer on both sides).

``overall`` is the mean over questions (each question 1 if correct, else 0; describe counts by
exact match); ``macro`` is the mean of the per-category accuracies. A question whose answer_fn
raised counts as wrong and is listed with its error.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .scenes import QUESTION_TYPES

SHORT_CATEGORIES = ("colour", "shape", "count", "position")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_ARTICLES = {"a", "an", "the"}
_NEGATIONS = {"no", "not", "isnt", "arent", "doesnt", "dont", "cannot", "cant", "none"}
_OPTION_LINE = re.compile(r"^([A-Z])[.)] ", re.MULTILINE)


class EvalError(ValueError):
    """Unusable evaluation input: missing or malformed files, unanswerable questions."""


def normalize_answer(text: str) -> str:
    """VQA-style: lowercase, punctuation and articles dropped, number words as digits,
    single spaces ("The answer: Two." -> "answer 2")."""
    s = text.lower().replace("\n", " ").replace("\t", " ")
    s = re.sub(r"(?<=\d),(?=\d)", "", s)  # 1,000 -> 1000
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # periods, except decimal points
    s = s.replace("'", "").replace("\u2019", "")  # don't -> dont
    s = re.sub(r"[^\w\s.]|_", " ", s)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES)


def extract_choice_letter(text: str, n_options: int) -> str | None:
    """The option letter a free-text answer picks (ScienceQA style: "A", "A.", "B) red",
    "(C)", "The answer is B", "Answer: D"), or None when there is not exactly one."""
    if not 1 <= n_options <= 26:
        raise ValueError(f"n_options must be 1..26, got {n_options}")
    letters = string.ascii_uppercase[:n_options]
    s = text.strip()
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:]?", s)  # the whole answer is one letter
    if m:
        letter = m.group(1).upper()
        return letter if letter in letters else None
    found = set(re.findall(r"\(([A-Z])\)", s))
    if len(found) > 1:  # "(A) or (B)": no single pick
        return None
    m = re.match(r"[(\[]?([A-Z])(?:[)\]]|[.:](?:\s|$))", s)  # "A. red", "B) blue", "(C) x"
    if m:
        return m.group(1) if m.group(1) in letters else None
    m = re.search(r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*[(\[]?([A-Z])\b", s)
    if m:
        return m.group(1) if m.group(1) in letters else None
    if len(found) == 1:
        letter = found.pop()
        return letter if letter in letters else None
    return None


def parse_yes_no(text: str) -> str | None:
    """"yes", "no" or None: the first word decides, else a negation in the first sentence."""
    first = re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0]
    words = normalize_answer(first).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if _NEGATIONS & set(words):
        return "no"
    return "yes" if "yes" in words else None


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over normalised tokens (multiset overlap)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = 0
    counts: dict[str, int] = {}
    for w in ref:
        counts[w] = counts.get(w, 0) + 1
    for w in pred:
        if counts.get(w, 0) > 0:
            counts[w] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Reference:
    """The expected answer to one question."""

    answer: str
    category: str
    question: str = ""
    options: list[str] | None = None
    image: str = ""


@dataclass
class EvalItem:
    """One scored question."""

    question_id: Any
    category: str
    kind: str  # yesno, mc, describe, short
    question: str
    reference: str
    prediction: str
    correct: bool
    parsed: str | None = None  # the yes/no or letter read from the prediction
    token_f1: float | None = None  # describe only
    error: str | None = None
    image: str = ""


@dataclass
class YesNoMetrics:
    """POPE's numbers; "yes" is the positive class."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    tp: int
    fp: int
    tn: int
    fn: int
    unparsed: int


@dataclass
class EvalReport:
    """Scores of one run."""

    n: int
    overall: float  # mean over questions (describe counted by exact match)
    macro: float  # mean over categories
    per_type: dict[str, float]
    counts: dict[str, int]
    yesno: YesNoMetrics | None = None
    mc_accuracy: float | None = None
    mc_unparsed: int = 0
    short_exact_match: float | None = None  # over short-answer questions
    describe_exact_match: float | None = None
    describe_token_f1: float | None = None
    errors: int = 0
    missing: int = 0  # references without a prediction (scored wrong)
    items: list[EvalItem] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the items (the `--json` line, plus what the caller adds)."""
        return {k: v for k, v in asdict(self).items() if k != "items"}

    def to_json_dict(self) -> dict[str, Any]:
        """The summary and every item."""
        return self.summary() | {"items": [asdict(i) for i in self.items]}


def answer_kind(category: str, reference: str, question: str = "",
                options: Sequence[str] | None = None) -> str:
    """How a question is scored: yesno, mc, describe or short (see the module docstring)."""
    if category in ("yesno", "mc", "describe"):
        return category
    if category in SHORT_CATEGORIES:
        return "short"
    ref = reference.strip()
    if re.fullmatch(r"[A-Z]", ref) and (options or _OPTION_LINE.search(question)):
        return "mc"
    if normalize_answer(ref) in ("yes", "no"):
        return "yesno"
    return "short"


def _n_options(question: str, options: Sequence[str] | None) -> int:
    if options:
        return len(options)
    n = len(_OPTION_LINE.findall(question))
    return n if n else 5  # ScienceQA has at most 5 options


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _as_reference(ref: Reference | Mapping[str, Any]) -> Reference:
    if isinstance(ref, Reference):
        return ref
    answer = next((ref[k] for k in ("answer", "text", "label") if k in ref), None)
    if answer is None:
        raise EvalError(f"reference {dict(ref)!r} has no 'answer', 'text' or 'label'")
    return Reference(answer=str(answer), category=str(ref.get("category") or ""),
                     question=str(ref.get("question", "")), options=ref.get("options"),
                     image=str(ref.get("image", "")))


def score(predictions: Mapping[Any, str], references: Mapping[Any, Reference | Mapping[str, Any]],
          errors: Mapping[Any, str] | None = None) -> EvalReport:
    """Score predictions against references (both keyed by question_id; keys compared as
    strings). A reference without a prediction is wrong; predictions without a reference are
    ignored."""
    preds = {str(k): v for k, v in predictions.items()}
    errs = {str(k): v for k, v in (errors or {}).items()}
    items: list[EvalItem] = []
    missing = 0
    for qid, raw in references.items():
        ref = _as_reference(raw)
        kind = answer_kind(ref.category, ref.answer, ref.question, ref.options)
        category = ref.category or kind
        if str(qid) not in preds:
            missing += 1
        pred = str(preds.get(str(qid), ""))
        item = EvalItem(qid, category, kind, ref.question, ref.answer, pred, False,
                        error=errs.get(str(qid)), image=ref.image)
        if kind == "yesno":
            item.parsed = parse_yes_no(pred)
            item.correct = item.parsed == normalize_answer(ref.answer)
        elif kind == "mc":
            item.parsed = extract_choice_letter(pred, _n_options(ref.question, ref.options))
            item.correct = item.parsed == ref.answer.strip().upper()
        else:
            item.correct = normalize_answer(pred) == normalize_answer(ref.answer)
            if kind == "describe":
                item.token_f1 = token_f1(pred, ref.answer)
        items.append(item)
    return _report(items, missing)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _category_order(categories: Iterable[str]) -> list[str]:
    cats = set(categories)
    return [c for c in QUESTION_TYPES if c in cats] + sorted(cats - set(QUESTION_TYPES))


def _report(items: list[EvalItem], missing: int) -> EvalReport:
    cats = _category_order(i.category for i in items)
    per_type = {c: _mean(float(i.correct) for i in items if i.category == c) or 0.0
                for c in cats}
    counts = {c: sum(i.category == c for i in items) for c in cats}
    report = EvalReport(n=len(items), overall=_mean(float(i.correct) for i in items) or 0.0,
                        macro=_mean(per_type.values()) or 0.0, per_type=per_type, counts=counts,
                        errors=sum(i.error is not None for i in items), missing=missing,
                        items=items)
    yn = [i for i in items if i.kind == "yesno"]
    if yn:
        truth = [normalize_answer(i.reference) == "yes" for i in yn]
        said = [i.parsed == "yes" for i in yn]
        tp = sum(t and s for t, s in zip(truth, said, strict=True))
        fp = sum(s and not t for t, s in zip(truth, said, strict=True))
        tn = sum(i.parsed == "no" and not t for i, t in zip(yn, truth, strict=True))
        fn = sum(t and not s for t, s in zip(truth, said, strict=True))
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        report.yesno = YesNoMetrics(
            n=len(yn), accuracy=_ratio(sum(i.correct for i in yn), len(yn)), precision=precision,
            recall=recall, f1=_ratio(2 * precision * recall, precision + recall),
            yes_ratio=_ratio(sum(said), len(yn)), tp=tp, fp=fp, tn=tn, fn=fn,
            unparsed=sum(i.parsed is None for i in yn))
    mc = [i for i in items if i.kind == "mc"]
    if mc:
        report.mc_accuracy = _mean(float(i.correct) for i in mc)
        report.mc_unparsed = sum(i.parsed is None for i in mc)
    report.short_exact_match = _mean(float(i.correct) for i in items if i.kind == "short")
    desc = [i for i in items if i.kind == "describe"]
    if desc:
        report.describe_exact_match = _mean(float(i.correct) for i in desc)
        report.describe_token_f1 = _mean(i.token_f1 or 0.0 for i in desc)
    return report


# ---- reading eval sets ---------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"cannot read {path}: {exc}") from exc
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}:{n}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or "question_id" not in row:
            raise EvalError(f"{path}:{n}: expected an object with a 'question_id'")
        rows.append(row)
    return rows


@dataclass
class EvalSet:
    """Questions joined with their references; images checked to exist."""

    questions: list[dict[str, Any]]
    references: dict[str, Reference]
    image_root: Path
    questions_path: Path
    answers_path: Path


def load_eval_set(questions_path: str | Path, image_root: str | Path,
                  answers_path: str | Path | None = None, limit: int | None = None) -> EvalSet:
    """Read questions.jsonl and its answers (default: answers.jsonl beside it), keep the first
    `limit` questions, and check every question has an answer and an image file."""
    qpath = Path(questions_path)
    apath = Path(answers_path) if answers_path is not None else qpath.with_name("answers.jsonl")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    questions = _read_jsonl(qpath)
    for n, q in enumerate(questions, 1):
        if "image" not in q or not isinstance(q.get("text", q.get("question")), str):
            raise EvalError(f"{qpath}: question {n} needs 'image' and 'text'")
    ids = [str(q["question_id"]) for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"{qpath}: question_id {dup} occurs more than once")
    questions = questions[:limit]
    answers = {str(a["question_id"]): a for a in _read_jsonl(apath)}
    absent = [str(q["question_id"]) for q in questions if str(q["question_id"]) not in answers]
    if absent:
        raise EvalError(f"{apath} has no answer for {len(absent)} question(s), e.g. "
                        f"question_id {absent[0]}")
    root = Path(image_root)
    missing_images = sorted({q["image"] for q in questions if not (root / q["image"]).is_file()})
    if missing_images:
        raise EvalError(f"{len(missing_images)} image(s) not found under {root}, e.g. "
                        f"{missing_images[0]}")
    refs = {}
    for q in questions:
        a = answers[str(q["question_id"])]
        ref = _as_reference(a)
        ref.category = str(q.get("category") or a.get("category") or "")
        ref.question = str(q.get("text", q.get("question")))
        ref.image = str(q["image"])
        refs[str(q["question_id"])] = ref
    return EvalSet(questions, refs, root, qpath, apath)


def run_eval_set(answer_fn: Callable[[Image.Image, str], str], eval_set: EvalSet,
                 progress: bool = True) -> EvalReport:
    """Ask answer_fn every question of the set (image by image, in file order) and score."""
    from tqdm import tqdm

    from ..model.preprocess import load_image

    predictions: dict[str, str] = {}
    errors: dict[str, str] = {}
    start = time.perf_counter()
    cached: tuple[str, Image.Image] | None = None
    bar = tqdm(eval_set.questions, desc="eval", unit="q", disable=not progress, file=sys.stderr)
    right = 0
    for n, q in enumerate(bar, 1):
        qid = str(q["question_id"])
        if cached is None or cached[0] != q["image"]:
            cached = (q["image"], load_image(eval_set.image_root / q["image"]))
        try:
            predictions[qid] = str(answer_fn(cached[1], eval_set.references[qid].question))
        except (ValueError, RuntimeError) as exc:
            errors[qid] = f"{type(exc).__name__}: {exc}"
            predictions[qid] = ""
        if progress:
            one = score({qid: predictions[qid]}, {qid: eval_set.references[qid]})
            right += one.items[0].correct
            bar.set_postfix(acc=f"{right / n:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    report = score(predictions, eval_set.references, errors)
    report.meta |= {"questions": str(eval_set.questions_path),
                    "answers": str(eval_set.answers_path), "image_root": str(eval_set.image_root),
                    "seconds": round(seconds, 3),
                    "questions_per_s": round(_ratio(len(predictions), seconds), 3)}
    return report


def evaluate_model(answer_fn: Callable[[Image.Image, str], str], questions_path: str | Path,
                   image_root: str | Path, limit: int | None = None, progress: bool = True,
                   answers_path: str | Path | None = None) -> EvalReport:
    """Answer every question of a LLaVA-style questions.jsonl with answer_fn(image, question)
    and score against the answers file (default: answers.jsonl beside the questions)."""
    return run_eval_set(answer_fn, load_eval_set(questions_path, image_root, answers_path, limit),
                        progress)


# ---- report outputs -------------------------------------------------------------------------


def write_report(report: EvalReport, path_json: str | Path) -> Path:
    """Write the summary and every item as indented JSON."""
    path = Path(path_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json_dict(), indent=1) + "\n")
    return path


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError, AttributeError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def write_bar_chart(report: EvalReport, path_png: str | Path, title: str | None = None) -> Path:
    """One labelled bar per category (accuracy, 0-100%), overall in the title; Pillow only."""
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = list(report.per_type)
    bar_w, gap, left, right, top, bottom = 70, 30, 60, 30, 70, 70
    width = max(560, left + right + len(cats) * (bar_w + gap) + gap)
    height = 420
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_small = _font(18), _font(14), _font(12)
    heading = title or f"overall {report.overall:.1%} over {report.n} questions"
    draw.text(((width - _text_width(draw, heading, f_title)) / 2, 14), heading, fill=(0, 0, 0),
              font=f_title)
    model = str(report.meta.get("model_id", ""))
    if model:
        draw.text(((width - _text_width(draw, model, f_small)) / 2, 40), model,
                  fill=(90, 90, 90), font=f_small)
    y0, y1 = top, height - bottom  # y of 100% and of 0%
    for pct in range(0, 101, 25):
        y = y1 - (y1 - y0) * pct / 100
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225) if pct else (0, 0, 0))
        draw.text((left - 8 - _text_width(draw, f"{pct}%", f_small), y - 7), f"{pct}%",
                  fill=(80, 80, 80), font=f_small)
    for k, cat in enumerate(cats):
        acc = report.per_type[cat]
        x = left + gap + k * (bar_w + gap)
        y = y1 - (y1 - y0) * acc
        colour = (46, 125, 50) if acc >= 0.8 else (230, 140, 20) if acc >= 0.5 else (200, 40, 40)
        if acc > 0:
            draw.rectangle([x, y, x + bar_w, y1], fill=colour)
        label = f"{acc:.1%}"
        draw.text((x + (bar_w - _text_width(draw, label, f_label)) / 2, y - 20), label,
                  fill=(0, 0, 0), font=f_label)
        draw.text((x + (bar_w - _text_width(draw, cat, f_label)) / 2, y1 + 8), cat,
                  fill=(0, 0, 0), font=f_label)
        count = f"n={report.counts.get(cat, 0)}"
        draw.text((x + (bar_w - _text_width(draw, count, f_small)) / 2, y1 + 28), count,
                  fill=(90, 90, 90), font=f_small)
    img.save(path)
    return path


def format_table(report: EvalReport) -> str:
    """A human-readable summary, one category per line."""
    lines = [f"{'category':<12}{'n':>7}{'accuracy':>11}"]
    lines += [f"{c:<12}{report.counts[c]:>7}{report.per_type[c]:>11.3f}" for c in report.per_type]
    lines.append(f"{'overall':<12}{report.n:>7}{report.overall:>11.3f}   (mean over questions; "
                 f"macro {report.macro:.3f})")
    if report.yesno:
        y = report.yesno
        lines.append(f"yes/no: accuracy {y.accuracy:.3f} precision {y.precision:.3f} recall "
                     f"{y.recall:.3f} F1 {y.f1:.3f} yes-ratio {y.yes_ratio:.3f}"
                     + (f" unparsed {y.unparsed}" if y.unparsed else ""))
    if report.mc_accuracy is not None:
        lines.append(f"multiple choice: accuracy {report.mc_accuracy:.3f}"
                     + (f" (no letter in {report.mc_unparsed})" if report.mc_unparsed else ""))
    if report.short_exact_match is not None:
        lines.append(f"short answers: normalised exact match {report.short_exact_match:.3f}")
    if report.describe_exact_match is not None:
        lines.append(f"describe: exact match {report.describe_exact_match:.3f} (counted), "
                     f"token F1 {report.describe_token_f1:.3f}")
    if report.errors:
        lines.append(f"errors: {report.errors} question(s) raised (scored wrong)")
    return "\n".join(lines)


# ---- CLI hooks ------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser, include_model_args: bool = True) -> None:
    """Arguments of `llava-phi eval`; include_model_args adds --model/--backend/--device/--dtype/
    --system-prompt (leave it False when the caller adds its own)."""
    if include_model_args:
        parser.add_argument("--model", default=None,
                            help="checkpoint directory, or builtin:tiny (the default)")
        parser.add_argument("--backend", default="torch",
                            choices=("torch", "onnxruntime", "tensorrt"),
                            help="inference backend (default: torch)")
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
        parser.add_argument("--dtype", default="auto",
                            choices=["auto", "float32", "float16", "bfloat16"],
                            help="weights dtype (auto: float32 on CPU, float16 on GPU)")
        parser.add_argument("--system-prompt", default=None,
                            help="replace the default system prompt")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a scene set written by `llava-phi scenes` (uses DIR/eval/"
                             "questions.jsonl, DIR/eval/answers.jsonl, images under DIR)")
    parser.add_argument("--questions", default=None, metavar="FILE",
                        help="LLaVA-style questions jsonl (default: DATA/eval/questions.jsonl)")
    parser.add_argument("--answers", default=None, metavar="FILE",
                        help="reference answers jsonl (default: answers.jsonl beside the "
                             "questions)")
    parser.add_argument("--image-folder", default=None, metavar="DIR",
                        help="root of the questions' image paths (default: DATA, else the "
                             "questions file's folder)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="per answer, greedy decoding (default: 128)")
    parser.add_argument("--report-dir", default=None, metavar="DIR",
                        help="where the report JSON and PNG chart go (default: DATA/eval/report, "
                             "else report/ beside the questions)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object as the last stdout line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_paths(args: argparse.Namespace) -> tuple[Path, Path | None, Path, Path]:
    """(questions, answers, image root, report dir) from the arguments; EvalError = usage."""
    if args.data is None and args.questions is None:
        raise EvalError("give --data DIR (a scene set) or --questions FILE")
    data = Path(args.data) if args.data is not None else None
    questions = Path(args.questions) if args.questions else data / "eval" / "questions.jsonl"
    answers = Path(args.answers) if args.answers else None
    root = Path(args.image_folder) if args.image_folder else (data or questions.parent)
    if args.report_dir:
        report_dir = Path(args.report_dir)
    elif data is not None:
        report_dir = data / "eval" / "report"
    else:
        report_dir = questions.parent / "report"
    return questions, answers, root, report_dir


def _unique_stem(report_dir: Path) -> str:
    stem = "eval-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name, k = stem, 1
    while (report_dir / f"{name}.json").exists() or (report_dir / f"{name}.png").exists():
        k += 1
        name = f"{stem}-{k}"
    return name


def run_eval(args: argparse.Namespace, load_model: Callable[[argparse.Namespace], Any]) -> int:
    """`llava-phi eval`: 0 ok, 1 failure (unreadable data, every question failed), 2 usage.
    load_model(args) returns an object with ask(image, question, generation=...) -> .text;
    its own exceptions propagate to the caller."""

    def fail(message: str, code: int) -> int:
        print(f"llava-phi eval: error: {message}", file=sys.stderr)
        return code

    if args.limit is not None and args.limit < 1:
        return fail(f"--limit must be >= 1, got {args.limit}", 2)
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}", 2)
    try:
        questions, answers, root, report_dir = _run_paths(args)
    except EvalError as exc:
        return fail(str(exc), 2)
    try:
        eval_set = load_eval_set(questions, root, answers, args.limit)
    except EvalError as exc:
        return fail(str(exc), 1)
    if not eval_set.questions:
        return fail(f"{questions} holds no questions", 1)
    from ..model.generation import GenerationConfig

    model = load_model(args)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)

    def answer_fn(image: Image.Image, question: str) -> str:
        return model.ask(image, question, generation=generation).text

    report = run_eval_set(answer_fn, eval_set, progress=not args.no_progress)
    report.meta["model_id"] = str(getattr(model, "description", "") or args.model or "")
    try:
        stem = _unique_stem(report_dir)
        report_path = write_report(report, report_dir / f"{stem}.json")
        chart_path = write_bar_chart(report, report_dir / f"{stem}.png")
    except OSError as exc:
        return fail(f"cannot write the report into {report_dir}: {exc}", 1)
    print(format_table(report))
    print(f"report: {report_path}\nchart: {chart_path}")
    if report.errors:
        first = next(i for i in report.items if i.error)
        print(f"llava-phi eval: warning: {report.errors} question(s) failed, e.g. question_id "
              f"{first.question_id}: {first.error}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.summary() | {"report": str(report_path),
                                              "chart": str(chart_path)}))
    if report.errors == report.n:
        return fail("every question failed", 1)
    return 0
