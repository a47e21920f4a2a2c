"""Weight-only quantisation of the decoder's linear layers, as standard ONNX DequantizeLinear.

`llava-phi export --weights int8|int4` stores each decoder layer's q/k/v/dense/fc1/fc2 weight as
integers plus scales, dequantized in the graph by a DequantizeLinear node feeding its MatMul
(the weight is stored transposed, [in, out]; weights.py). Everything else (lm_head, the
embeddings, the vision tower, norms and biases) keeps the export's dtype, except that
`int8+lm_head` / `int4+lm_head` quantise lm_head too: on a CPU an fp32 lm_head is half of a
decode step (issue "TensorRT": Phi-2 geometry, 4 layers, 2 threads). Symmetric, zero point
0 (omitted), which is what TensorRT's weight-only path and ONNX Runtime's DequantizeLinear ->
MatMulNBits fusion take:
- int8: one scale per output channel (axis 1 of [in, out]); opset 17 suffices.
- int4: one scale per block of 128 inputs of each output channel (axis 0, block_size 128),
  which needs opset 21 (INT4 and block_size); an input size 128 does not divide is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# float: the export dtype, nothing quantised; "+lm_head": lm_head quantised too (for CPUs, where
# an fp32 lm_head is half of a decode step; llama.cpp quantises its output matrix likewise).
WEIGHT_FORMATS = ("float", "int8", "int4", "int8+lm_head", "int4+lm_head")
LM_HEAD_KEY = "lm_head.weight"
# onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, which computes at accuracy level
# 1 with fp32 activations and at 4 (its default) with int8 activations; the export's manifest
# says which (onnxruntime only: TensorRT ignores it).
ACCURACY_LEVELS = (1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
INT4_BLOCK = 128  # inputs per int4 scale
INT4_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size
# The state-dict keys quantised: the decoder layers' linear weights (not lm_head, not vision).
QUANTIZED_KEY = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|dense)|mlp\.(fc1|fc2))\.weight")


@dataclass
class Quantized:
    """One weight as DequantizeLinear's inputs and attributes."""

    values: np.ndarray  # int8 [in, out]; int4 values in -8..7 held as int8 (packed on write)
    scale: np.ndarray  # int8: [out]; int4: [in / 128, out]; in the export dtype
    attributes: dict[str, int]  # axis (and block_size)


def is_quantized(key: str, weights: str) -> bool:
    """Whether this state-dict key is stored quantised under the weight format."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights == "float":
        return False
    return QUANTIZED_KEY.fullmatch(key) is not None or (
        weights.endswith("+lm_head") and key == LM_HEAD_KEY)


def integer_format(weights: str) -> str:
    """The integer type of a weight format: "int4+lm_head" -> "int4"."""
    return weights.partition("+")[0]


def quantize(name: str, weight_in_out: np.ndarray, weights: str,
             scale_dtype: np.dtype) -> Quantized:
    """A transposed linear weight [in, out] (float) -> symmetric integers and scales."""
    w = np.asarray(weight_in_out, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name}: a linear weight is 2-D, got shape {w.shape}")
    n_in, n_out = w.shape
    weights = integer_format(weights)
    if weights == "int8":
        scale = _scale(np.abs(w).max(axis=0), 127, scale_dtype)  # [out]
        values = _round(w / scale.astype(np.float32), 127)
        return Quantized(values, scale, {"axis": 1})
    if weights == "int4":
        if n_in % INT4_BLOCK:
            raise ValueError(f"{name}: int4 needs the input size to be a multiple of "
                             f"{INT4_BLOCK} (blocks of {INT4_BLOCK} inputs), it is {n_in}; "
                             "export it as int8")
        blocks = w.reshape(n_in // INT4_BLOCK, INT4_BLOCK, n_out)
        scale = _scale(np.abs(blocks).max(axis=1), 7, scale_dtype)  # [in / 128, out]
        full = np.repeat(scale.astype(np.float32), INT4_BLOCK, axis=0)  # [in, out]
        return Quantized(_round(w / full, 7), scale, {"axis": 0, "block_size": INT4_BLOCK})
    raise ValueError(f"{name}: cannot quantise as {weights!r}")


def dequantize(q: Quantized) -> np.ndarray:
    """What DequantizeLinear computes (float32 [in, out]): the reference for tests."""
    scale = q.scale.astype(np.float32)
    if "block_size" in q.attributes:
        scale = np.repeat(scale, q.attributes["block_size"], axis=0)
    return q.values.astype(np.float32) * scale


def pack_int4(values: np.ndarray) -> bytes:
    """int4 values (int8 in -8..7) as ONNX stores INT4: two per byte, the first in the low
    nibble, an odd count padded with a zero nibble."""
    nibbles = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _scale(amax: np.ndarray, qmax: int, dtype: np.dtype) -> np.ndarray:
    """amax / qmax in the scale dtype, never 0 (an all-zero channel dequantizes to zeros)."""
    scale = (amax / qmax).astype(dtype)
    return np.where(scale > 0, scale, np.asarray(1.0, dtype)).astype(dtype)


def _round(x: np.ndarray, qmax: int) -> np.ndarray:
    """Round half to even and clip to the symmetric range -qmax..qmax, as int8."""
    return np.clip(np.rint(x), -qmax, qmax).astype(np.int8)
