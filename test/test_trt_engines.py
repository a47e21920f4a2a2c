"""TensorRT engines built from the tiny exports answer like onnxruntime on the same exports:
the same greedy ids (fp32 and fp16), log-probs within 1e-3 (fp32) / 2e-2 (fp16), through a
fresh frame, a reused prefix, choice scoring and a session's second turn; a prompt longer than
max_prefill is prefilled in chunks; a second build reuses the engines; a corrupted engine is a
clear error.

Needs TensorRT 10.3 and a CUDA GPU: skipped elsewhere (every machine this project is developed
and tested on), with the reason printed. It has never run.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    import tensorrt  # noqa: F401
    import torch

    HAVE = torch.cuda.is_available()
    WHY = "no CUDA GPU" if not HAVE else ""
except ImportError as exc:
    HAVE, WHY = False, f"tensorrt does not import ({exc})"

pytestmark = pytest.mark.skipif(not HAVE, reason=f"TensorRT engines not run here: {WHY}")

from llava_phi_ros.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from llava_phi_ros.export.onnx_export import export_model  # noqa: E402
from llava_phi_ros.model.checkpoint import load_model  # noqa: E402
from llava_phi_ros.model.metadata import load_metadata  # noqa: E402
from llava_phi_ros.pipeline import ModelLoadError, VisionLanguageModel  # noqa: E402

from .test_onnx import conversation  # noqa: E402


def pair(export_dir, engine_dir, max_prefill):
    """The export on onnxruntime (CPU) and on its TensorRT engines."""
    from llava_phi_ros.backends.tensorrt_backend import TensorRTBackend
    from llava_phi_ros.trt.build import build_engines

    build_engines(export_dir, engine_dir, max_prefill=max_prefill)
    meta = load_metadata(str(export_dir))
    ort = VisionLanguageModel(OnnxRuntimeBackend(meta, export_dir), meta.tokenizer,
                              meta.preprocess)
    trt = VisionLanguageModel(TensorRTBackend(meta, export_dir, "cuda", engine_dir=str(
        engine_dir), max_prefill=max_prefill), meta.tokenizer, meta.preprocess)
    return ort, trt


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("float16", 2e-2)])
def test_engines_answer_like_onnxruntime(tmp_path, dtype, tolerance):
    meta = load_metadata("builtin:tiny")
    export_model(load_model(meta.weights_dir), meta.tokenizer, meta.preprocess, tmp_path / "x",
                 dtype=dtype)
    ort, trt = pair(tmp_path / "x", tmp_path / "engines", max_prefill=48)  # < the prompt: chunks
    for a, b in zip(conversation(ort), conversation(trt), strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert np.abs(np.subtract(a.token_logprobs, b.token_logprobs)).max(initial=0) < tolerance
        assert np.abs(np.subtract(a.choice_logprobs, b.choice_logprobs)).max(initial=0) < tolerance
    print("\n", trt.backend_info())
    trt.close()


def test_a_corrupted_engine_is_a_clear_error(tmp_path):
    from llava_phi_ros.trt.build import build_engines

    meta = load_metadata("builtin:tiny")
    export_model(load_model(meta.weights_dir), meta.tokenizer, meta.preprocess, tmp_path / "x")
    engines = build_engines(tmp_path / "x", tmp_path / "engines", max_prefill=64)
    assert build_engines(tmp_path / "x", tmp_path / "engines", max_prefill=64) == engines
    decoder = engines / "decoder.engine"
    decoder.write_bytes(decoder.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        VisionLanguageModel.load(str(tmp_path / "x"), backend="tensorrt", device="cuda",
                                 backend_options={"engine_dir": str(engines),
                                                  "max_prefill": 64})
