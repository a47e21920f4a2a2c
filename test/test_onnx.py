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
    assert manifest["opset"] == {"vision": 17, "decoder": 17} and manifest["dtype"] == "float32"
    assert manifest["weights"] == "float"
    assert manifest["tensorrt_10_3_check"]["problems"] == []
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


def test_the_decoder_graph_never_copies_its_cache(random_export):
    import onnx

    from llava_phi_ros.export.trt_check import SHAPE_ONLY, cache_copies

    decoder = onnx.load(str(random_export / "decoder.onnx"), load_external_data=False)
    pasts = {i.name for i in decoder.graph.input if i.name.startswith("past_")}
    assert len(pasts) == 2 * random_model().config.text.num_hidden_layers
    readers = {n.op_type for n in decoder.graph.node if set(n.input) & pasts}
    assert readers and readers <= SHAPE_ONLY | {"MatMul"}, readers  # q.k and P.V only
    assert cache_copies(decoder.graph) == []


def test_the_graph_check_passes_on_exports_and_catches_what_tensorrt_refuses(random_export,
                                                                             tmp_path):
    from onnx import TensorProto, helper

    from llava_phi_ros.export.trt_check import check_export, check_graph

    report = check_export(random_export)
    assert report["problems"] == [] and report["nodes"] > 100
    assert "62bdde2a04fc" in report["source"]
    export_model(random_model(), build_byte_tokenizer(), PREPROCESS, tmp_path / "half",
                 dtype="float16")
    assert check_export(tmp_path / "half")["problems"] == []

    def graph(nodes, inputs, opset=17, ir=8, extra_opsets=()):
        x = [helper.make_tensor_value_info(n, t, [2, 2]) for n, t in inputs]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        model = helper.make_model(helper.make_graph(nodes, "g", x, [y]), opset_imports=[
            helper.make_opsetid("", opset), *extra_opsets])
        model.ir_version = ir
        return check_graph(model)

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    assert graph([helper.make_node("Relu", ["a"], ["y"])], [("a", f)]) == []  # the control
    assert "domain 'com.microsoft'" in graph(
        [helper.make_node("FastGelu", ["a"], ["y"], domain="com.microsoft")], [("a", f)],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)])[-1]
    assert any("ir_version 11" in p for p in graph(
        [helper.make_node("Relu", ["a"], ["y"])], [("a", f)], ir=11))
    assert any("opset 23" in p for p in graph(
        [helper.make_node("Relu", ["a"], ["y"])], [("a", f)], opset=23, ir=10))
    assert any("input 'a' is INT64" in p for p in graph(
        [helper.make_node("MatMul", ["a", "a"], ["m"]), helper.make_node("Cast", ["m"], ["y"],
                                                                          to=f)], [("a", i64)]))
    assert any("not supported" in p for p in graph(
        [helper.make_node("Unique", ["a"], ["y"])], [("a", f)]))
    assert any("axes must be a constant" in p for p in graph(
        [helper.make_node("Unsqueeze", ["a", "axes"], ["y"])],
        [("a", f), ("axes", i64)]))
    assert any("Mean/InvStdDev used" in p for p in graph(
        [helper.make_node("LayerNormalization", ["a", "s"], ["n", "mean"]),
         helper.make_node("Add", ["n", "mean"], ["y"])], [("a", f), ("s", f)]))
    copies = graph([helper.make_node("Concat", ["past_key_0", "a"], ["y"], axis=0)],
                   [("past_key_0", f), ("a", f)])
    assert any("Concat" in p and "reads the cache" in p for p in copies)


def test_weights_are_external_data_named_by_their_keys_and_stored_transposed(random_export):
    import onnx

    model = random_model()
    keys = set(model.state_dict())
    stored = {}
    for name in ("vision.onnx", "decoder.onnx"):
        graph = onnx.load(str(random_export / name), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in inits.values())
        assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in graph.node)
        assert not any(n.op_type == "Identity" for n in graph.node)  # no weights merged
        stored |= {k: tuple(t.dims) for k, t in inits.items() if k in keys}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert stored[q] == tuple(model.state_dict()[q].shape[::-1])  # (in, out): MatMul(x, W^T)
    unused = keys - set(stored) - {"model.embed_tokens.weight"}  # embed_tokens.npy
    assert all(".vision_model." in k for k in unused), unused  # the layers after the feature


def test_a_checkpoint_exports_streamed_as_the_model_in_memory_does(tmp_path):
    from llava_phi_ros.export.onnx_export import export_checkpoint
    from llava_phi_ros.model.checkpoint import save_canonical

    model = random_model()
    save_canonical(model, tmp_path / "ckpt", tokenizer=build_byte_tokenizer(),
                   preprocess_config=PREPROCESS)
    streamed = export_checkpoint(tmp_path / "ckpt", build_byte_tokenizer(), PREPROCESS,
                                 tmp_path / "streamed")
    in_memory = export_model(model, build_byte_tokenizer(), PREPROCESS, tmp_path / "memory")
    assert streamed["source_sha256"] == in_memory["source_sha256"]
    import onnx
    from onnx import numpy_helper

    for name in ("vision.onnx", "decoder.onnx"):  # the same weights (written in another order)
        a, b = (onnx.load(str(tmp_path / d / name)) for d in ("streamed", "memory"))
        assert a.graph.node == b.graph.node
        weights = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
        assert {t.name for t in a.graph.initializer} == set(weights)
        for t in a.graph.initializer:
            np.testing.assert_array_equal(numpy_helper.to_array(t), weights[t.name])


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
    assert half.cache["past_key_0"].dtype == torch.float16
    assert torch.isfinite(logits).all()
    assert float((logits - ref).abs().max() / ref.abs().max()) < 2e-2
