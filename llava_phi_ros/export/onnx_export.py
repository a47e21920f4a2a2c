"""`llava-phi export`: a model directory -> a self-contained ONNX export directory.

OUT holds vision.onnx, decoder.onnx (see graphs.py), embed_tokens.npy (the runtime embeds
tokens itself: backends take input embeddings), config.json, the tokenizer,
preprocessor_config.json and manifest.json; `load_metadata(OUT)` reads it like a checkpoint and
the onnxruntime backend needs nothing else.

Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)` at opset 17. It emits
standard ONNX ops only (no com.microsoft contrib ops, no opset-23 Attention, no
RMSNormalization), which is what TensorRT 10.3's parser takes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backends import EXPORT_DTYPES
from ..backends.torch_backend import DTYPES as TORCH_DTYPES
from ..model.checkpoint import CONFIG_FILE, _atomic_dir, _write_extras, _write_json
from ..model.llava_phi import LlavaPhiForCausalLM
from ..model.preprocess import ImagePreprocessConfig
from ..model.tokenizer import Tokenizer
from .graphs import DecoderGraph, VisionGraph, attention_bias, new_names, past_names

OPSET = 17
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBED_FILE = "embed_tokens.npy"
MANIFEST_FILE = "manifest.json"
EXPORT_FORMAT = 1  # bumped when the graphs' inputs or outputs change


def weights_hash(model: LlavaPhiForCausalLM) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def export_model(model: LlavaPhiForCausalLM, tokenizer: Tokenizer,
                 preprocess: ImagePreprocessConfig, out_dir: str | Path,
                 dtype: str = "float32", max_context: int | None = None,
                 overwrite: bool = False, source: str = "") -> dict[str, Any]:
    """Write the export directory (atomically); returns its manifest."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    cfg = model.config
    context = max_context or cfg.text.max_position_embeddings
    if not 1 <= context <= cfg.text.max_position_embeddings:
        raise ValueError(f"max_context must be in 1..{cfg.text.max_position_embeddings}, "
                         f"got {context}")
    source_hash = weights_hash(model)
    net = copy.deepcopy(model).to(torch.device("cpu"), TORCH_DTYPES[dtype]).eval()
    net.rebuild_buffers("cpu")
    with _atomic_dir(out_dir, overwrite) as tmp:
        _export_vision(net, tmp / VISION_FILE)
        _export_decoder(net, context, tmp / DECODER_FILE)
        np.save(tmp / EMBED_FILE, net.model.embed_tokens.weight.detach().numpy())
        _write_json(tmp / CONFIG_FILE, cfg.to_original_dict(eos_token_id=tokenizer.eos_token_id))
        _write_extras(tmp, tokenizer, preprocess)
        manifest = {
            "format": EXPORT_FORMAT, "source": source, "source_sha256": source_hash,
            "dtype": dtype, "max_context": context, "opset": OPSET,
            "exporter": f"torch.onnx.export(dynamo=False) torch {torch.__version__}",
            "num_layers": cfg.text.num_hidden_layers,
            "files": [VISION_FILE, DECODER_FILE, EMBED_FILE],
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


def _export(module: torch.nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False,
                          do_constant_folding=True, **kwargs)


def _export_vision(model: LlavaPhiForCausalLM, path: Path) -> None:
    size = model.config.vision.image_size
    pixels = torch.zeros(1, 3, size, size, dtype=torch.float32)
    _export(VisionGraph(model), (pixels,), path, input_names=["pixel_values"],
            output_names=["image_embeds"])


def _export_decoder(model: LlavaPhiForCausalLM, context: int, path: Path) -> None:
    t = model.config.text
    s = 3  # any S: the axis is dynamic
    past = [torch.zeros(1, t.num_attention_heads, context, t.head_dim, dtype=model.dtype)
            for _ in range(2 * t.num_hidden_layers)]
    args = (torch.zeros(1, s, t.hidden_size, dtype=model.dtype),
            torch.arange(s)[None], attention_bias(0, s, context),
            torch.tensor([s - 1]), *past)
    inputs = ["inputs_embeds", "position_ids", "attention_bias", "logit_positions",
              *past_names(t.num_hidden_layers)]
    outputs = ["logits", *new_names(t.num_hidden_layers)]
    axes = {"inputs_embeds": {1: "S"}, "position_ids": {1: "S"},
            "attention_bias": {2: "S", 3: "C_plus_S"}, "logit_positions": {0: "K"},
            "logits": {1: "K"}, **{n: {2: "S"} for n in new_names(t.num_hidden_layers)}}
    _export(DecoderGraph(model), args, path, input_names=inputs, output_names=outputs,
            dynamic_axes=axes)

