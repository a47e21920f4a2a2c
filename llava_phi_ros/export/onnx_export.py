"""`llava-phi export`: a model directory -> a self-contained ONNX export directory.

OUT holds vision.onnx and decoder.onnx (see graphs.py) with their weights beside them as
external data (vision.onnx.data, decoder.onnx.data; weights.py), embed_tokens.npy (the runtime
embeds tokens itself: backends take input embeddings), config.json, the tokenizer,
preprocessor_config.json and manifest.json; `load_metadata(OUT)` reads it like a checkpoint and
the onnxruntime backend needs nothing else.

Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)` at opset 17. It emits
standard ONNX ops only (no com.microsoft contrib ops, no opset-23 Attention, no
RMSNormalization), which is what TensorRT 10.3's parser takes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from ..backends import EXPORT_DTYPES
from ..backends.torch_backend import DTYPES as TORCH_DTYPES
from ..model.checkpoint import (
    CONFIG_FILE,
    _atomic_dir,
    _write_extras,
    _write_json,
    stream_checkpoint,
)
from ..model.config import LlavaPhiConfig
from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.preprocess import ImagePreprocessConfig
from ..model.tokenizer import Tokenizer
from .graphs import (
    PARAMETER_PREFIX,
    DecoderGraph,
    VisionGraph,
    attention_bias,
    new_names,
    past_names,
)
from .quantize import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, WEIGHT_FORMATS
from .trt_check import check_export
from .weights import WeightWriter, placeholder_model, source_hash, tensor_digest

OPSET = 17
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBED_FILE = "embed_tokens.npy"
MANIFEST_FILE = "manifest.json"
EMBED_KEY = "model.embed_tokens.weight"
EXPORT_FORMAT = 2  # bumped when the graphs' inputs or outputs change


def export_model(model: LlavaPhiForCausalLM, tokenizer: Tokenizer,
                 preprocess: ImagePreprocessConfig, out_dir: str | Path,
                 dtype: str = "float32", max_context: int | None = None,
                 overwrite: bool = False, source: str = "", weights: str = "float",
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, Any]:
    """A model in memory -> the export directory; returns its manifest."""
    return export_weights(model.config, model.state_dict(), tokenizer, preprocess, out_dir,
                          dtype, max_context, overwrite, source, weights, accuracy_level)


def export_checkpoint(model_dir: str | Path, tokenizer: Tokenizer,
                      preprocess: ImagePreprocessConfig, out_dir: str | Path,
                      dtype: str = "float32", max_context: int | None = None,
                      overwrite: bool = False, source: str = "", weights: str = "float",
                      accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, Any]:
    """A checkpoint directory -> the export directory, one tensor in memory at a time."""
    with stream_checkpoint(model_dir) as (cfg, state):
        return export_weights(cfg, state, tokenizer, preprocess, out_dir, dtype, max_context,
                              overwrite, source, weights, accuracy_level)


def export_weights(cfg: LlavaPhiConfig, state: Mapping[str, torch.Tensor],
                   tokenizer: Tokenizer, preprocess: ImagePreprocessConfig,
                   out_dir: str | Path, dtype: str = "float32", max_context: int | None = None,
                   overwrite: bool = False, source: str = "", weights: str = "float",
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, Any]:
    """Write the export directory (atomically) from a state dict read in its own order, one
    tensor at a time (a lazy one is never held whole); returns the manifest.

    weights: "float" (all in dtype) or "int8" / "int4" (the decoder's linear weights
    quantised; "+lm_head": lm_head too; quantize.py); accuracy_level: how onnxruntime
    computes those (manifest only).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got "
                         f"{accuracy_level!r}")
    context = max_context or cfg.text.max_position_embeddings
    if not 1 <= context <= cfg.text.max_position_embeddings:
        raise ValueError(f"max_context must be in 1..{cfg.text.max_position_embeddings}, "
                         f"got {context}")
    net = placeholder_model(cfg, TORCH_DTYPES[dtype])
    with _atomic_dir(out_dir, overwrite) as tmp:
        vision, decoder = VisionGraph(net), DecoderGraph(net)
        _export_vision(vision, cfg, tmp / VISION_FILE)
        _export_decoder(decoder, cfg, context, tmp / DECODER_FILE)
        keys = set(state)
        writers = [WeightWriter(tmp / VISION_FILE, keys, PARAMETER_PREFIX,
                                dict(vision.named_buffers())),
                   WeightWriter(tmp / DECODER_FILE, keys, PARAMETER_PREFIX,
                                dict(decoder.named_buffers()), weights)]
        del net, vision, decoder
        digests: dict[str, str] = {}
        for key in state:
            tensor = state[key]
            digests[key] = tensor_digest(key, tensor)
            for writer in writers:
                if PARAMETER_PREFIX + key in writer.names:
                    writer.write(PARAMETER_PREFIX + key, tensor)
            if key == EMBED_KEY:  # the runtime embeds tokens itself
                np.save(tmp / EMBED_FILE, tensor.to(TORCH_DTYPES[dtype]).numpy())
            del tensor
        for writer in writers:
            writer.finish()
        check = check_export(tmp)
        _write_json(tmp / CONFIG_FILE, cfg.to_original_dict(eos_token_id=tokenizer.eos_token_id))
        _write_extras(tmp, tokenizer, preprocess)
        manifest = {
            "format": EXPORT_FORMAT, "source": source, "source_sha256": source_hash(digests),
            "dtype": dtype, "weights": weights, "max_context": context,
            "opset": {"vision": _opset(tmp / VISION_FILE), "decoder": _opset(tmp / DECODER_FILE)},
            "onnxruntime": {"matmul_accuracy_level": accuracy_level},
            "exporter": f"torch.onnx.export(dynamo=False) torch {torch.__version__}, weights "
                        "as external data",
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "llava_phi_ros": __version__},
            "num_layers": cfg.text.num_hidden_layers,
            "tensorrt_10_3_check": {"source": check["source"], "nodes": check["nodes"],
                                    "problems": check["problems"]},
            "files": sorted(f.name for f in tmp.iterdir()),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """An export directory's manifest.json (ValueError when absent or of another format)."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{export_dir}: no {MANIFEST_FILE}: not an ONNX export "
                         "(make one with `llava-phi export`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: export format {manifest.get('format')!r}, this build reads "
                         f"{EXPORT_FORMAT}; export again")
    return manifest


def manifest_sha256(export_dir: str | Path) -> str:
    """An export's identity: the sha256 of its manifest.json (graphs' source, settings, check)."""
    return hashlib.sha256((Path(export_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def read_manifest_for(export_dir: str | Path, dtype: str | None,
                      max_context: int | None) -> dict[str, Any]:
    """The manifest of an export a runtime is asked to serve at dtype and max_context (None,
    "" or "auto" / None or 0: the export's own); ValueError naming what differs."""
    manifest = read_manifest(export_dir)
    precision = manifest["dtype"]
    if dtype not in (None, "", "auto", precision):
        raise ValueError(f"{export_dir} was exported as {precision}; dtype {dtype!r} needs "
                         "another export (llava-phi export --dtype)")
    if max_context not in (None, 0, manifest["max_context"]):
        raise ValueError(f"{export_dir} was exported with max_context "
                         f"{manifest['max_context']}, not {max_context}")
    return manifest


def _opset(path: Path) -> int:
    """The standard-domain opset a written graph imports."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export(module: torch.nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    """The graph alone: weights are inputs (WeightWriter makes them initializers), so nothing
    is folded here; runtimes fold the remaining shape arithmetic at load."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False,
                          export_params=False, do_constant_folding=False, **kwargs)


def _export_vision(vision: VisionGraph, cfg: LlavaPhiConfig, path: Path) -> None:
    size = cfg.vision.image_size
    pixels = torch.zeros(1, 3, size, size, dtype=torch.float32)
    _export(vision, (pixels,), path, input_names=["pixel_values"],
            output_names=["image_embeds"])


def _export_decoder(decoder: DecoderGraph, cfg: LlavaPhiConfig, context: int,
                    path: Path) -> None:
    t = cfg.text
    s = 3  # any S: the axis is dynamic
    dtype = decoder.model.dtype
    past = [torch.zeros(1, t.num_attention_heads, context, t.head_dim, dtype=dtype)
            for _ in range(2 * t.num_hidden_layers)]
    args = (torch.zeros(1, s, t.hidden_size, dtype=dtype),
            torch.arange(s)[None], attention_bias(0, s, context),
            torch.tensor([s - 1]), *past)
    inputs = ["inputs_embeds", "position_ids", "attention_bias", "logit_positions",
              *past_names(t.num_hidden_layers)]
    outputs = ["logits", *new_names(t.num_hidden_layers)]
    axes = {"inputs_embeds": {1: "S"}, "position_ids": {1: "S"},
            "attention_bias": {2: "S", 3: "C_plus_S"}, "logit_positions": {0: "K"},
            "logits": {1: "K"}, **{n: {2: "S"} for n in new_names(t.num_hidden_layers)}}
    _export(decoder, args, path, input_names=inputs, output_names=outputs,
            dynamic_axes=axes)

