"""Synthetic scenes: determinism, disjoint seeds, layout, pixels, answers checked on the specs."""

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_phi_ros.training import scenes as S

N_SET = 60  # scenes in the shared written set


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "set"
    S.write_scenes(out, N_SET, seed=7, progress=False)
    return out


@pytest.fixture(scope="module")
def many_scenes() -> list[S.Scene]:
    return S.generate_scenes(400, seed=11)


def _third(scene: S.Scene, obj: S.SceneObject) -> str:
    """Position recomputed from the bbox: which horizontal third holds the centre."""
    cx = (obj.bbox[0] + obj.bbox[2]) / 2
    return S.POSITIONS[min(2, int(cx // (scene.width / 3)))]


def _nearest_palette(rgb) -> str:
    rgb = np.asarray(rgb, dtype=float)
    return min(S.PALETTE, key=lambda c: np.linalg.norm(rgb - np.asarray(S.PALETTE[c])))


def _oracle(scene: S.Scene, text: str) -> str:
    """The answer to a short question, worked out from the spec independently of the generator."""
    objs = scene.objects
    m = re.search(r"colou?r (?:is|of) the (\w+)\?$", text)
    if m:
        hits = [o for o in objs if o.shape == m.group(1)]
        assert len(hits) == 1, text
        return hits[0].colour
    m = re.search(r"shape (?:is|of) the (\w+) object\?$", text)
    if m:
        hits = [o for o in objs if o.colour == m.group(1)]
        assert len(hits) == 1, text
        return hits[0].shape
    if text.startswith("How many"):
        return ["one", "two", "three", "four"][len(objs) - 1]
    m = re.match(r"(?:Where is|Is) the (\w+) (\w+)(?:\?| on the left)", text)
    if m:
        hits = [o for o in objs if (o.colour, o.shape) == m.groups()]
        assert len(hits) == 1, text
        mates = [o for o in objs if _third(scene, o) == _third(scene, hits[0])]
        assert len(mates) == 1, f"position asked about an object sharing its third: {text}"
        return _third(scene, hits[0])
    m = re.match(r"Is there an? (\w+) (\w+)", text)
    if m:
        return "yes" if any((o.colour, o.shape) == m.groups() for o in objs) else "no"
    raise AssertionError(f"unrecognised question {text!r}")


def _check_qa(scene: S.Scene, qa: S.QA) -> None:
    assert qa.question_type in S.QUESTION_TYPES
    if qa.question_type == "describe":
        assert qa.answer == S.caption(scene)
        return
    assert qa.answer in S.ANSWER_VOCABULARY[qa.question_type], qa
    if qa.question_type == "mc":
        lines = qa.question.split("\n")
        assert lines[-1] == S.MC_SUFFIX
        assert lines[1:-1] == [f"{'ABCD'[i]}. {o}" for i, o in enumerate(qa.options)]
        assert 3 <= len(qa.options) <= 4 and len(set(qa.options)) == len(qa.options)
        assert qa.options["ABCD".index(qa.answer)] == _oracle(scene, lines[0])
        return
    assert "\n" not in qa.question
    assert qa.answer == _oracle(scene, qa.question), qa


# ---- determinism and disjointness ----------------------------------------------------------


def test_random_scene_deterministic_for_both_rng_kinds():
    for make in (random.Random, np.random.default_rng):
        a = [S.random_scene(make(3)) for _ in range(2)]
        assert a[0] == a[1]
        assert S.random_scene(make(3)) != S.random_scene(make(4))
        assert np.array_equal(np.asarray(S.render_scene(a[0])), np.asarray(S.render_scene(a[1])))
    r1, r2 = random.Random(5), random.Random(5)
    sc = S.random_scene(random.Random(0), 3)
    assert S.questions(sc, r1) == S.questions(sc, r2)


def test_write_scenes_is_deterministic(tmp_path, scene_set):
    S.write_scenes(tmp_path / "again", N_SET, seed=7, progress=False)
    for rel in ("captions.json", "instruct.json", S.MC_DRILL_FILE, S.MC_FILE, S.SINGLE_FILE,
                S.COLOURS_FILE, "scenes.json",
                "eval/questions.jsonl", "eval/answers.jsonl", "images/s7_000000.png",
                f"images/s7_{N_SET - 1:06d}.png"):
        assert (tmp_path / "again" / rel).read_bytes() == (scene_set / rel).read_bytes(), rel


def test_seeds_give_disjoint_scenes_and_no_duplicates_within_a_seed(many_scenes):
    keys = [S.scene_key(s) for s in many_scenes]
    assert len(set(keys)) == len(keys)
    other = {S.scene_key(s) for s in S.generate_scenes(400, seed=12)}
    assert not other & set(keys)
    # Scene i does not depend on n: a longer set of the same seed extends a shorter one.
    assert S.generate_scenes(20, seed=11) == many_scenes[:20]


def test_scene_dict_round_trip(many_scenes):
    for s in many_scenes[:50]:
        assert S.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# ---- layout ------------------------------------------------------------------------------


def test_layout_rule(many_scenes):
    sizes_seen, counts_seen, shapes_seen, colours_seen = set(), Counter(), set(), set()
    for sc in many_scenes:
        assert sc.width != sc.height
        sizes_seen.add((sc.width, sc.height))
        n = len(sc.objects)
        counts_seen[n] += 1
        assert 1 <= n <= 4
        assert len({(o.colour, o.shape) for o in sc.objects}) == n
        thirds = Counter(_third(sc, o) for o in sc.objects)
        assert max(thirds.values()) == (2 if n == 4 else 1)
        for o in sc.objects:
            shapes_seen.add(o.shape)
            colours_seen.add(o.colour)
            x0, y0, x1, y1 = o.bbox
            assert x1 - x0 == y1 - y0 >= 8
            assert 0 <= x0 and x1 <= sc.width and 0 <= y0 and y1 <= sc.height
            col = S.POSITIONS.index(o.position)
            # Entirely inside its third, so the position is never a judgement call.
            assert col * sc.width / 3 <= x0 and x1 <= (col + 1) * sc.width / 3
            assert o.position == _third(sc, o)
        for a in sc.objects:  # no overlaps
            for b in sc.objects:
                if a is not b:
                    assert (a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0]
                            or a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1])
    assert len(sizes_seen) >= 4
    assert set(counts_seen) == {1, 2, 3, 4} and min(counts_seen.values()) > 60
    assert shapes_seen == set(S.SHAPES) and colours_seen == set(S.COLOURS) and len(S.COLOURS) >= 6
    kinds = Counter(s.background.kind for s in many_scenes)
    assert set(kinds) == set(S.BACKGROUND_KINDS)


def test_small_and_large_are_distinct_sizes(many_scenes):
    for sc in many_scenes:
        side = {o.size: [] for o in sc.objects}
        for o in sc.objects:
            side[o.size].append(o.bbox[2] - o.bbox[0])
        if "small" in side and "large" in side and len(sc.objects) < 4:
            assert max(side["small"]) < min(side["large"])


def test_object_count_choice_and_bad_arguments():
    assert all(len(s.objects) == 1 for s in S.generate_scenes(30, 1, object_counts=(1,)))
    with pytest.raises(S.SceneError, match="n_objects"):
        S.random_scene(random.Random(0), n_objects=5)
    with pytest.raises(S.SceneError, match="object counts"):
        S.generate_scenes(3, 0, object_counts=(0, 2))
    with pytest.raises(TypeError, match="rng"):
        S.random_scene(42)  # type: ignore[arg-type]


# ---- pixels ------------------------------------------------------------------------------


def test_pixels_hold_the_object_colours_and_backgrounds_are_no_object_colour(many_scenes):
    for sc in many_scenes[:150]:
        px = np.asarray(S.render_scene(sc))
        assert px.shape == (sc.height, sc.width, 3)
        inside = np.zeros(px.shape[:2], bool)
        for o in sc.objects:
            cx, cy = int(o.centre[0]), int(o.centre[1])
            assert tuple(px[cy, cx]) == o.rgb
            assert _nearest_palette(px[cy, cx]) == o.colour
            inside[o.bbox[1]:o.bbox[3], o.bbox[0]:o.bbox[2]] = True
        bg = px[~inside].astype(float)[::37]
        for name, rgb in S.PALETTE.items():
            # Far from every object colour, also after an R <-> B swap.
            assert np.linalg.norm(bg - rgb, axis=1).min() > 60, name
            assert np.linalg.norm(bg[:, ::-1] - rgb, axis=1).min() > 60, name


def test_swapping_red_and_blue_channels_swaps_red_and_blue_objects(many_scenes):
    assert S.PALETTE["red"][::-1] == S.PALETTE["blue"]
    assert S.PALETTE["blue"][::-1] == S.PALETTE["red"]
    flipped = 0
    for sc in many_scenes:
        swapped = np.asarray(S.render_scene(sc))[:, :, ::-1]
        for o in sc.objects:
            if o.colour in ("red", "blue"):
                cx, cy = int(o.centre[0]), int(o.centre[1])
                want = "blue" if o.colour == "red" else "red"
                assert _nearest_palette(swapped[cy, cx]) == want
                flipped += 1
    assert flipped > 50


# ---- captions and questions --------------------------------------------------------------


def test_caption_lists_objects_left_to_right():
    sc = S.Scene((S.SceneObject("square", "blue", "large", "right", (110, 10, 140, 40)),
                  S.SceneObject("circle", "red", "small", "left", (5, 5, 25, 25))),
                 S.Background("plain", (200, 200, 200)), 160, 120)
    assert S.caption(sc) == "A red circle on the left and a blue square on the right."
    one = S.Scene((S.SceneObject("diamond", "orange", "small", "middle", (60, 5, 80, 25)),),
                  sc.background, 160, 120)
    assert S.caption(one) == "An orange diamond in the middle."


def test_caption_matches_spec(many_scenes):
    for sc in many_scenes:
        found = re.findall(r"(?:a|an|A|An) (\w+) (\w+) (on the left|in the middle|on the right)",
                           S.caption(sc))
        assert sorted(found) == sorted((o.colour, o.shape, S._PLACE_PHRASE[o.position])
                                       for o in sc.objects)


def test_every_answer_is_right_for_its_scene(many_scenes):
    rng = np.random.default_rng(0)
    types = Counter()
    for sc in many_scenes:
        for qa in S.questions(sc, rng):
            _check_qa(sc, qa)
            types[qa.question_type] += 1
        for qtype in S.QUESTION_TYPES:
            qa = S.make_question(sc, qtype, rng)
            if qa is None:  # only colour/shape can be impossible: no unique shape/colour
                attr = {"colour": "shape", "shape": "colour"}[qtype]
                values = Counter(getattr(o, attr) for o in sc.objects)
                assert min(values.values()) > 1
            else:
                _check_qa(sc, qa)
    assert set(types) == set(S.QUESTION_TYPES)


def test_answers_cover_the_vocabulary(many_scenes):
    rng = random.Random(1)
    seen = {t: set() for t in S.ANSWER_VOCABULARY}
    for sc in many_scenes:
        for qtype in S.ANSWER_VOCABULARY:
            qa = S.make_question(sc, qtype, rng)
            if qa is not None:
                seen[qtype].add(qa.answer)
    for qtype, vocab in S.ANSWER_VOCABULARY.items():
        assert seen[qtype] == set(vocab), qtype


def test_yes_no_negatives_are_absent_and_forced_answers_hold(many_scenes):
    rng = random.Random(2)
    near = 0
    for sc in many_scenes[:200]:
        for want in (True, False):
            qa = S.make_question(sc, "yesno", rng, answer_yes=want)
            assert qa.answer == ("yes" if want else "no")
            _check_qa(sc, qa)
            if not want:
                c, s = re.match(r"Is there an? (\w+) (\w+)", qa.question).groups()
                near += any(o.colour == c or o.shape == s for o in sc.objects)
    assert near > 100  # many negatives share a colour or a shape with a present object


# ---- written files -----------------------------------------------------------------------


def _check_conversation(rec: dict, root: Path) -> list[tuple[str, str]]:
    assert set(rec) >= {"id", "image", "conversations"}
    assert (root / rec["image"]).is_file()
    conv = rec["conversations"]
    assert conv and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert conv[0]["value"].startswith("<image>\n")
    assert sum("<image>" in t["value"] for t in conv) == 1
    return [(conv[i]["value"].removeprefix("<image>\n"), conv[i + 1]["value"])
            for i in range(0, len(conv), 2)]


def test_llava_json_files(scene_set):
    specs = {s["id"]: s for s in json.loads((scene_set / "scenes.json").read_text())["scenes"]}
    assert len(specs) == N_SET
    captions = json.loads((scene_set / "captions.json").read_text())
    assert len(captions) == N_SET
    for rec in captions:
        [(prompt, text)] = _check_conversation(rec, scene_set)
        assert prompt in S.CAPTION_PROMPTS
        assert text == specs[rec["id"]]["caption"] == S.caption(S.Scene.from_dict(specs[rec["id"]]))
    assert len({r["conversations"][0]["value"] for r in captions}) > 1  # prompts vary
    instruct = json.loads((scene_set / "instruct.json").read_text())
    assert len(instruct) == N_SET
    types, yes = Counter(), []
    for rec in instruct:
        turns = _check_conversation(rec, scene_set)
        assert len(rec["question_types"]) == len(turns) >= 4
        scene = S.Scene.from_dict(specs[rec["id"]])
        for (q, a), qtype in zip(turns, rec["question_types"], strict=True):
            _check_qa(scene, S.QA(q, a, qtype, _options(q) if qtype == "mc" else None))
            types[qtype] += 1
            if qtype == "yesno":
                yes.append(a == "yes")
    assert set(types) == set(S.QUESTION_TYPES)
    assert 0.3 < np.mean(yes) < 0.7


def _options(question: str) -> list[str]:
    return [line[3:] for line in question.split("\n") if re.match(r"[A-D]\. ", line)]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_split(scene_set):
    qs = _read_jsonl(scene_set / "eval" / "questions.jsonl")
    ans = _read_jsonl(scene_set / "eval" / "answers.jsonl")
    assert len(qs) == len(ans) == 7 * N_SET
    specs = {s["image"]: S.Scene.from_dict(s)
             for s in json.loads((scene_set / "scenes.json").read_text())["scenes"]}
    for q, a in zip(qs, ans, strict=True):
        assert set(q) == {"question_id", "image", "text", "category"}
        assert set(a) - {"options"} == {"question_id", "answer", "category"}
        assert q["question_id"] == a["question_id"] and q["category"] == a["category"]
        assert "<image>" not in q["text"]
        _check_qa(specs[q["image"]], S.QA(q["text"], a["answer"], q["category"],
                                          a.get("options")))
    assert len({q["question_id"] for q in qs}) == len(qs)
    assert len({(q["image"], q["text"]) for q in qs}) == len(qs)
    counts = Counter(q["category"] for q in qs)
    assert counts == {t: N_SET for t in S.QUESTION_TYPES}
    # Interleaved: every prefix is balanced over types, and yes/no alternates.
    assert Counter(q["category"] for q in qs[:70]) == {t: 10 for t in S.QUESTION_TYPES}
    yn = [a["answer"] for a in ans if a["category"] == "yesno"]
    assert yn.count("yes") == yn.count("no") and yn[:4] == ["yes", "no", "yes", "no"]
    readme = (scene_set / "README.txt").read_text()
    assert "seed 7" in readme and "eval/answers.jsonl" in readme


def test_eval_question_count_option(tmp_path):
    info = S.write_scenes(tmp_path / "x", 10, seed=3, eval_questions=23, progress=False)
    assert info.n_eval_questions == 23
    assert sorted(info.eval_counts.values()) == [3, 3, 3, 3, 3, 4, 4]
    assert len(_read_jsonl(tmp_path / "x" / "eval" / "answers.jsonl")) == 23
    with pytest.raises(S.SceneError, match="cannot make"):
        S.write_scenes(tmp_path / "y", 2, seed=3, eval_questions=70, progress=False)


def test_images_are_the_rendered_scenes(scene_set):
    for s in json.loads((scene_set / "scenes.json").read_text())["scenes"][:10]:
        with Image.open(scene_set / s["image"]) as im:
            assert im.mode == "RGB" and im.size == (s["width"], s["height"])
            assert np.array_equal(np.asarray(im),
                                  np.asarray(S.render_scene(S.Scene.from_dict(s))))


# ---- CLI hooks ---------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    S.add_scenes_arguments(parser)
    return S.run_scenes(parser.parse_args(argv))


def test_cli_hooks(tmp_path, capsys):
    out = tmp_path / "set"
    assert _run(["--out", str(out), "--n", "5", "--seed", "2", "--eval-questions", "14"]) == 0
    assert "wrote 5 scenes" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.png"))) == 5
    assert _run(["--out", str(out), "--n", "3", "--seed", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(["--out", str(out), "--n", "3", "--seed", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"s4_{i:06d}.png" for i in range(3)]  # the old set's images are gone
    assert _run(["--out", str(tmp_path / "z"), "--n", "0", "--seed", "1"]) == 2
    assert "n must be >= 1" in capsys.readouterr().err
    assert _run(["--out", str(tmp_path / "z"), "--n", "2", "--seed", "-1"]) == 2
    assert _run(["--out", str(tmp_path / "z"), "--n", "2", "--seed", "1", "--objects", "x"]) == 2
    assert _run(["--out", str(tmp_path / "z"), "--n", "2", "--seed", "1", "--objects", "5"]) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _run(["--out", str(other), "--n", "2", "--seed", "1", "--overwrite"]) == 2
    assert "no scenes.json" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _run(["--out", str(blocker / "sub"), "--n", "2", "--seed", "1"]) == 1
    assert _run(["--out", str(blocker), "--n", "2", "--seed", "1"]) == 2


def test_mc_drills_state_the_answer_and_have_no_image(scene_set):
    drills = json.loads((scene_set / S.MC_DRILL_FILE).read_text())
    specs = {s["id"]: s for s in json.loads((scene_set / "scenes.json").read_text())["scenes"]}
    assert len(drills) == -(-N_SET // S.MC_DRILL_EVERY)  # one per MC_DRILL_EVERY scenes
    letters = Counter()
    for rec in drills:
        assert "image" not in rec and rec["question_types"] == ["mc_drill"]
        [human, gpt] = rec["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert "<image>" not in human["value"]
        context, question = human["value"].split("\n", 1)
        word = context.removeprefix("Context: the answer is ").removesuffix(".")
        options = _options(question)
        assert options["ABCD".index(gpt["value"])] == word  # the letter of the stated answer
        scene = S.Scene.from_dict(specs[rec["id"].removesuffix("_mc")])
        _check_qa(scene, S.QA(question, gpt["value"], "mc", options))  # a true mc question
        letters[gpt["value"]] += 1
    assert len(letters) >= 3  # the right letter moves around


def test_mc_focus_set_has_one_true_image_question_per_scene(scene_set):
    records = json.loads((scene_set / S.MC_FILE).read_text())
    specs = {s["id"]: s for s in json.loads((scene_set / "scenes.json").read_text())["scenes"]}
    assert [r["id"] for r in records] == [f"{sid}_mc1" for sid in specs]
    letters = Counter()
    for rec in records:
        assert rec["question_types"] == ["mc"] and rec["image"] == specs[rec["id"][:-4]]["image"]
        [human, gpt] = rec["conversations"]
        assert human["value"].startswith("<image>\n")
        question = human["value"].removeprefix("<image>\n")
        scene = S.Scene.from_dict(specs[rec["id"][:-4]])
        _check_qa(scene, S.QA(question, gpt["value"], "mc", _options(question)))
        letters[gpt["value"]] += 1
    assert len(letters) >= 3


def test_single_turn_set_asks_every_available_type_alone_with_the_image(scene_set):
    records = json.loads((scene_set / S.SINGLE_FILE).read_text())
    specs = {s["id"]: s for s in json.loads((scene_set / "scenes.json").read_text())["scenes"]}
    expected = [f"{sid}_{t}" for sid, spec in specs.items()
                for t in S.available_types(S.Scene.from_dict(spec))]
    assert [r["id"] for r in records] == expected
    for rec in records:
        sid, qtype = rec["id"].rsplit("_", 1)
        assert rec["question_types"] == [qtype] and rec["image"] == specs[sid]["image"]
        [human, gpt] = rec["conversations"]  # one turn: no earlier answer to copy from
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        question = human["value"].removeprefix("<image>\n")
        options = _options(question) if qtype == "mc" else None
        _check_qa(S.Scene.from_dict(specs[sid]), S.QA(question, gpt["value"], qtype, options))


def test_colour_conversations_ask_each_uniquely_shaped_object_once(scene_set):
    records = {r["id"]: r for r in json.loads((scene_set / S.COLOURS_FILE).read_text())}
    specs = json.loads((scene_set / "scenes.json").read_text())["scenes"]
    for spec in specs:
        scene = S.Scene.from_dict(spec)
        unique = S._unique(scene, "shape")
        rec = records.pop(f"{spec['id']}_colours", None)
        if len(scene.objects) < 2 or not unique:
            assert rec is None
            continue
        assert rec["image"] == spec["image"]
        turns = rec["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        asked = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
        answers = [t["value"] for t in turns[1::2]]
        for question, answer in zip(asked, answers, strict=True):
            _check_qa(scene, S.QA(question, answer, "colour"))
        assert sorted(answers) == sorted(o.colour for o in unique)  # each object once
    assert not records
