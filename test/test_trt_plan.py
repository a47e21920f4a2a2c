"""The TensorRT path's decisions that need no TensorRT: optimisation profiles read off the
exported decoder, the shapes and bindings of each step, the KV write-back, prefill chunks, the
engine manifest (every mismatch named, damaged files caught, the rebuild decision) and where
engines live. The backend itself needs TensorRT and a GPU: where they are absent its test says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_phi_ros.export.onnx_export import export_model, read_manifest
from llava_phi_ros.model.builtin import random_tiny_config
from llava_phi_ros.model.tokenizer import build_byte_tokenizer
from llava_phi_ros.pipeline import ModelLoadError, VisionLanguageModel
from llava_phi_ros.trt import manifest as em
from llava_phi_ros.trt.plan import GraphIO, decoder_profiles, plan_step, prefill_chunks

from .reference import random_tiny_model
from .test_onnx import PREPROCESS

CFG = random_tiny_config()
T = CFG.text
CONTEXT = 64
DEVICE = em.Device(tensorrt_version="10.3.0", gpu_name="Orin (nvgpu)", compute_capability="8.7",
                   cuda_version="12.6", jetson_module="NVIDIA Jetson AGX Orin Developer Kit")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trt") / "export"
    export_model(random_tiny_model(seed=1, cfg=CFG), build_byte_tokenizer(), PREPROCESS, out,
                 max_context=CONTEXT)
    return out


@pytest.fixture(scope="module")
def io(export_dir) -> GraphIO:
    return GraphIO.read(export_dir / "decoder.onnx")


def test_the_graph_io_is_read_off_the_export(io):
    assert io.num_layers == T.num_hidden_layers and io.max_context == CONTEXT
    assert io.inputs["inputs_embeds"] == (1, "S", T.hidden_size)
    assert io.inputs["attention_bias"] == (1, 1, "S", "C_plus_S")
    assert io.inputs["past_key_0"] == (1, T.num_attention_heads, CONTEXT, T.head_dim)
    assert io.outputs["logits"] == (1, "K", T.vocab_size)
    assert io.outputs["new_value_1"] == (1, T.num_attention_heads, "S", T.head_dim)
    with pytest.raises(ValueError, match="not this project's decoder graph"):
        GraphIO.from_shapes({"x": (1,)}, {"y": (1,)})


def test_two_profiles_share_a_fixed_cache_and_differ_in_s(io):
    profiles = decoder_profiles(io, max_prefill=48, typical_prompt=20)
    assert list(profiles) == ["prefill", "decode"]
    prefill, decode = profiles["prefill"], profiles["decode"]
    assert set(prefill) == set(io.inputs) == set(decode)
    h, d, c = T.num_attention_heads, T.head_dim, CONTEXT
    assert prefill["inputs_embeds"] == ((1, 1, T.hidden_size), (1, 20, T.hidden_size),
                                        (1, 48, T.hidden_size))
    assert prefill["attention_bias"] == ((1, 1, 1, c + 1), (1, 1, 20, c + 20),
                                         (1, 1, 48, c + 48))
    assert prefill["logit_positions"] == ((1,), (20,), (48,))  # all rows, for choice scoring
    assert all(shape == (1,) for shape in decode["logit_positions"])
    assert decode["position_ids"] == ((1, 1),) * 3
    for name in ("past_key_0", "past_value_1"):
        assert prefill[name] == decode[name] == ((1, h, c, d),) * 3  # never dynamic
    assert decoder_profiles(io, 8, 500)["prefill"]["position_ids"][1] == (1, 8)  # opt <= max
    with pytest.raises(ValueError, match="max_prefill must be in 1..max_context"):
        decoder_profiles(io, CONTEXT + 1, 20)


def test_each_step_binds_every_tensor_with_its_shape_and_writes_the_new_kv_back(io):
    prefill = plan_step(io, start_pos=5, length=7, all_logits=True, max_prefill=16)
    assert prefill.profile == "prefill" and prefill.positions == range(5, 12)
    assert set(prefill.shapes) == set(io.inputs) | set(io.outputs)
    assert prefill.shapes["attention_bias"] == (1, 1, 7, CONTEXT + 7)
    assert prefill.shapes["logits"] == (1, 7, T.vocab_size)
    assert prefill.shapes["new_key_0"] == (1, T.num_attention_heads, 7, T.head_dim)
    assert prefill.shapes["past_key_0"][2] == CONTEXT
    assert prefill.writeback == tuple((f"new_{k}_{i}", f"past_{k}_{i}")
                                      for i in range(T.num_hidden_layers)
                                      for k in ("key", "value"))
    last_only = plan_step(io, 0, 7, False, 16)
    assert last_only.shapes["logits"] == (1, 1, T.vocab_size)
    decode = plan_step(io, CONTEXT - 1, 1, False, 16, decode=True)
    assert decode.profile == "decode" and decode.positions == range(CONTEXT - 1, CONTEXT)
    assert plan_step(io, 3, 1, False, 16).profile == "prefill"  # a one-token prefill stays
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        plan_step(io, CONTEXT - 2, 3, False, 16)
    with pytest.raises(ValueError, match="split it"):
        plan_step(io, 0, 17, False, 16)
    with pytest.raises(ValueError, match="one position with one logit row"):
        plan_step(io, 0, 2, False, 16, decode=True)


def test_a_long_prompt_is_prefilled_in_chunks_that_cover_it_once():
    assert prefill_chunks(10, 600, 256) == [(10, 256), (266, 256), (522, 88)]
    assert prefill_chunks(0, 5, 256) == [(0, 5)]
    covered = [p for start, n in prefill_chunks(3, 1000, 7) for p in range(start, start + n)]
    assert covered == list(range(3, 1003))
    with pytest.raises(ValueError):
        prefill_chunks(0, 5, 0)


def wanted_for(export_dir, io, device=DEVICE, max_prefill=32):
    return em.target(read_manifest(export_dir), "e" * 64, device, max_prefill,
                     decoder_profiles(io, max_prefill, 20))


def fake_build(directory: Path, wanted) -> None:
    """What build-engines leaves (engine bytes stand in for TensorRT's)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(em.ENGINE_FILES):
        (directory / name).write_bytes(bytes([i + 1]) * (1000 + i))
    em.write_manifest(directory, wanted, {"workspace_mb": 2048})


def test_the_manifest_names_every_field_that_differs(export_dir, io, tmp_path):
    wanted = wanted_for(export_dir, io)
    assert wanted["source_sha256"] == read_manifest(export_dir)["source_sha256"]
    assert wanted["precision"] == "float32" and wanted["weights"] == "float"
    assert wanted["max_context"] == CONTEXT and wanted["compute_capability"] == "8.7"
    fake_build(tmp_path, wanted)
    assert em.problems(tmp_path, wanted) == []  # the same target: reused, loadable
    json.loads((tmp_path / em.MANIFEST_FILE).read_text())  # plain JSON
    other = em.Device("10.4.0", "NVIDIA H200", "9.0", "12.8", "")
    reasons = em.problems(tmp_path, wanted_for(export_dir, io, other, max_prefill=16))
    for field in ("tensorrt_version", "gpu_name", "compute_capability", "cuda_version",
                  "jetson_module", "max_prefill", "profiles"):
        assert any(r.startswith(f"{field}: built for") for r in reasons), (field, reasons)
    assert not any(r.startswith(("source_sha256", "precision")) for r in reasons)
    int8 = dict(wanted, weights="int8", export_sha256="f" * 64)
    assert [r.split(":")[0] for r in em.problems(tmp_path, int8)] == ["export_sha256", "weights"]


def test_missing_truncated_or_corrupted_engines_are_named_not_loaded(export_dir, io, tmp_path):
    wanted = wanted_for(export_dir, io)
    assert em.problems(tmp_path / "none", wanted)[0].startswith("no engines in")
    fake_build(tmp_path, wanted)
    decoder = tmp_path / em.DECODER_ENGINE
    data = decoder.read_bytes()
    decoder.write_bytes(data[:-10])
    assert any("truncated" in r for r in em.problems(tmp_path, wanted))
    decoder.write_bytes(data[:-1] + b"\x00")
    assert any("sha256 differs" in r for r in em.problems(tmp_path, wanted))
    decoder.unlink()
    assert f"{em.DECODER_ENGINE}: missing" in em.problems(tmp_path, wanted)
    (tmp_path / em.MANIFEST_FILE).write_text("{not json")
    assert "unreadable" in em.problems(tmp_path, wanted)[0]


def test_engines_live_under_ros_home_keyed_by_target_never_the_working_directory(
        export_dir, io, tmp_path):
    assert em.engines_root("", {"ROS_HOME": "/data/ros"}) == Path(
        "/data/ros/llava_phi_ros/engines")
    assert em.engines_root("", {"HOME": "/home/robot"}) == Path(
        "/home/robot/.ros/llava_phi_ros/engines")
    assert em.engines_root("/opt/engines") == Path("/opt/engines")
    with pytest.raises(em.EngineError, match="absolute path"):
        em.engines_root("engines")
    wanted = wanted_for(export_dir, io)
    key = em.target_key(wanted)
    assert key.startswith(wanted["source_sha256"][:8] + "-float32-float-orin-nvgpu-sm87-trt10.3.0")
    assert em.target_key(wanted_for(export_dir, io, max_prefill=16)) != key
    assert em.engine_set_dir(tmp_path, wanted) == tmp_path / key  # a root of many builds
    fake_build(tmp_path / "one", wanted)
    assert em.engine_set_dir(tmp_path / "one", wanted) == tmp_path / "one"  # one build


def test_the_jetson_module_comes_from_the_device_tree(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert em.jetson_module(model) == "NVIDIA Jetson Orin Nano Developer Kit"
    model.write_bytes(b"Raspberry Pi 5\x00")
    assert em.jetson_module(model) == ""
    assert em.jetson_module(tmp_path / "absent") == ""


def test_the_tensorrt_backend_refuses_clearly_where_it_cannot_run(export_dir, capsys):
    try:
        import tensorrt  # noqa: F401
        has_tensorrt = True
    except ImportError:
        has_tensorrt = False
    import torch

    if has_tensorrt and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are here: test_trt_engines.py runs the engines")
    with pytest.raises(ModelLoadError, match="tensorrt"):
        VisionLanguageModel.load(str(export_dir), backend="tensorrt", device="cuda")
    with capsys.disabled():
        print("\n[not run here] TensorRT engines: tensorrt importable: "
              f"{has_tensorrt}, CUDA GPU: {torch.cuda.is_available()}")


def test_build_engines_says_what_it_needs_where_tensorrt_is_absent(export_dir):
    import subprocess
    import sys

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is here: build-engines would build")
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "llava_phi_ros.cli", "build-engines",
                           "--onnx", str(export_dir)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "needs TensorRT's Python module" in done.stderr and "Traceback" not in done.stderr


def test_the_decode_steps_device_side_bias_and_write_back_match_the_reference():
    """What the TensorRT backend's captured decode step computes from a device position."""
    import torch

    from llava_phi_ros.backends.tensorrt_backend import decode_bias
    from llava_phi_ros.export.graphs import attention_bias

    columns = torch.arange(CONTEXT + 1)
    for pos in (0, 1, 17, CONTEXT - 1):
        got = decode_bias(columns, torch.tensor([pos]), CONTEXT)
        assert torch.equal(got, attention_bias(pos, 1, CONTEXT).view(-1)), pos
    cache = torch.zeros(1, 2, CONTEXT, 3)
    new = torch.randn(1, 2, 4, 3)
    cache.index_copy_(2, torch.arange(9, 13), new)  # the write-back of positions 9..12
    assert torch.equal(cache[:, :, 9:13], new) and not cache[:, :, :9].any()
