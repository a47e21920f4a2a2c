"""Training pipeline: tokenizer, data and label masking, presets, stages 0/1/2, resume, CLI.

Everything runs on the `micro` preset and a handful of scenes drawn here with Pillow, in the
format `llava-phi scenes` writes (scenes.json, captions.json, instruct.json, images/).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from llava_phi_ros.model.checkpoint import load_model, save_canonical
from llava_phi_ros.model.preprocess import ImagePreprocessConfig, load_image, preprocess_image
from llava_phi_ros.model.prompt import (
    IMAGE_TOKEN_INDEX,
    STOP_STRING,
    build_prompt,
    render_conversation,
    tokenize_prompt,
)
from llava_phi_ros.model.tokenizer import load_tokenizer
from llava_phi_ros.pipeline import VisionLanguageModel
from llava_phi_ros.training import trainer
from llava_phi_ros.training.data import (
    IGNORE_INDEX,
    ConversationDataset,
    DataError,
    ImageStore,
    ObjectSpec,
    PatchLabelDataset,
    SceneSpec,
    captions_by_image,
    conversation_texts,
    patch_targets,
    read_llava_json,
    read_scenes_json,
    tokenize_conversation,
)
from llava_phi_ros.training.presets import (
    PRESETS,
    build_model,
    config_for,
    model_vocab_size,
    parameter_counts,
)
from llava_phi_ros.training.tokenizer_train import TokenizerTrainingError, train_tokenizer
from llava_phi_ros.training.trainer import TrainConfig, TrainUsageError, train

REPO = Path(__file__).resolve().parents[1]
RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 30, 220)}
# (width, height), objects as (colour, shape, bbox): non-square images, 1-2 objects.
SCENES = [
    ((84, 56), [("red", "circle", (4, 10, 30, 36))]),
    ((56, 84), [("blue", "square", (10, 40, 40, 70))]),
    ((84, 56), [("green", "square", (50, 8, 80, 38))]),
    ((70, 56), [("red", "square", (2, 2, 30, 30)), ("blue", "circle", (40, 20, 68, 48))]),
    ((84, 60), [("blue", "circle", (6, 6, 36, 36)), ("green", "circle", (48, 20, 78, 50))]),
    ((56, 70), [("green", "circle", (10, 10, 46, 46))]),
    ((90, 56), [("red", "square", (60, 10, 86, 36)), ("green", "square", (4, 4, 30, 30))]),
    ((84, 56), [("blue", "square", (30, 14, 56, 40))]),
]
NUMBERS = ("zero", "one", "two")


def _caption(objects) -> str:
    return " and ".join(f"a {c} {s}" for c, s, _ in objects).capitalize() + "."


def _conv(turns):
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return conv


def write_scene_set(out: Path) -> Path:
    """Images, scenes.json, captions.json and instruct.json, as `llava-phi scenes` lays them."""
    (out / "images").mkdir(parents=True)
    specs, captions, instruct = [], [], []
    for i, ((w, h), objects) in enumerate(SCENES):
        image = Image.new("RGB", (w, h), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        for colour, shape, (x0, y0, x1, y1) in objects:
            box = (x0, y0, x1 - 1, y1 - 1)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=RGB[colour])
        name = f"images/scene_{i}.png"
        image.save(out / name)
        specs.append({"id": f"s{i}", "image": name, "width": w, "height": h,
                      "objects": [{"shape": s, "colour": c, "bbox": list(b)}
                                  for c, s, b in objects]})
        captions.append({"id": f"c{i}", "image": name, "conversations": _conv(
            [("Describe the image briefly.", _caption(objects))])})
        colour, shape, _ = objects[0]
        present = {(c, s) for c, s, _ in objects}
        turns = [(f"What colour is the {shape}?" if len(objects) == 1 else
                  f"What colour is the first {shape}?", colour),
                 ("How many objects are there?", NUMBERS[len(objects)]),
                 ("Is there a red circle?", "yes" if ("red", "circle") in present else "no")]
        instruct.append({"id": f"i{i}", "image": name, "conversations": _conv(turns)})
    for fname, obj in (("scenes.json", {"format_version": 1, "scenes": specs}),
                       ("captions.json", captions), ("instruct.json", instruct)):
        (out / fname).write_text(json.dumps(obj, indent=1))
    return out


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return write_scene_set(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def tokenizer(scene_dir):
    records = read_llava_json(scene_dir / "captions.json") + \
        read_llava_json(scene_dir / "instruct.json")
    return train_tokenizer(conversation_texts(records))


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory, tokenizer) -> Path:
    """A random micro checkpoint (the `--init DIR` starting point of stage tests)."""
    out = tmp_path_factory.mktemp("micro") / "model"
    model = build_model("micro", tokenizer.vocab_size, seed=0)
    pre = ImagePreprocessConfig.for_image_size(model.config.vision.image_size)
    return save_canonical(model, out, tokenizer, pre)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def _small(**kw) -> TrainConfig:
    base = dict(batch_size=4, log_every=1, lr=3e-3, threads=None)
    return TrainConfig(**(base | kw))


# ----- tokenizer -----------------------------------------------------------------------------
def test_tokenizer_is_deterministic_across_processes_and_round_trips(tmp_path, scene_dir):
    records = read_llava_json(scene_dir / "instruct.json")
    texts = conversation_texts(records)
    a, b = train_tokenizer(texts), train_tokenizer(texts)
    assert a.backend.to_str() == b.backend.to_str()
    script = ("import json, sys, hashlib\n"
              "from llava_phi_ros.training.tokenizer_train import train_tokenizer\n"
              "t = train_tokenizer(json.load(sys.stdin))\n"
              "print(hashlib.sha256(t.backend.to_str().encode()).hexdigest())\n")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), text=True,
                          capture_output=True, cwd=REPO, timeout=60, check=True)
    assert proc.stdout.strip() == hashlib.sha256(a.backend.to_str().encode()).hexdigest()

    a.save(tmp_path)
    loaded = load_tokenizer(tmp_path)  # the code path of real checkpoints
    assert loaded.eos_token_id == a.eos_token_id == loaded.backend.token_to_id(STOP_STRING)
    prompt = build_prompt("What colour is the circle?")
    assert loaded.encode(prompt) == a.encode(prompt)
    for text in ("héllo wörld 😀 \t\n  x", "A red circle.<|endoftext|>USER:", ""):
        assert loaded.decode(loaded.encode(text), skip_special_tokens=False) == text
    done = render_conversation([("What colour is the circle?", "red")])
    assert loaded.encode(done)[-1] == loaded.eos_token_id  # the stop token is one special token
    # The template was in the training text: the system prompt is about a token per word.
    assert len(loaded.encode(prompt.split(" USER:")[0])) <= 32


def test_tokenizer_rejects_bad_settings():
    with pytest.raises(TokenizerTrainingError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TokenizerTrainingError, match="not a str"):
        train_tokenizer(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TokenizerTrainingError, match="no text"):
        train_tokenizer(["   "])


# ----- presets -------------------------------------------------------------------------------
def test_presets_sizes_and_on_disk_size(tmp_path, tokenizer):
    tiny = config_for("tiny", 600)
    assert tiny.num_image_tokens == 64 and tiny.vision.image_size == 112
    assert tiny.text.rotary_dim == 12 and tiny.vision_select_layer == -2
    assert tiny.projector_type == "mlp2x_gelu"
    assert tiny.text.vocab_size == model_vocab_size(600) == 640
    assert model_vocab_size(640) == 704  # always one spare row at least
    model = build_model("tiny", 600)
    counts = parameter_counts(model)
    assert 1.7e6 < counts["total_without_embeddings"] < 1.8e6
    assert torch.all(model.lm_head.bias[600:] < -1e3) and not model.lm_head.bias[:600].any()
    out = save_canonical(model, tmp_path / "tiny", tokenizer)
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 20e6, size
    again = build_model("tiny", 600)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="unknown preset"):
        config_for("huge", 600)
    assert set(PRESETS) >= {"tiny", "micro"}


# ----- data ----------------------------------------------------------------------------------
def test_labels_are_exactly_each_answer_and_its_stop_token(tokenizer):
    turns = [("What colour is the circle?", "red"), ("How many objects are there?", "two"),
             ("Describe the image briefly.", "A red circle and a blue square.")]
    tok = tokenize_conversation(turns, tokenizer, with_image=True)
    assert tok.ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tok.labels[tok.ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    inside = set()
    for (q, a), (start, end), k in zip(turns, tok.answer_spans, range(3), strict=True):
        assert tokenizer.decode(tok.ids[start:end], skip_special_tokens=False) == \
            f" {a}{STOP_STRING}"
        assert tok.labels[start:end] == tok.ids[start:end]
        inside |= set(range(start, end))
        # What inference feeds the model for this turn is exactly the ids before the answer.
        prompt = build_prompt(q, turns[:k])
        assert tok.ids[:start] == tokenize_prompt(prompt, tokenizer, num_images=1)
        assert tok.prompt_ends[k] == start
    assert all(label == IGNORE_INDEX for i, label in enumerate(tok.labels) if i not in inside)
    assert tok.ids == tokenize_prompt(render_conversation(turns), tokenizer)


def test_collate_expands_the_image_and_ignores_it_and_the_padding(scene_dir, tokenizer):
    records = read_llava_json(scene_dir / "instruct.json")
    store = ImageStore(ImagePreprocessConfig.for_image_size(56))
    ds = ConversationDataset(records, tokenizer, "image", store, num_image_tokens=16)
    i_long = max(range(len(ds)), key=lambda i: len(ds.samples[i].ids))
    i_short = min(range(len(ds)), key=lambda i: len(ds.samples[i].ids))
    batch = ds.batch([i_long, i_short])
    b, t = batch.input_ids.shape
    assert batch.pixels is not None and batch.pixels.shape == (2, 3, 56, 56)
    assert batch.image_mask.sum(1).tolist() == [16, 16]
    assert (batch.labels[batch.image_mask] == IGNORE_INDEX).all()
    short_len = int(batch.lengths[1])
    assert short_len < t and (batch.labels[1, short_len:] == IGNORE_INDEX).all()
    # Each row's masked-in tokens decode to its answers, in order, and nothing else.
    for row, i in enumerate((i_long, i_short)):
        kept = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        answers = "".join(f" {a}{STOP_STRING}" for _, a in records[i].turns)
        assert tokenizer.decode(kept, skip_special_tokens=False) == answers
    assert batch.num_label_tokens == sum(
        sum(x != IGNORE_INDEX for x in ds.samples[i].labels) for i in (i_long, i_short))


def test_image_store_equals_inference_preprocessing(scene_dir):
    pre = ImagePreprocessConfig.for_image_size(56)
    store = ImageStore(pre)
    for path in sorted((scene_dir / "images").iterdir())[:3]:
        expected = preprocess_image(load_image(path), pre)
        assert np.array_equal(store.pixels(path), expected)
        assert np.array_equal(store.pixels(path), expected)  # from the cache


def test_training_forward_equals_the_inference_path(scene_dir, tokenizer):
    records = read_llava_json(scene_dir / "instruct.json")
    model = build_model("micro", tokenizer.vocab_size, seed=1).eval()
    ds = ConversationDataset(records, tokenizer, "image",
                             ImageStore(ImagePreprocessConfig.for_image_size(56)), 16)
    batch = ds.batch([0, 3, 5])
    with torch.no_grad():
        logits = trainer.batch_logits(model, batch)  # (B, T, V), right padded
        for row, i in enumerate((0, 3, 5)):
            sample = ds.samples[i]
            feats = model.encode_images(batch.pixels[row:row + 1])  # (1, N, D)
            ref = model.forward_embeds(model.embed(sample.ids, feats), None, 0, last_only=False)
            n = int(batch.lengths[row])
            assert ref.shape[1] == n
            torch.testing.assert_close(logits[row, :n], ref[0], rtol=1e-5, atol=1e-5)


def test_caption_mode_puts_the_caption_where_the_image_goes(scene_dir, tokenizer):
    records = read_llava_json(scene_dir / "instruct.json")
    captions = captions_by_image(read_llava_json(scene_dir / "captions.json"))
    ds = ConversationDataset(records, tokenizer, "caption", captions=captions)
    sample = ds.samples[0]
    assert IMAGE_TOKEN_INDEX not in sample.ids and sample.image is None
    text = tokenizer.decode(sample.ids, skip_special_tokens=False)
    assert "USER: A red circle.\nWhat colour is the circle? ASSISTANT: red<|endoftext|>" in text
    missing = ConversationDataset(records, tokenizer, "caption", captions={
        k: v for k, v in list(captions.items())[:3]})
    assert len(missing) == 3 and missing.stats.skipped_no_caption == len(records) - 3


def test_bad_llava_json_gets_clear_errors(tmp_path, scene_dir):
    def write(obj) -> Path:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(obj))
        return path

    with pytest.raises(DataError, match="not found"):
        read_llava_json(tmp_path / "nope.json")
    with pytest.raises(DataError, match="JSON list"):
        read_llava_json(write({"a": 1}))
    with pytest.raises(DataError, match="alternate"):
        read_llava_json(write([{"id": "x", "conversations": [
            {"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}]))
    with pytest.raises(DataError, match="image 'missing.png' not found"):
        read_llava_json(write([{"id": "x", "image": "missing.png", "conversations": _conv(
            [("q", "a")])}]))
    with pytest.raises(DataError, match="has '<image>' but no 'image'"):
        read_llava_json(write([{"id": "x", "conversations": _conv([("q", "a")])}]))


def test_patch_targets_follow_pad_resize_and_crop():
    # 112x56 image -> padded to 112x112 (28 rows above) -> resized to 56: scale 1/2, patch 14.
    pre = ImagePreprocessConfig.for_image_size(56)
    scene = SceneSpec(Path("x.png"), (ObjectSpec("square", "red", (0, 0, 28, 28)),
                                      ObjectSpec("circle", "blue", (56, 0, 112, 56))))
    t = patch_targets(scene, (112, 56), pre, 14, {"background": 0, "red": 1, "blue": 2},
                      {"background": 0, "square": 1, "circle": 2})
    colours, shapes = t.colours, t.shapes
    assert colours.shape == (16, 3) and torch.allclose(colours.sum(1), torch.ones(16))
    # The square is exactly patch (row 1, col 0); the circle spans rows 1-2, cols 2-3.
    assert colours[4].tolist() == [0.0, 1.0, 0.0] and shapes[4].tolist() == [0.0, 1.0, 0.0]
    for i in (0, 1, 2, 3, 12, 13, 14, 15):  # the padding rows
        assert colours[i, 0] == 1.0
    for i in (6, 7, 10, 11):  # each holds a quarter of the circle: mostly covered
        assert 0.5 < colours[i, 2] < 1.0 and colours[i, 2] == shapes[i, 2]
    assert colours[5, 0] == 1.0 and colours[9, 0] == 1.0
    # Centres: the square's (14, 14) -> patch 4; the circle's (84, 28) -> row 2, col 3.
    assert t.centres.nonzero().flatten().tolist() == [4, 11]
    # Thirds of the 112 px width: columns centred at x = 14, 42, 70, 98.
    assert t.thirds.tolist() == [0, 1, 1, 2] * 4


def test_scene_specs_and_pretext_dataset(scene_dir):
    scenes = read_scenes_json(scene_dir / "scenes.json")
    assert len(scenes) == len(SCENES) and scenes[3].objects[1].colour == "blue"
    ds = PatchLabelDataset(scenes, ImageStore(ImagePreprocessConfig.for_image_size(56)), 14)
    assert ds.colour_names == ["background", "blue", "green", "red"]
    assert ds.shape_names == ["background", "circle", "square"]
    batch = ds.batch([0, 1])
    assert batch.pixels.shape == (2, 3, 56, 56) and batch.colours.shape == (2, 16, 4)
    assert batch.colours[0, :, 3].sum() > 0.5  # scene 0's red circle is there
    assert batch.centres.sum(1).tolist() == [1.0, 1.0] and batch.thirds.shape == (2, 16)
    # Scene 1 is tall (56x84): padded by 14 px at each side, then x1.5 down to 56 px. Column
    # centres 7, 21, 35, 49 are at x = -3.5, 17.5, 38.5, 59.5 of its 56 px width.
    assert batch.thirds[1, :4].tolist() == [0, 0, 2, 2]


def test_real_scene_generator_output_is_read(tmp_path, tokenizer):
    scenes_mod = pytest.importorskip("llava_phi_ros.training.scenes")
    if not hasattr(scenes_mod, "write_scenes"):
        pytest.skip("the scene generator has no write_scenes")
    out = tmp_path / "gen"
    scenes_mod.write_scenes(out, 6, seed=5, progress=False)
    specs = read_scenes_json(out / "scenes.json")
    ds = PatchLabelDataset(specs, ImageStore(ImagePreprocessConfig.for_image_size(112)), 14)
    batch = ds.batch(range(6))
    assert batch.colours[..., 1:].sum() > 1.0  # every scene has objects, and they land on patches
    counts = [len(s.objects) for s in specs]
    assert batch.centres.sum(1).tolist() == counts  # on the tiny preset's 8x8 grid, one
    # centre patch per object (the generator keeps objects a third of the width apart)
    records = read_llava_json(out / "instruct.json")
    captions = captions_by_image(read_llava_json(out / "captions.json"))
    assert ConversationDataset(records, tokenizer, "caption", captions=captions).stats \
        .skipped_no_caption == 0
    ConversationDataset(records, tokenizer, "image",
                        ImageStore(ImagePreprocessConfig.for_image_size(56)), 16)


# ----- training ------------------------------------------------------------------------------
def test_stage1_trains_only_the_projector(tmp_path, scene_dir, micro_dir):
    cfg = _small(stage="1", init=str(micro_dir), data=str(scene_dir), steps=3)
    result = train(cfg, tmp_path / "s1", progress=False)
    assert result.finished and len(result.losses) == 3
    before, after = _state(micro_dir), _state(tmp_path / "s1")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.mm_projector.") for k in changed)
    assert {k for k in before if k.startswith("model.mm_projector.")} == changed
    model = build_model("micro", 100)
    named = trainer.freeze_for_stage(model, "1")
    assert [n for n, _ in named] == [n for n, _ in model.named_parameters()
                                     if n.startswith("model.mm_projector.")]


def test_stage0b_trains_the_vision_tower_and_its_loss_goes_down(tmp_path, scene_dir, micro_dir):
    cfg = _small(stage="0b", init=str(micro_dir), data=str(scene_dir), steps=25, batch_size=8,
                 lr=1e-2)
    result = train(cfg, tmp_path / "s0b", progress=False)
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert last < 0.7 * first, result.losses
    before, after = _state(micro_dir), _state(tmp_path / "s0b")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)
    assert "pretext" not in json.dumps(sorted(after))  # the head is not part of the model


def test_resume_reproduces_uninterrupted_training(tmp_path, scene_dir, micro_dir):
    cfg = _small(stage="2", init=str(micro_dir), data=str(scene_dir), steps=6, grad_accum=2,
                 batch_size=3, save_every=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    halted = train(cfg, tmp_path / "resumed", progress=False, halt_after=3)
    assert not halted.finished and halted.step == 3
    assert (tmp_path / "resumed" / trainer.STATE_DIR / trainer.STATE_FILE).is_file()
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.finished and resumed.start_step == 3
    assert halted.losses + resumed.losses == straight.losses
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / trainer.STATE_DIR).exists()  # removed when finished
    log = [json.loads(x) for x in (tmp_path / "resumed" / trainer.LOG_FILE).read_text()
           .splitlines()]
    assert [x["step"] for x in log] == list(range(1, 7))
    with pytest.raises(TrainUsageError, match="nothing to resume"):
        train(cfg, tmp_path / "straight", resume=True, progress=False)
    train(cfg, tmp_path / "other", progress=False, halt_after=1)
    changed = TrainConfig(**(vars(cfg) | {"steps": 8}))
    with pytest.raises(TrainUsageError, match="settings differ"):
        train(changed, tmp_path / "other", resume=True, progress=False)


def test_overfitting_a_few_samples_then_answering_through_the_pipeline(tmp_path, scene_dir):
    """Loss falls below half in a short run, and `VisionLanguageModel.ask` (the code path of
    `llava-phi ask`) then gives the trained answers: prompt, labels and images line up."""
    code = trainer.main(["--stage", "2", "--init", "micro", "--data", str(scene_dir),
                         "--out", str(tmp_path / "fit"), "--steps", "80", "--batch-size", "8",
                         "--lr", "5e-3", "--log-every", "10", "--no-progress"])
    assert code == 0
    log = [json.loads(x) for x in (tmp_path / "fit" / trainer.LOG_FILE).read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    record = json.loads((tmp_path / "fit" / trainer.CONFIG_FILE).read_text())
    assert record["finished"] and record["trained_parts"] == ["mm_projector", "llm"]
    vlm = VisionLanguageModel.load(str(tmp_path / "fit"))
    right = 0
    records = read_llava_json(scene_dir / "instruct.json")
    for rec in records:
        question, answer = rec.turns[0]
        right += vlm.ask(load_image(rec.image), question).text == answer
    assert right >= 6, right


def test_stage0_joint_then_stages_1_and_2_chain(tmp_path, scene_dir):
    s0 = train(_small(stage="0", init="micro", data=str(scene_dir), steps=3), tmp_path / "s0",
               progress=False)
    assert s0.pretext_accuracy is not None
    log = json.loads((tmp_path / "s0" / trainer.LOG_FILE).read_text().splitlines()[-1])
    assert {"lm_loss", "pretext_loss", "pretext_accuracy"} <= set(log)
    s1 = train(_small(stage="1", init=str(tmp_path / "s0"), data=str(scene_dir), steps=2),
               tmp_path / "s1", progress=False)
    s2 = train(_small(stage="2", init=str(tmp_path / "s1"), data=str(scene_dir), steps=2,
                      tune_vision_tower=True), tmp_path / "s2", progress=False)
    assert s1.finished and s2.finished
    a, b = _state(tmp_path / "s1"), _state(tmp_path / "s2")
    assert not torch.equal(a["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
                           b["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])
    answer = VisionLanguageModel.load(str(tmp_path / "s2")).ask(
        load_image(scene_dir / "images" / "scene_0.png"), "What colour is the circle?")
    assert answer.finish_reason in ("stop", "length")


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(stage="2", data="x", steps=100, lr=1e-3, warmup_steps=10,
                      min_lr_ratio=0.1)
    lrs = [trainer.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_weight_decay_skips_biases_and_norms():
    model = build_model("micro", 100)
    groups = trainer.param_groups(trainer.freeze_for_stage(model, "2"), 0.1)
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])


def test_cli_errors_and_exit_codes(tmp_path, scene_dir, micro_dir, capsys):
    def run(*argv: str) -> int:
        return trainer.main(["--no-progress", *argv])

    assert run("--out", str(tmp_path / "a"), "--data", str(scene_dir)) == 2  # no --stage
    assert "--stage is required" in capsys.readouterr().err
    assert run("--stage", "1", "--init", str(tmp_path / "nowhere"), "--data", str(scene_dir),
               "--out", str(tmp_path / "a")) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert run("--stage", "1", "--init", "micro", "--data", str(tmp_path / "empty"),
               "--out", str(tmp_path / "b")) == 1
    assert "no LLaVA JSON" in capsys.readouterr().err
    assert run("--stage", "2", "--steps", "0", "--data", str(scene_dir),
               "--out", str(tmp_path / "c")) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("x")
    assert run("--stage", "1", "--init", str(micro_dir), "--data", str(scene_dir),
               "--out", str(tmp_path / "full"), "--overwrite") == 2
    assert (tmp_path / "full" / "precious.txt").is_file()
    assert run("--resume", "--out", str(tmp_path / "d")) == 2
    assert run("--stage", "1", "--init", str(micro_dir), "--data", str(scene_dir), "--steps",
               "2", "--batch-size", "2", "--out", str(tmp_path / "e"), "--halt-after", "1") == 0
    assert "halted" in capsys.readouterr().out
    assert run("--resume", "--out", str(tmp_path / "e"), "--steps", "5") == 2
    assert "differ" in capsys.readouterr().err
    assert run("--resume", "--out", str(tmp_path / "e")) == 0
    assert "finished at step 2/2" in capsys.readouterr().out


def test_mc_drills_join_stages_0a_and_2_as_text_only_samples(tmp_path, scene_dir, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("captions.json", "instruct.json"):
        (data / name).write_text((scene_dir / name).read_text())
    drill = {"id": "d0", "conversations": [
        {"from": "human", "value": "Context: the answer is red.\nWhat colour is the circle?\n"
                                   "A. blue\nB. red\nAnswer with the option's letter from the "
                                   "given choices directly."},
        {"from": "gpt", "value": "B"}]}
    for stage, expected in (("0a", True), ("2", True), ("1", False)):
        names = [p.name for p in trainer._json_paths(TrainConfig(stage=stage, data=str(data)),
                                                     ("instruct.json",))]
        assert (trainer.MC_DRILL_FILE in names) is False  # none written yet
        (data / trainer.MC_DRILL_FILE).write_text(json.dumps([drill]))
        names = [p.name for p in trainer._json_paths(TrainConfig(stage=stage, data=str(data)),
                                                     ("instruct.json",))]
        assert (trainer.MC_DRILL_FILE in names) is expected, stage
        (data / trainer.MC_DRILL_FILE).unlink()
    # In caption mode (stage 0a) the text-only drill is kept as it is, not skipped.
    records = read_llava_json(scene_dir / "instruct.json")
    (tmp_path / "d.json").write_text(json.dumps([drill]))
    drills = read_llava_json(tmp_path / "d.json")
    captions = captions_by_image(read_llava_json(scene_dir / "captions.json"))
    ds = ConversationDataset(records + drills, tokenizer, "caption", captions=captions)
    assert len(ds) == len(records) + 1 and ds.stats.skipped_no_caption == 0
    text = tokenizer.decode(ds.samples[-1].ids, skip_special_tokens=False)
    assert "USER: Context: the answer is red.\nWhat colour is the circle?" in text
    labelled = [t for t, lab in zip(ds.samples[-1].ids, ds.samples[-1].labels, strict=True)
                if lab != IGNORE_INDEX]
    assert tokenizer.decode(labelled, skip_special_tokens=False) == " B<|endoftext|>"
    # In image mode (stage 2) it is a text-only sample in a batch with image samples.
    images = ImageStore(ImagePreprocessConfig.for_image_size(56))
    mixed = ConversationDataset(records[:2] + drills, tokenizer, "image", images, 16)
    batch = mixed.batch([0, 1, 2])
    assert batch.pixels.shape[0] == 2 and int(batch.image_mask[2].sum()) == 0


def _focus_file(scene_dir: Path, out: Path) -> Path:
    """One single-turn question per scene (as mc.json holds mc questions)."""
    records = [{"id": f"f{i}", "image": str(scene_dir / rec["image"]),
                "conversations": rec["conversations"][:2]}
               for i, rec in enumerate(json.loads((scene_dir / "instruct.json").read_text()))]
    out.write_text(json.dumps(records))
    return out


def test_focus_set_is_its_own_micro_batch_with_its_own_token_mean(tmp_path, scene_dir,
                                                                  micro_dir):
    focus = _focus_file(scene_dir, tmp_path / "focus.json")
    cfg = _small(stage="2", init=str(micro_dir), data=str(scene_dir), steps=4, grad_accum=2,
                 batch_size=3, focus_json=[str(focus)], focus_batch_size=2, focus_weight=0.5,
                 save_every=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    log = [json.loads(x) for x in (tmp_path / "straight" / trainer.LOG_FILE).read_text()
           .splitlines()]
    assert all(x["loss"] == pytest.approx(x["lm_loss"] + 0.5 * x["focus_loss"]) for x in log)
    assert all(x["focus_loss"] > 0 for x in log)
    record = json.loads((tmp_path / "straight" / trainer.CONFIG_FILE).read_text())
    assert record["data"]["focus"]["samples"] == len(SCENES)
    # The focus loss of a step is the mean over the focus micro-batches' own label tokens.
    setup = trainer._Setup(load_model(micro_dir), load_tokenizer(micro_dir),
                           ImagePreprocessConfig.for_image_size(56))
    trainer._build_data(cfg, setup)
    streams = {"text": trainer.SampleStream(len(setup.text), 0, 0),
               "focus": trainer.SampleStream(len(setup.focus), 0, 2)}
    losses = trainer._accumulate_gradients(setup.model, setup, cfg, 1, streams,
                                           torch.device("cpu"), trainer.nullcontext())
    batches = [setup.focus.batch(streams["focus"].take(k * 2, 2)) for k in (2, 3)]
    total = sum(b.num_label_tokens for b in batches)
    with torch.no_grad():
        expected = sum(trainer.lm_loss(setup.model, b, total).item() for b in batches)
    assert losses.focus == pytest.approx(expected, rel=1e-5)
    # Resuming a run with a focus set reproduces it (the focus stream restarts in place).
    train(cfg, tmp_path / "resumed", progress=False, halt_after=2)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.losses == straight.losses[2:]
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without the focus set the same run trains differently.
    plain = train(_small(stage="2", init=str(micro_dir), data=str(scene_dir), steps=4,
                         grad_accum=2, batch_size=3), tmp_path / "plain", progress=False)
    assert plain.losses != straight.losses


def test_focus_set_settings_are_checked_and_drills_are_not_drawn_twice(tmp_path, scene_dir):
    focus = str(_focus_file(scene_dir, tmp_path / "focus.json"))
    for kw, match in ((dict(stage="2", focus_json=[focus]), "both"),
                      (dict(stage="2", focus_batch_size=4), "both"),
                      (dict(stage="1", focus_json=[focus], focus_batch_size=4), "stage 0a or 2"),
                      (dict(stage="2", focus_json=[focus], focus_batch_size=4,
                            focus_weight=0.0), "positive")):
        with pytest.raises(TrainUsageError, match=match):
            TrainConfig(data=str(scene_dir), **kw).validate()
    data = tmp_path / "data"
    data.mkdir()
    for name in ("captions.json", "instruct.json"):
        (data / name).write_text((scene_dir / name).read_text())
    (data / trainer.MC_DRILL_FILE).write_text("[]")
    names = [p.name for p in trainer._json_paths(TrainConfig(
        stage="0a", data=str(data), focus_json=[str(data / trainer.MC_DRILL_FILE)],
        focus_batch_size=4), ("captions.json",))]
    assert names == ["captions.json"]  # the drills are the focus set, not mixed in as well
    cli = trainer.build_parser().parse_args(
        ["--stage", "0a", "--data", str(data), "--out", "x", "--focus-json", focus,
         "--focus-json", "b.json", "--focus-batch-size", "8", "--focus-weight", "2"])
    cfg = trainer.config_from_args(cli)
    assert (cfg.focus_json, cfg.focus_batch_size, cfg.focus_weight) == ([focus, "b.json"], 8, 2.0)
