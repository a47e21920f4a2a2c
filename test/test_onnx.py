"""The ONNX export and the onnxruntime backend: the same answers as the torch backend (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llava_phi_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
from llava_phi_ros.backends.torch_backend import TorchBackend
from llava_phi_ros.export.onnx_export import export_model, read_manifest
from llava_phi_ros.model.builtin import BUILTIN_TINY_DIR, random_tiny_config
from llava_phi_ros.model.checkpoint import load_model
from llava_phi_ros.model.generation import GenerationConfig, embed_prompt
from llava_phi_ros.model.metadata import load_metadata
from llava_phi_ros.model.preprocess import ImagePreprocessConfig
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX
from llava_phi_ros.model.tokenizer import build_byte_tokenizer
from llava_phi_ros.pipeline import ModelLoadError, VisionLanguageModel

from .reference import random_tiny_model

GEN = GenerationConfig(max_new_tokens=12)
PREPROCESS = ImagePreprocessConfig.for_image_size(56)
SHORT_SYSTEM = "Look."  # a random model's answers collapse onto one token after a long prompt


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 64, 3), dtype=np.uint8)


def random_model():
    """Every weight random (does not collapse onto one token), byte tokenizer, 56 px."""
    return random_tiny_model(seed=1, cfg=random_tiny_config())


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "random"
    export_model(random_model(), build_byte_tokenizer(), PREPROCESS, out, source="random")
    return out


def torch_model() -> VisionLanguageModel:
    return VisionLanguageModel(TorchBackend(random_model()), build_byte_tokenizer(), PREPROCESS,
                               system_prompt=SHORT_SYSTEM)


def ort_model(export_dir, optimization: str = "all",
              system_prompt: str | None = None) -> VisionLanguageModel:
    meta = load_metadata(str(export_dir))
    backend = OnnxRuntimeBackend(meta, export_dir, optimization=optimization)
    return VisionLanguageModel(backend, meta.tokenizer, meta.preprocess,
                               system_prompt=system_prompt)


def assert_same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.reused_prefix_tokens == b.reused_prefix_tokens
    assert np.abs(np.subtract(a.token_logprobs, b.token_logprobs)).max(initial=0) < 1e-4
    assert np.abs(np.subtract(a.choice_logprobs, b.choice_logprobs)).max(initial=0) < 1e-4


def conversation(vlm: VisionLanguageModel) -> list:
    """A fresh frame, the same frame again (reused prefix), choices then a free question (a
    rewind after scoring), another frame, and a session's second turn."""
    enc = vlm.encode_image(frame(0))
    out = [vlm.ask(enc, "What is there?", generation=GEN),
           vlm.ask(enc, "Is it big?", generation=GEN),
           vlm.ask(enc, "Which colour?", choices=["red", "blue", "green"], generation=GEN),
           vlm.ask(enc, "Which colour is it?", generation=GEN)]
    other = vlm.encode_image(frame(1))
    out.append(vlm.ask(other, "What is there?", generation=GEN))
    out.append(vlm.ask(enc, "And now?", [("What is there?", out[0].text or "x")], GEN))
    return out


@pytest.mark.parametrize("optimization", ["basic", "all"])
def test_onnxruntime_answers_like_torch(random_export, optimization):
    torch_answers = conversation(torch_model())
    ort_answers = conversation(ort_model(random_export, optimization, SHORT_SYSTEM))
    for a, b in zip(torch_answers, ort_answers, strict=True):
        assert_same(a, b)
    assert ort_answers[1].reused_prefix_tokens > 0 and ort_answers[5].reused_prefix_tokens > 0
    assert len({t for a in torch_answers for t in a.token_ids}) > 3  # not one token


def test_image_embeddings_match(random_export):
    ref = torch_model()
    ort = ort_model(random_export)
    ours, theirs = ort.encode_image(frame(3)).features, ref.encode_image(frame(3)).features
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


@pytest.mark.skipif(BUILTIN_TINY_DIR is None, reason="builtin:tiny is not shipped")
def test_builtin_tiny_exported_answers_like_torch(tmp_path):
    meta = load_metadata("builtin:tiny")
    export_model(load_model(meta.weights_dir), meta.tokenizer, meta.preprocess, tmp_path / "x")
    for a, b in zip(conversation(VisionLanguageModel.load("builtin:tiny")),
                    conversation(ort_model(tmp_path / "x")), strict=True):
        assert_same(a, b)


def test_export_is_self_contained_and_refuses_what_it_cannot_serve(random_export):
    manifest = read_manifest(random_export)
    assert manifest["opset"] == 17 and manifest["dtype"] == "float32"
    assert len(manifest["source_sha256"]) == 64
    with pytest.raises(ModelLoadError, match="exported as float32"):
        VisionLanguageModel.load(str(random_export), backend="onnxruntime", dtype="float16")
    with pytest.raises(ModelLoadError, match="no manifest.json"):
        VisionLanguageModel.load("builtin:tiny", backend="onnxruntime")
    with pytest.raises(ValueError, match="no weight files"):  # no PyTorch weights beside it
        VisionLanguageModel.load(str(random_export), backend="torch")
    vlm = VisionLanguageModel.load(str(random_export), backend="onnxruntime")
    assert "/onnxruntime/float32/" in vlm.description
    vlm.close()


def test_cli_export_then_ask_on_onnxruntime(tmp_path):
    out = tmp_path / "export"
    image = tmp_path / "frame.png"
    from PIL import Image

    Image.fromarray(frame(4)).save(image)
    cli = [sys.executable, "-m", "llava_phi_ros.cli"]
    done = subprocess.run([*cli, "export", "--model", "builtin:random-tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = []
    for backend, model in (("torch", "builtin:random-tiny"), ("onnxruntime", str(out))):
        ask = subprocess.run([*cli, "ask", "--model", model, "--backend", backend, "--image",
                              str(image), "--json", "--max-new-tokens", "8", "What is there?"],
                             capture_output=True, text=True, timeout=300)
        assert ask.returncode == 0, ask.stderr
        answers.append(json.loads(ask.stdout.strip().splitlines()[-1]))
    assert answers[0]["token_ids"] == answers[1]["token_ids"]
    assert np.allclose(answers[0]["token_logprobs"], answers[1]["token_logprobs"], atol=1e-4)


def _feeds_from(model, names: set[str]) -> dict[str, list]:
    """For each node, whether an input is (through shape-only ops) one of the named inputs."""
    passthrough = {"Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
    derived = set(names)
    hits = []
    for node in model.graph.node:  # nodes are topologically sorted
        touched = [i for i in node.input if i in derived]
        if not touched:
            continue
        if node.op_type in passthrough:
            derived.update(node.output)
        hits.append((node.op_type, touched))
    return hits


def test_the_decoder_graph_never_copies_its_cache(random_export):
    import onnx

    decoder = onnx.load(str(random_export / "decoder.onnx"))
    onnx.checker.check_model(decoder)
    pasts = {i.name for i in decoder.graph.input if i.name.startswith("past_")}
    assert len(pasts) == 2 * random_model().config.text.num_hidden_layers
    uses = _feeds_from(decoder, pasts)
    assert uses and {op for op, _ in uses} <= {"MatMul", "Transpose"}, uses  # q.k and P.V only
    assert all(op not in ("Concat", "Expand", "Tile") for op, _ in uses)
    assert decoder.opset_import[0].version == 17 and decoder.ir_version <= 10
    domains = {n.domain for n in decoder.graph.node} | {
        n.domain for n in onnx.load(str(random_export / "vision.onnx")).graph.node}
    assert domains <= {"", "ai.onnx"}  # standard ops only: no com.microsoft contrib ops


def test_fp16_export_stays_finite_where_raw_scores_overflow_fp16(tmp_path):
    """The overflow-scaled model of test_static_step: q/k weights x70 (raw q.k > 98000)."""
    model = random_model()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(70.0)
                proj.bias.mul_(70.0)
    export_model(model, build_byte_tokenizer(), PREPROCESS, tmp_path / "fp16", dtype="float16")
    meta = load_metadata(str(tmp_path / "fp16"))
    half = OnnxRuntimeBackend(meta, tmp_path / "fp16")
    full = TorchBackend(model)
    prompt = [5, 17, 3, IMAGE_TOKEN_INDEX, 9, 42, 7, 11]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1)).numpy()
    ref = full.prefill(embed_prompt(full, prompt, full.encode_image(pixels)))
    logits = half.prefill(embed_prompt(half, prompt, half.encode_image(pixels))).float()
    assert half.cache["past_key_0"].dtype == np.float16
    assert torch.isfinite(logits).all()
    assert float((logits - ref).abs().max() / ref.abs().max()) < 2e-2
