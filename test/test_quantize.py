"""Weight-only int8 / int4 exports: the quantiser's arithmetic, the graphs it writes (standard
DequantizeLinear that the TensorRT 10.3 check passes), and onnxruntime computing exactly the
quantised model: the same answers as torch running the dequantized weights, with ORT's
DequantizeLinear -> MatMulNBits fusion on and off (accuracy level 1: fp32 activations)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from llava_phi_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
from llava_phi_ros.backends.torch_backend import TorchBackend
from llava_phi_ros.export.onnx_export import export_model, read_manifest
from llava_phi_ros.export.quantize import (
    INT4_BLOCK,
    dequantize,
    is_quantized,
    pack_int4,
    quantize,
)
from llava_phi_ros.model.builtin import BUILTIN_TINY_DIR, random_tiny_config
from llava_phi_ros.model.checkpoint import load_model
from llava_phi_ros.model.metadata import load_metadata
from llava_phi_ros.model.tokenizer import build_byte_tokenizer
from llava_phi_ros.pipeline import VisionLanguageModel

from .reference import random_tiny_model
from .test_onnx import PREPROCESS, SHORT_SYSTEM, assert_same, conversation


def weight(seed: int, n_in: int, n_out: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n_in, n_out)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    return w


def test_int8_is_symmetric_per_output_channel_within_half_a_step():
    w = weight(0, 96, 40)
    q = quantize("w", w, "int8", np.float32)
    assert q.values.dtype == np.int8 and q.values.shape == w.shape
    assert q.scale.shape == (40,) and q.attributes == {"axis": 1}
    assert np.abs(q.values).max() == 127 and q.values.min() >= -127
    assert np.all(np.abs(dequantize(q) - w) <= q.scale / 2 + 1e-7)
    assert q.scale[3] == 1.0 and not q.values[:, 3].any()  # zero channel: scale 1, never 0


def test_int4_is_symmetric_in_blocks_of_128_inputs_and_refuses_what_128_does_not_divide():
    w = weight(1, 2 * INT4_BLOCK, 24)
    w[:INT4_BLOCK, 0] *= 100  # a block with a large range must not widen the other's scale
    q = quantize("w", w, "int4", np.float16)
    assert q.scale.shape == (2, 24) and q.scale.dtype == np.float16
    assert q.attributes == {"axis": 0, "block_size": INT4_BLOCK}
    assert -7 <= q.values.min() and q.values.max() <= 7
    full = np.repeat(q.scale.astype(np.float32), INT4_BLOCK, axis=0)
    assert np.all(np.abs(dequantize(q) - w) <= full / 2 + 1e-3 * full)
    assert q.scale[1, 0] < q.scale[0, 0] / 10
    with pytest.raises(ValueError, match="multiple of 128.*it is 200; export it as int8"):
        quantize("model.layers.0.mlp.fc2.weight", weight(2, 200, 8), "int4", np.float32)


def test_int4_packing_is_what_onnx_reads_back():
    values = np.array([-7, 7, -1, 0, 3, -8, 5], np.int8)  # odd count: padded
    tensor = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, values.shape,
                                     pack_int4(values), raw=True)
    assert np.array_equal(onnx.numpy_helper.to_array(tensor), values)


def test_only_the_decoder_layers_linear_weights_are_quantised():
    assert is_quantized("model.layers.7.self_attn.q_proj.weight", "int4")
    assert is_quantized("model.layers.0.mlp.fc2.weight", "int8")
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.fc1.bias",
                "model.mm_projector.0.weight", "model.layers.0.input_layernorm.weight",
                "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert not is_quantized(key, "int8"), key
    assert not is_quantized("model.layers.0.mlp.fc1.weight", "float")
    with pytest.raises(ValueError, match="weights must be one of"):
        is_quantized("model.layers.0.mlp.fc1.weight", "int3")


def dequantized_twin(model, weights: str):
    """The same model with each quantised weight replaced by what DequantizeLinear gives."""
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            if is_quantized(key, weights):
                q = quantize(key, tensor.t().numpy(), weights, np.float32)
                tensor.copy_(torch.from_numpy(dequantize(q)).t())
    return model


def ort_model(export_dir, optimization: str) -> VisionLanguageModel:
    meta = load_metadata(str(export_dir))
    backend = OnnxRuntimeBackend(meta, export_dir, optimization=optimization, accuracy_level=1)
    return VisionLanguageModel(backend, meta.tokenizer, meta.preprocess,
                               system_prompt=SHORT_SYSTEM)


def graph_facts(export_dir):
    decoder = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False)
    dequantize_nodes = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"]
    types = {t.name: t.data_type for t in decoder.graph.initializer}
    opset = next(o.version for o in decoder.opset_import if o.domain == "")
    return dequantize_nodes, types, opset


@pytest.mark.parametrize("optimization", ["disabled", "all"])
def test_int8_export_computes_the_quantised_model(tmp_path_factory, optimization):
    out = tmp_path_factory.getbasetemp() / "int8_random"
    if not out.exists():
        export_model(random_tiny_model(seed=1, cfg=random_tiny_config()), build_byte_tokenizer(),
                     PREPROCESS, out, weights="int8", accuracy_level=1)
    manifest = read_manifest(out)
    assert manifest["weights"] == "int8" and manifest["onnxruntime"]["matmul_accuracy_level"] == 1
    assert manifest["tensorrt_10_3_check"]["problems"] == []
    nodes, types, opset = graph_facts(out)
    layers = random_tiny_config().text.num_hidden_layers
    assert len(nodes) == 6 * layers and opset == 17
    assert types["model.layers.0.mlp.fc1.weight.quantized"] == onnx.TensorProto.INT8
    assert types["lm_head.weight"] == onnx.TensorProto.FLOAT  # lm_head stays float
    twin = dequantized_twin(random_tiny_model(seed=1, cfg=random_tiny_config()), "int8")
    reference = VisionLanguageModel(TorchBackend(twin), build_byte_tokenizer(), PREPROCESS,
                                    system_prompt=SHORT_SYSTEM)
    for a, b in zip(conversation(reference), conversation(ort_model(out, optimization)),
                    strict=True):
        assert_same(a, b)


@pytest.mark.skipif(BUILTIN_TINY_DIR is None, reason="builtin:tiny is not shipped")
def test_int4_export_of_builtin_tiny_computes_the_quantised_model(tmp_path):
    meta = load_metadata("builtin:tiny")
    export_model(load_model(meta.weights_dir), meta.tokenizer, meta.preprocess, tmp_path / "q",
                 weights="int4", accuracy_level=1)
    nodes, types, opset = graph_facts(tmp_path / "q")
    assert opset == 21 and len(nodes) == 6 * 4
    assert all(dict((a.name, a.i) for a in n.attribute) == {"axis": 0, "block_size": 128}
               for n in nodes)
    assert types["model.layers.0.self_attn.q_proj.weight.quantized"] == onnx.TensorProto.INT4
    assert read_manifest(tmp_path / "q")["tensorrt_10_3_check"]["problems"] == []
    twin = dequantized_twin(load_model(meta.weights_dir), "int4")
    reference = VisionLanguageModel(TorchBackend(twin), meta.tokenizer, meta.preprocess,
                                    system_prompt=SHORT_SYSTEM)
    fused, unfused = ort_model(tmp_path / "q", "all"), ort_model(tmp_path / "q", "disabled")
    for a, b, c in zip(conversation(reference), conversation(fused), conversation(unfused),
                       strict=True):
        assert_same(a, b)
        assert_same(b, c)
    decoder = onnx.load(str(tmp_path / "q" / "decoder.onnx"), load_external_data=False)
    for init in decoder.graph.initializer:  # two int4 values per stored byte
        if init.name.endswith(".quantized"):
            length = int(next(e.value for e in init.external_data if e.key == "length"))
            assert length == (int(np.prod(init.dims)) + 1) // 2, init.name


def test_int4_export_refuses_an_input_size_128_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="multiple of 128"):
        export_model(random_tiny_model(seed=1, cfg=random_tiny_config()), build_byte_tokenizer(),
                     PREPROCESS, tmp_path / "q", weights="int4")
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_lm_head_is_quantised_only_when_asked_and_then_computes_the_quantised_model(tmp_path):
    assert is_quantized("lm_head.weight", "int4+lm_head")
    assert is_quantized("model.layers.0.mlp.fc1.weight", "int8+lm_head")
    assert not is_quantized("lm_head.weight", "int4")
    assert not is_quantized("model.embed_tokens.weight", "int8+lm_head")
    model = random_tiny_model(seed=1, cfg=random_tiny_config())
    export_model(model, build_byte_tokenizer(), PREPROCESS, tmp_path / "q",
                 weights="int8+lm_head", accuracy_level=1)
    _, types, _ = graph_facts(tmp_path / "q")
    assert types["lm_head.weight.quantized"] == onnx.TensorProto.INT8
    assert read_manifest(tmp_path / "q")["weights"] == "int8+lm_head"
    twin = dequantized_twin(random_tiny_model(seed=1, cfg=random_tiny_config()), "int8+lm_head")
    reference = VisionLanguageModel(TorchBackend(twin), build_byte_tokenizer(), PREPROCESS,
                                    system_prompt=SHORT_SYSTEM)
    for a, b in zip(conversation(reference), conversation(ort_model(tmp_path / "q", "all")),
                    strict=True):
        assert_same(a, b)
