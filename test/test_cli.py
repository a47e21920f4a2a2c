"""`llava-phi ask/convert/chat` end to end, against an independent transformers reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from llava_phi_ros.model.checkpoint import save_original_layout
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.preprocess import ImagePreprocessConfig
from llava_phi_ros.model.tokenizer import build_byte_tokenizer

from .reference import Reference, random_tiny_model

QUESTION = "What colour is the cube?"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
MAX_NEW = 24


def llava_phi(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_phi_ros.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=4, cfg=tiny_config(vocab_size=320, image_size=56))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    """A tiny checkpoint in the ORIGINAL LLaVA-Phi layout, as a user would have one."""
    out = tmp_path_factory.mktemp("orig")
    save_original_layout(model, out, tokenizer=build_byte_tokenizer())
    pre = ImagePreprocessConfig.for_image_size(56).to_dict()
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rng.integers(0, 256, (45, 80, 3), dtype=np.uint8)).save(path)
    return path


def reference_answer(model, checkpoint: Path, image_path: Path) -> tuple[list[int], list[float]]:
    """Greedy decoding the reference way: transformers' tokenizer and CLIPImageProcessor, the
    reference's expand2square and tokenizer_image_token, CLIP + Phi from transformers, full
    recompute each step (no KV cache)."""
    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(checkpoint, local_files_only=True)
    img = Image.open(image_path).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (122, 116, 104))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    pixels = torch.as_tensor(np.asarray(processor(square)["pixel_values"][0]))[None]
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    before, after = prompt.split("<image>")
    ids = tok(before).input_ids + [-200] + tok(after).input_ids
    ref = Reference(model)
    embeds = ref.embeds(ids, ref.image_features(pixels))
    out_ids, out_lp = [], []
    for _ in range(MAX_NEW):
        logp = torch.log_softmax(ref.logits(embeds)[0, -1], -1)
        nxt = int(logp.argmax())
        if nxt == tok.eos_token_id:
            break
        out_ids.append(nxt)
        out_lp.append(float(logp[nxt]))
        embeds = torch.cat([embeds, ref.phi.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    return out_ids, out_lp


def assert_matches_reference(result: dict, ref_ids: list[int], ref_lp: list[float]) -> None:
    assert result["token_ids"] == ref_ids
    assert len(result["token_logprobs"]) == len(ref_lp)
    assert max(abs(a - b) for a, b in zip(result["token_logprobs"], ref_lp, strict=True)) < 1e-4


def test_ask_json_matches_reference_before_and_after_convert(model, checkpoint, image_path,
                                                             tmp_path):
    ref_ids, ref_lp = reference_answer(model, checkpoint, image_path)
    assert len(ref_ids) >= 8  # enough tokens to make the comparison meaningful
    args = ["ask", "--image", str(image_path), "--json", "--max-new-tokens", str(MAX_NEW)]
    before = last_json(llava_phi(*args, "--model", str(checkpoint), QUESTION))
    assert_matches_reference(before, ref_ids, ref_lp)
    converted = tmp_path / "canonical"
    proc = llava_phi("convert", "--model", str(checkpoint), "--out", str(converted))
    assert proc.returncode == 0, proc.stderr
    after = last_json(llava_phi(*args, "--model", str(converted), QUESTION))
    assert_matches_reference(after, ref_ids, ref_lp)
    assert after["answer"] == before["answer"]
    for key in ("vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s",
                "total_ms"):
        assert isinstance(after[key], float) and after[key] >= 0


def test_ask_choices(checkpoint, image_path):
    result = last_json(llava_phi("ask", "--model", str(checkpoint), "--image", str(image_path),
                                 "--json", "--choice", "red", "--choice", "blue", "--choice",
                                 "green", QUESTION))
    assert result["choices"] == ["red", "blue", "green"]
    assert len(result["choice_logprobs"]) == 3 and all(lp < 0 for lp in result["choice_logprobs"])
    assert abs(sum(result["choice_probs"]) - 1) < 1e-6
    best = int(np.argmax(result["choice_logprobs"]))
    assert result["choice_index"] == best and result["answer"] == result["choices"][best]


def test_default_model_is_builtin_with_warning(image_path):
    proc = llava_phi("ask", "--image", str(image_path), "--json", "--max-new-tokens", "4", "hi")
    result = last_json(proc)
    assert "builtin:tiny" in proc.stderr and "meaningless" in proc.stderr
    assert "builtin:tiny" in result["model_id"]


def test_chat_keeps_history(checkpoint, image_path):
    proc = llava_phi("chat", "--model", str(checkpoint), "--image", str(image_path),
                     "--max-new-tokens", "5", stdin="What is it?\nAnd the colour?\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 1


@pytest.mark.parametrize("case", ["missing_dir", "no_config", "wrong_layout", "corrupt_weights",
                                  "bad_image", "missing_image", "empty_question", "bad_backend",
                                  "bad_temperature"])
def test_errors_are_one_line_and_nonzero(case, checkpoint, image_path, tmp_path):
    model, image, question, extra = str(checkpoint), str(image_path), QUESTION, []
    if case == "missing_dir":
        model = str(tmp_path / "nope")
    elif case in ("no_config", "wrong_layout", "corrupt_weights"):
        broken = tmp_path / "broken"
        broken.mkdir()
        for f in checkpoint.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        if case == "no_config":
            (broken / "config.json").unlink()
        elif case == "wrong_layout":
            (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
        else:
            weights = broken / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        model = str(broken)
    elif case == "bad_image":
        image = str(tmp_path / "bad.jpg")
        Path(image).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif case == "missing_image":
        image = str(tmp_path / "missing.png")
    elif case == "empty_question":
        question = "   "
    elif case == "bad_backend":
        extra = ["--backend", "nonsense"]
    elif case == "bad_temperature":
        extra = ["--temperature", "-2"]
    proc = llava_phi("ask", "--model", model, "--image", image, *extra, question)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
