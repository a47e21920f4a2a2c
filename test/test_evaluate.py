"""Evaluation: normalisation, letter extraction, POPE metrics by hand, jsonl input, report, CLI."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from llava_phi_ros.training import evaluate as E
from llava_phi_ros.training import scenes as S


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "set"
    S.write_scenes(out, 8, seed=5, progress=False)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lookup(scene_set: Path) -> dict[tuple[str, str], str]:
    """(image path, question) -> reference answer."""
    qs = _jsonl(scene_set / "eval" / "questions.jsonl")
    ans = {a["question_id"]: a["answer"] for a in _jsonl(scene_set / "eval" / "answers.jsonl")}
    return {(q["image"], q["text"]): ans[q["question_id"]] for q in qs}


# ---- text helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("The answer: Two.", "answer 2"),
    ("Red.", "red"),
    ("  a   Blue\nsquare! ", "blue square"),
    ("four", "4"), ("4", "4"),
    ("1,000", "1000"), ("3.5", "3.5"), ("3.", "3"),
    ("Don't", "dont"),
    ("On the LEFT", "on left"),
    ("A red circle on the left, and an orange square.", "red circle on left and orange square"),
    ("", ""),
])
def test_normalize_answer(text, want):
    assert E.normalize_answer(text) == want


@pytest.mark.parametrize("text, n, want", [
    ("A", 4, "A"), ("A.", 4, "A"), (" b ", 4, "B"), ("(C)", 4, "C"), ("[D]", 4, "D"),
    ("B) blue", 4, "B"), ("C. purple", 4, "C"), ("D: red", 4, "D"),
    ("The answer is B.", 4, "B"), ("Answer: D", 4, "D"), ("the answer is (A)", 4, "A"),
    ("I think (B) is right", 4, "B"),
    ("E", 4, None), ("E.", 5, "E"), ("The answer is D", 3, None),
    ("A red circle", 4, None),  # a sentence starting with the article, not an option
    ("The answer is Blue", 4, None), ("(A) or (B)", 4, None), ("", 4, None), ("red", 4, None),
])
def test_extract_choice_letter(text, n, want):
    assert E.extract_choice_letter(text, n) == want


def test_extract_choice_letter_bad_n():
    with pytest.raises(ValueError, match="n_options"):
        E.extract_choice_letter("A", 0)


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("yes.", "yes"), ("YES, there is.", "yes"), ("No", "no"),
    ("No, there is not.", "no"), ("There is no blue square.", "no"), ("It isn't.", "no"),
    ("red", None), ("", None), ("Sure. No doubt.", None),
])
def test_parse_yes_no(text, want):
    assert E.parse_yes_no(text) == want


def test_token_f1():
    ref = "A red circle on the left and a blue square on the right."
    assert E.token_f1(ref.lower(), ref) == 1.0
    # pred 4 tokens all in ref (9 tokens after normalisation): P 1, R 4/9 -> F1 8/13
    assert E.token_f1("A red circle on the left.", ref) == pytest.approx(8 / 13)
    assert E.token_f1("green", ref) == 0.0
    assert E.token_f1("", "") == 1.0 and E.token_f1("x", "") == 0.0


# ---- scoring on hand-made predictions ----------------------------------------------------


def _hand_made():
    refs, preds = {}, {}
    yn_refs = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    yn_preds = ["Yes", "no", "Yes.", "yes", "No", "banana", "no", "Yes, there is"]
    for i, (r, p) in enumerate(zip(yn_refs, yn_preds, strict=True)):
        refs[f"y{i}"] = {"answer": r, "category": "yesno"}
        preds[f"y{i}"] = p
    mc_q = "What colour is the square?\nA. red\nB. green\nC. blue\nD. yellow\n" + S.MC_SUFFIX
    for i, (r, p) in enumerate([("A", "A"), ("C", "The answer is A"), ("B", "(B)"),
                                ("D", "dunno")]):
        refs[f"m{i}"] = {"answer": r, "category": "mc", "question": mc_q}
        preds[f"m{i}"] = p
    for i, (cat, r, p) in enumerate([("colour", "red", "Red."), ("count", "two", "2"),
                                     ("position", "left", "the left"),
                                     ("shape", "circle", "square")]):
        refs[f"s{i}"] = {"answer": r, "category": cat}
        preds[f"s{i}"] = p
    cap = "A red circle on the left and a blue square on the right."
    refs["d0"] = {"answer": cap, "category": "describe"}
    preds["d0"] = "a red circle on the left and a blue square on the right"
    refs["d1"] = {"answer": cap, "category": "describe"}
    preds["d1"] = "A red circle on the left."
    refs[7] = {"text": "three", "category": "count"}  # no prediction at all; int id
    preds["extra"] = "ignored"
    return preds, refs


def test_score_hand_made():
    preds, refs = _hand_made()
    rep = E.score(preds, refs)
    y = rep.yesno
    # parsed: yes no yes yes no None no yes; truth: Y Y Y N N N N Y
    tp, fp, fn, tn = 3, 1, 1, 2
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert (y.tp, y.fp, y.fn, y.tn, y.unparsed, y.n) == (tp, fp, fn, tn, 1, 8)
    assert y.precision == pytest.approx(p) and y.recall == pytest.approx(r)
    assert y.f1 == pytest.approx(2 * p * r / (p + r))
    assert y.accuracy == pytest.approx(5 / 8) and y.yes_ratio == pytest.approx(4 / 8)
    assert rep.mc_accuracy == pytest.approx(2 / 4) and rep.mc_unparsed == 1
    assert rep.per_type == pytest.approx({"colour": 1.0, "shape": 0.0, "count": 0.5,
                                          "position": 1.0, "yesno": 5 / 8, "mc": 0.5,
                                          "describe": 0.5})
    assert list(rep.per_type) == ["colour", "shape", "count", "position", "yesno", "mc",
                                  "describe"]
    assert rep.counts["count"] == 2 and rep.missing == 1
    assert rep.short_exact_match == pytest.approx(3 / 5)
    assert rep.describe_exact_match == 0.5
    assert rep.describe_token_f1 == pytest.approx((1 + 8 / 13) / 2)
    correct = 5 + 2 + 3 + 1  # yes/no, mc, short, describe
    assert rep.n == 19 and rep.overall == pytest.approx(correct / 19)
    assert rep.macro == pytest.approx(sum(rep.per_type.values()) / 7)
    item = next(i for i in rep.items if i.question_id == "m1")
    assert (item.parsed, item.correct, item.kind) == ("A", False, "mc")
    assert json.loads(json.dumps(rep.to_json_dict()))["yesno"]["tp"] == 3


def test_kind_inferred_for_user_benchmarks():
    q = "Which is a mammal?\nA. frog\nB. dog\nAnswer with the option's letter."
    assert E.answer_kind("", "B", q) == "mc"
    assert E.answer_kind("adversarial", "yes") == "yesno"  # a POPE split name as category
    assert E.answer_kind("", "No") == "yesno"
    assert E.answer_kind("", "B") == "short"  # no options: just a short answer
    assert E.answer_kind("ocr", "Stop") == "short"
    rep = E.score({1: "B", 2: "yes", 3: "stop"},
                  {1: {"answer": "B", "question": q}, 2: {"label": "yes", "category": "random"},
                   3: {"answer": "Stop", "category": "ocr"}})
    assert rep.per_type == {"mc": 1.0, "ocr": 1.0, "random": 1.0}
    assert rep.yesno.n == 1
    with pytest.raises(E.EvalError, match="no 'answer'"):
        E.score({1: "x"}, {1: {"category": "x"}})


# ---- evaluate_model over files -----------------------------------------------------------


def _perfect(scene_set: Path):
    """A fake model that knows every answer: it recognises the image by its pixels."""
    table = _lookup(scene_set)
    by_pixels = {}
    for image, _ in table:
        with Image.open(scene_set / image) as im:
            by_pixels[im.convert("RGB").tobytes()] = image

    def answer(image: Image.Image, question: str) -> str:
        assert image.mode == "RGB"
        return table[(by_pixels[image.tobytes()], question)]

    return answer


def test_evaluate_model_perfect_and_always_yes(scene_set):
    qpath = scene_set / "eval" / "questions.jsonl"
    perfect = _perfect(scene_set)
    rep = E.evaluate_model(perfect, qpath, scene_set, progress=False)
    assert rep.n == 56 and rep.overall == 1.0 and rep.errors == 0
    assert rep.per_type == {t: 1.0 for t in S.QUESTION_TYPES}
    assert rep.yesno.f1 == 1.0 and rep.describe_token_f1 == 1.0

    def always_yes(image: Image.Image, question: str) -> str:
        answer = perfect(image, question)
        return "Yes" if answer in ("yes", "no") else answer

    rep = E.evaluate_model(always_yes, qpath, scene_set, progress=True)
    assert rep.per_type["yesno"] == 0.5  # the split is half yes
    assert rep.yesno.recall == 1.0 and rep.yesno.precision == 0.5 and rep.yesno.yes_ratio == 1.0
    assert rep.yesno.f1 == pytest.approx(2 / 3)
    assert rep.overall == pytest.approx(52 / 56)
    assert rep.meta["questions"] == str(qpath) and rep.meta["seconds"] >= 0


def test_user_files_limit_and_errors(tmp_path, scene_set):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(img / "a.png")
    qs = [{"question_id": "q1", "image": "a.png", "text": "Is there a red square?"},
          {"question_id": "q2", "image": "a.png",
           "text": "What is it?\nA. red square\nB. cat\nAnswer with the option's letter."},
          {"question_id": "q3", "image": "a.png", "text": "What colour?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "gt.jsonl").write_text(
        json.dumps({"question_id": "q1", "label": "yes"}) + "\n"
        + json.dumps({"question_id": "q2", "text": "A"}) + "\n"
        + json.dumps({"question_id": "q3", "answer": "red", "category": "colour"}) + "\n")
    calls = []

    def fn(image, question):
        calls.append(question)
        if question.startswith("What colour"):
            raise ValueError("the prompt needs 9999 positions")
        return {"Is": "Yes", "Wh": "A"}[question[:2]]

    rep = E.evaluate_model(fn, tmp_path / "q.jsonl", img, answers_path=tmp_path / "gt.jsonl",
                           progress=False)
    assert rep.per_type == {"colour": 0.0, "mc": 1.0, "yesno": 1.0}
    assert rep.errors == 1 and "9999" in next(i.error for i in rep.items if i.error)
    rep = E.evaluate_model(fn, tmp_path / "q.jsonl", img, answers_path=tmp_path / "gt.jsonl",
                           limit=1, progress=False)
    assert rep.n == 1
    with pytest.raises(E.EvalError, match="not found"):
        E.evaluate_model(fn, tmp_path / "q.jsonl", tmp_path, answers_path=tmp_path / "gt.jsonl")
    with pytest.raises(E.EvalError, match="cannot read .*answers.jsonl"):
        E.evaluate_model(fn, tmp_path / "q.jsonl", img)  # answers.jsonl beside: none there
    (tmp_path / "answers.jsonl").write_text('{"question_id": "q1", "answer": "yes"}\n')
    with pytest.raises(E.EvalError, match="no answer for 2 .*q2"):
        E.evaluate_model(fn, tmp_path / "q.jsonl", img)
    line = '{"question_id": 1, "image": "a.png", "text": "x"}\n'
    (tmp_path / "bad.jsonl").write_text(line + "{oops\n")
    with pytest.raises(E.EvalError, match=r"bad.jsonl:2: not JSON"):
        E.load_eval_set(tmp_path / "bad.jsonl", img)
    (tmp_path / "dup.jsonl").write_text(2 * line)
    with pytest.raises(E.EvalError, match="more than once"):
        E.load_eval_set(tmp_path / "dup.jsonl", img)
    with pytest.raises(E.EvalError, match="limit"):
        E.load_eval_set(tmp_path / "q.jsonl", img, limit=0)


# ---- report outputs ----------------------------------------------------------------------


def test_report_json_and_chart(tmp_path):
    preds, refs = _hand_made()
    rep = E.score(preds, refs)
    rep.meta["model_id"] = "fake"
    path = E.write_report(rep, tmp_path / "r" / "report.json")
    data = json.loads(path.read_text())
    assert data["overall"] == pytest.approx(rep.overall) and len(data["items"]) == rep.n
    png = E.write_bar_chart(rep, tmp_path / "r" / "chart.png")
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 560 and im.height == 420
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (46, 125, 50) in colours  # bars >= 80% (colour, position)
    assert (230, 140, 20) in colours  # bars in [50%, 80%) (count, yesno, mc, describe)
    assert "overall" in E.format_table(rep) and "token F1" in E.format_table(rep)


# ---- CLI hooks ---------------------------------------------------------------------------


class _FakeModel:
    description = "fake-model"

    def __init__(self, answer_fn, fail=False):
        self.answer_fn, self.fail, self.generations = answer_fn, fail, []

    def ask(self, image, question, generation=None):
        self.generations.append(generation)
        if self.fail:
            raise RuntimeError("device lost")
        return SimpleNamespace(text=self.answer_fn(image, question))


def _parse(argv):
    parser = argparse.ArgumentParser()
    E.add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_cli_hooks(scene_set, tmp_path, capsys):
    model = _FakeModel(_perfect(scene_set))
    args = _parse(["--data", str(scene_set), "--json", "--no-progress"])
    assert E.run_eval(args, lambda a: model) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["overall"] == 1.0 and last["per_type"] == {t: 1.0 for t in S.QUESTION_TYPES}
    assert {"precision", "recall", "f1", "yes_ratio"} <= set(last["yesno"])
    assert last["meta"]["model_id"] == "fake-model"
    assert Path(last["report"]).parent == scene_set / "eval" / "report"
    assert Path(last["chart"]).is_file() and Path(last["report"]).is_file()
    assert all(g.temperature == 0.0 and g.max_new_tokens == 128 for g in model.generations)
    # A second run gets files of its own.
    assert E.run_eval(_parse(["--data", str(scene_set), "--json", "--no-progress", "--limit",
                              "7", "--report-dir", str(tmp_path / "rep")]), lambda a: model) == 0
    last2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last2["n"] == 7 and Path(last2["report"]).parent == tmp_path / "rep"
    assert E.run_eval(_parse(["--data", str(scene_set), "--no-progress", "--limit", "7",
                              "--report-dir", str(tmp_path / "rep")]), lambda a: model) == 0
    assert len(list((tmp_path / "rep").glob("*.png"))) == 2

    def never(_a):
        raise AssertionError("the model must not load for bad input")

    assert E.run_eval(_parse([]), never) == 2
    assert "--data" in capsys.readouterr().err
    assert E.run_eval(_parse(["--data", str(scene_set), "--limit", "0"]), never) == 2
    assert E.run_eval(_parse(["--data", str(tmp_path / "nope")]), never) == 1
    assert "cannot read" in capsys.readouterr().err
    assert E.run_eval(_parse(["--data", str(scene_set), "--no-progress", "--json",
                              "--report-dir", str(tmp_path / "r3")]),
                      lambda a: _FakeModel(None, fail=True)) == 1
    captured = capsys.readouterr()
    assert "every question failed" in captured.err and "device lost" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["errors"] == 56

    class Boom(Exception):
        pass

    def load_fails(_a):
        raise Boom("no such checkpoint")

    with pytest.raises(Boom):  # the caller's loader errors are the caller's to report
        E.run_eval(_parse(["--data", str(scene_set)]), load_fails)
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    E.add_eval_arguments(p, include_model_args=False)  # the caller brings its own
    assert p.parse_args(["--data", "x"]).data == "x"
