"""`llava-phi ask/convert/chat` end to end, against an independent transformers reference.

The reference side is written here from the reference code's recipe: transformers' tokenizer
(AutoTokenizer from the checkpoint directory), its PIL CLIPImageProcessor, the reference's
expand2square and tokenizer_image_token, and CLIP + Phi from transformers (test/reference.py),
recomputing the whole sequence at every step (no KV cache).
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_phi_ros.model.checkpoint import save_original_layout
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.generation import GenerationConfig
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.preprocess import ImagePreprocessConfig, load_image
from llava_phi_ros.model.tokenizer import build_byte_tokenizer
from llava_phi_ros.pipeline import VisionLanguageModel

from .reference import Reference, random_tiny_model

SEED = 19  # a seed whose greedy answer varies (12 distinct tokens in 24) and does not stop early
QUESTION = "What colour is the cube?"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
EOS = 256  # <|endoftext|> of the byte tokenizer (ids 0..255 are the bytes)
MAX_NEW = 24
CHOICES = ["red", "blue", "dark green"]


def llava_phi(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_phi_ros.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prompt_text(question: str) -> str:
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def cli_test_model() -> LlavaPhiForCausalLM:
    """A random tiny model whose answers are printable ASCII text or the stop token.

    The embedding has 320 rows but the byte tokenizer only 257 tokens: a random model would also
    emit ids the tokenizer cannot decode (and control bytes such as newlines, which would break
    the line-based chat output). A -1e4 lm_head bias takes those out of every greedy choice while
    keeping the bias non-zero everywhere.
    """
    model = random_tiny_model(seed=SEED, cfg=tiny_config(vocab_size=320, image_size=56))
    allowed = torch.zeros(model.config.text.vocab_size, dtype=torch.bool)
    allowed[32:127] = True  # printable ASCII, space included
    allowed[EOS] = True
    with torch.no_grad():
        model.lm_head.bias[~allowed] = -1e4
    return model


def write_checkpoint(model: LlavaPhiForCausalLM, out: Path) -> Path:
    """A tiny checkpoint in the ORIGINAL LLaVA-Phi layout, as a user would have one."""
    save_original_layout(model, out, tokenizer=build_byte_tokenizer())
    pre = ImagePreprocessConfig.for_image_size(model.config.vision.image_size).to_dict()
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out


@pytest.fixture(scope="module")
def model() -> LlavaPhiForCausalLM:
    return cli_test_model()


@pytest.fixture(scope="module")
def ref(model) -> Reference:
    return Reference(model)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return write_checkpoint(model, tmp_path_factory.mktemp("orig") / "ckpt")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rng.integers(0, 256, (45, 80, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tok(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>") == EOS
    return tokenizer


@pytest.fixture(scope="module")
def pixels(checkpoint, image_path) -> torch.Tensor:
    """The reference's expand2square with the mean colour, then transformers' PIL processor."""
    processor = CLIPImageProcessorPil.from_pretrained(checkpoint, local_files_only=True)
    img = Image.open(image_path).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), (122, 116, 104))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return torch.as_tensor(np.asarray(processor(square)["pixel_values"][0]))[None]


def tokenizer_image_token(tok, text: str) -> list[int]:
    """The reference's tokenizer_image_token: chunks around <image> tokenised separately, joined
    with -200 (Phi's tokenizer adds no BOS, so nothing is dropped)."""
    chunks = [tok(chunk).input_ids for chunk in text.split("<image>")]
    assert len(chunks) == 2
    return chunks[0] + [-200] + chunks[1]


def reference_answer(ref: Reference, tok, pixels: torch.Tensor, question: str,
                     max_new: int = MAX_NEW) -> tuple[list[int], list[float], bool]:
    """Greedy tokens up to the tokenizer's EOS, their log-probs, and whether EOS came."""
    embeds = ref.embeds(tokenizer_image_token(tok, prompt_text(question)),
                        ref.image_features(pixels))
    out_ids, out_lp = [], []
    for _ in range(max_new):
        logp = torch.log_softmax(ref.logits(embeds)[0, -1], -1)
        nxt = int(logp.argmax())
        if nxt == tok.eos_token_id:
            return out_ids, out_lp, True
        out_ids.append(nxt)
        out_lp.append(float(logp[nxt]))
        embeds = torch.cat([embeds, ref.phi.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    return out_ids, out_lp, False


def reference_choice_logprob(ref: Reference, tok, pixels: torch.Tensor, question: str,
                             answer_text: str) -> float:
    """log P(the tokens after the prompt's tokens) for prompt + answer_text tokenised together,
    from one full no-cache forward."""
    prompt_ids = tokenizer_image_token(tok, prompt_text(question))
    full_ids = tokenizer_image_token(tok, prompt_text(question) + answer_text)
    assert full_ids[:len(prompt_ids)] == prompt_ids  # the byte tokenizer never re-splits
    features = ref.image_features(pixels)
    n_prompt = ref.embeds(prompt_ids, features).shape[1]  # the image counts its 16 positions
    logp = torch.log_softmax(ref.logits(ref.embeds(full_ids, features))[0].double(), -1)
    targets = full_ids[len(prompt_ids):]
    return sum(float(logp[n_prompt - 1 + i, t]) for i, t in enumerate(targets))


def assert_matches_reference(result: dict, ref_ids: list[int], ref_lp: list[float]) -> None:
    assert result["token_ids"] == ref_ids
    assert len(result["token_logprobs"]) == len(ref_lp)
    assert max(abs(a - b) for a, b in zip(result["token_logprobs"], ref_lp, strict=True)) < 1e-4


def test_ask_json_matches_reference_before_and_after_convert(checkpoint, image_path, ref, tok,
                                                             pixels, tmp_path):
    ref_ids, ref_lp, stopped = reference_answer(ref, tok, pixels, QUESTION)
    assert not stopped and len(set(ref_ids)) >= 8  # a varied answer: a meaningful comparison
    args = ["ask", "--image", str(image_path), "--json", "--max-new-tokens", str(MAX_NEW)]
    before = last_json(llava_phi(*args, "--model", str(checkpoint), QUESTION))
    assert_matches_reference(before, ref_ids, ref_lp)
    assert before["finish_reason"] == "length"
    assert before["answer"] == tok.decode(ref_ids).strip()
    converted = tmp_path / "canonical"
    proc = llava_phi("convert", "--model", str(checkpoint), "--out", str(converted))
    assert proc.returncode == 0, proc.stderr
    after = last_json(llava_phi(*args, "--model", str(converted), QUESTION))
    assert_matches_reference(after, ref_ids, ref_lp)
    assert after["answer"] == before["answer"]
    for key in ("vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s",
                "total_ms"):
        assert isinstance(after[key], float) and after[key] >= 0


def test_ask_choices_match_reference(checkpoint, image_path, ref, tok, pixels):
    """Each choice is scored as the assistant's whole answer: ' ' + choice + <|endoftext|>."""
    args = [a for choice in CHOICES for a in ("--choice", choice)]
    result = last_json(llava_phi("ask", "--model", str(checkpoint), "--image", str(image_path),
                                 "--json", *args, QUESTION))
    expected = [reference_choice_logprob(ref, tok, pixels, QUESTION, f" {c}<|endoftext|>")
                for c in CHOICES]
    assert result["choices"] == CHOICES
    assert len(result["choice_logprobs"]) == len(CHOICES)
    assert max(abs(a - b) for a, b in zip(result["choice_logprobs"], expected, strict=True)) < 1e-4
    norm = math.log(sum(math.exp(e) for e in expected))
    assert np.allclose(result["choice_probs"], [math.exp(e - norm) for e in expected], atol=1e-6)
    best = int(np.argmax(expected))
    assert result["choice_index"] == best and result["answer"] == CHOICES[best]
    # The comparison can fail: scoring without the leading space, or without the stop token,
    # gives numbers far outside the tolerance.
    for variant in ("{c}<|endoftext|>", " {c}"):
        wrong = [reference_choice_logprob(ref, tok, pixels, QUESTION, variant.format(c=c))
                 for c in CHOICES]
        assert max(abs(a - b) for a, b in zip(wrong, expected, strict=True)) > 1e-2, variant


@pytest.fixture(scope="module")
def eos_checkpoint(model, tok, pixels, tmp_path_factory) -> tuple[Path, list[int], list[float]]:
    """The CLI model with lm_head.bias[<|endoftext|>] raised until the reference's greedy answer
    ends with it after at least 3 tokens, written with config.json's eos_token_id 2 (as some
    LLaVA-Phi checkpoints carry) while the tokenizer's <|endoftext|> is 256."""
    stopping = copy.deepcopy(model)
    ref = Reference(stopping)
    base = float(model.lm_head.bias[EOS].detach())
    for raise_by in np.arange(0.5, 30.0, 0.5):  # deterministic: the first value that stops
        with torch.no_grad():
            ref.phi.lm_head.bias[EOS] = base + float(raise_by)
        ids, lps, stopped = reference_answer(ref, tok, pixels, QUESTION)
        if stopped:
            break
    assert stopped and len(ids) >= 3, (raise_by, ids)
    assert 2 not in ids  # config.json's eos id never comes up: stopping on it would not show
    with torch.no_grad():
        stopping.lm_head.bias[EOS] = base + float(raise_by)
    out = write_checkpoint(stopping, tmp_path_factory.mktemp("eos") / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["bos_token_id"], config["eos_token_id"] = 1, 2  # PhiConfig's defaults
    (out / "config.json").write_text(json.dumps(config))
    return out, ids, lps


def test_ask_stops_on_the_tokenizers_eos_not_the_configs(eos_checkpoint, image_path, tok):
    checkpoint, ref_ids, ref_lp = eos_checkpoint
    assert json.loads((checkpoint / "config.json").read_text())["eos_token_id"] == 2
    result = last_json(llava_phi("ask", "--model", str(checkpoint), "--image", str(image_path),
                                 "--json", "--max-new-tokens", str(MAX_NEW), QUESTION))
    assert result["finish_reason"] == "stop"
    assert EOS not in result["token_ids"]
    assert_matches_reference(result, ref_ids, ref_lp)
    assert result["answer"] == tok.decode(ref_ids).strip()


def test_default_model_is_builtin_with_warning(image_path):
    proc = llava_phi("ask", "--image", str(image_path), "--json", "--max-new-tokens", "4", "hi")
    result = last_json(proc)
    assert "builtin:tiny" in proc.stderr and "toy LLaVA-Phi" in proc.stderr
    assert "generated scenes" in proc.stderr  # it says what it is trained on and knows
    assert result["model_id"] == "builtin:tiny (trained on synthetic scenes)/torch/float32"


CHAT = ("What is it?", "And the colour?")
CHAT_NEW = 10


def test_chat_keeps_history(checkpoint, image_path):
    """Turn 2 of `chat` is what the model answers to Q2 after (Q1, turn 1's answer), not what it
    answers to Q2 alone."""
    proc = llava_phi("chat", "--model", str(checkpoint), "--image", str(image_path),
                     "--max-new-tokens", str(CHAT_NEW), stdin="\n".join([*CHAT, "/quit", ""]))
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 2, proc.stdout
    gen = GenerationConfig(max_new_tokens=CHAT_NEW)
    image = load_image(image_path)

    def fresh(question: str, history=()) -> str:  # a new model each time: no KV cache reuse
        return VisionLanguageModel.load(str(checkpoint)).ask(image, question, history, gen).text

    assert answers[0] == fresh(CHAT[0]) != ""
    with_history = fresh(CHAT[1], [(CHAT[0], answers[0])])
    assert answers[1] == with_history
    assert with_history != fresh(CHAT[1])  # the history matters for these questions


def _copy_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    return broken


# case -> (exit code, what the error line must say). 1 = runtime failure, 2 = bad usage.
ERRORS = {
    "missing_dir": (1, r"does not exist"),
    "no_config": (1, r"no config\.json"),
    "wrong_layout": (1, r"model_type 'bert'"),
    "corrupt_weights": (1, r"model\.safetensors: corrupt safetensors file"),
    "bad_image": (1, r"cannot load image .*bad\.jpg"),
    "missing_image": (1, r"cannot load image .*missing\.png.*No such file"),
    "empty_question": (1, r"question is empty"),
    "bad_backend": (2, r"--backend.*'nonsense'"),
    "no_image_argument": (2, r"--image"),
    "bad_temperature": (2, r"temperature"),
    "zero_max_new_tokens": (2, r"max[-_]new[-_]tokens"),
    "bad_top_p": (2, r"top[-_]p"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_the_right_exit_code(case, checkpoint, image_path, tmp_path):
    model, image, question, extra = str(checkpoint), ["--image", str(image_path)], QUESTION, []
    if case == "missing_dir":
        model = str(tmp_path / "nope")
    elif case == "no_config":
        model = str(_copy_checkpoint(checkpoint, tmp_path))
        (Path(model) / "config.json").unlink()
    elif case == "wrong_layout":
        model = str(_copy_checkpoint(checkpoint, tmp_path))
        (Path(model) / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif case == "corrupt_weights":
        model = str(_copy_checkpoint(checkpoint, tmp_path))
        weights = Path(model) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "bad_image":
        image = ["--image", str(tmp_path / "bad.jpg")]
        (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif case == "missing_image":
        image = ["--image", str(tmp_path / "missing.png")]
    elif case == "empty_question":
        question = "   "
    elif case == "bad_backend":
        extra = ["--backend", "nonsense"]
    elif case == "no_image_argument":
        image = []
    elif case == "bad_temperature":
        extra = ["--temperature", "-2"]
    elif case == "zero_max_new_tokens":
        extra = ["--max-new-tokens", "0"]
    elif case == "bad_top_p":
        extra = ["--top-p", "1.5"]
    proc = llava_phi("ask", "--model", model, *image, *extra, question)
    code, says = ERRORS[case]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("llava-phi"), errors[0]
    assert re.search(says, errors[0]), errors[0]
    if code == 1:  # runtime failures print nothing else (argparse adds its usage lines)
        assert proc.stderr.strip().splitlines() == errors, proc.stderr
