"""Exporting without the model in memory: graphs traced on placeholder weights, then the real
weights streamed into external data files one tensor at a time.

`placeholder_model` has the model's structure with every parameter a view into one shared
buffer (the memory of the largest tensor), no two of them equal by value: the TorchScript
exporter merges parameters that are equal by value, and must not merge these. The
graphs are exported with the parameters as graph inputs named by their state-dict keys
(`export_params=False`), which `WeightWriter` then turns into initializers whose bytes live in
`<graph>.data` beside the graph (ONNX external data: no 2 GB protobuf limit, and a runtime can
map the file). A weight used only through a `Transpose` (nn.Linear's MatMul(x, W^T)) is stored
transposed and the Transpose dropped, which constant folding would otherwise do at load. Under
`--weights int8|int4` the decoder's linear weights are stored as integers and scales instead,
each dequantized by a DequantizeLinear node (quantize.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import version_converter

from ..model.config import LlavaPhiConfig
from ..model.llava_phi import LlavaPhiForCausalLM
from .quantize import INT4_OPSET, integer_format, is_quantized, pack_int4, quantize

_DISTINCT = 1024  # values 1 + k/1024, k < 1024: distinct in fp16 and fp32
_ALIGN = 64  # byte alignment of each tensor in a data file (lets a runtime map it)


def placeholder_model(cfg: LlavaPhiConfig, dtype: torch.dtype) -> LlavaPhiForCausalLM:
    """The model's structure on the CPU in about its largest tensor's memory.

    Parameter i is a contiguous view of one shared buffer starting at element i (contiguous, so
    tracing computes at full speed: CPU fp16 matmuls on stride-0 weights run ~40x slower); the
    buffer's first elements are all different, so no two parameters are equal by value.
    """
    with torch.device("meta"):
        model = LlavaPhiForCausalLM(cfg)
    params = list(model.named_parameters())
    if len(params) > _DISTINCT:
        raise ValueError(f"{len(params)} parameters: placeholders tell only {_DISTINCT} apart")
    largest = max(p.numel() for _, p in params)
    steps = torch.arange(largest + len(params), dtype=torch.int32).remainder_(_DISTINCT)
    shared = (1.0 + steps / _DISTINCT).to(dtype)  # 1 + k/1024: exact and distinct in fp16
    for i, (key, param) in enumerate(params):
        module_name, _, leaf = key.rpartition(".")
        value = shared[i:i + param.numel()].view(param.shape)
        model.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(
            value, requires_grad=False)
    model.rebuild_buffers("cpu")  # rotary tables: fp32, as in a loaded model
    return model.eval()


def tensor_digest(key: str, tensor: torch.Tensor) -> str:
    """One line of the source hash: key, dtype, shape and sha256 of the bytes."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return f"{key}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:{digest.hexdigest()}\n"


def source_hash(digests: Mapping[str, str]) -> str:
    """sha256 over every tensor's digest line, in key order: the source weights' identity
    (independent of the order they were read in)."""
    return hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()


class WeightWriter:
    """One exported graph whose weight inputs become external-data initializers.

    The graph's inputs named `prefix + key` for a key of the state dict are its weights; those
    named in `constants` (the wrappers' own buffers: rotary tables) are written at once. Each
    tensor is stored in the dtype the graph declares for it, and named by its state-dict key; the
    keys `weights` quantises are stored as `<key>.quantized` + `<key>.scale` and dequantized
    in the graph into `<key>`.
    """

    def __init__(self, graph_path: Path, state_keys: set[str], prefix: str,
                 constants: Mapping[str, torch.Tensor], weights: str = "float"):
        self.path = graph_path
        self.data_name = graph_path.name + ".data"
        self.weights = weights
        self.model = onnx.load(str(graph_path))
        graph = self.model.graph
        declared = {i.name: i.type.tensor_type.elem_type for i in graph.input}
        # graph input -> initializer name
        self.names = {prefix + k: k for k in state_keys if prefix + k in declared}
        self.names.update({n: n for n in constants if n in declared})
        self._dtypes = {n: onnx.helper.tensor_dtype_to_np_dtype(declared[n]) for n in self.names}
        consumers: dict[str, list[onnx.NodeProto]] = {n: [] for n in self.names}
        for node in graph.node:
            for name in node.input:
                if name in consumers:
                    consumers[name].append(node)
        # A weight read only by Transpose(perm=[1, 0]) nodes is stored transposed.
        self._transposed = {n for n, nodes in consumers.items() if nodes and all(
            node.op_type == "Transpose" and _perm(node) == [1, 0] for node in nodes)}
        self._folded = [node for n in self._transposed for node in consumers[n]]
        self._quantized = {n for n, key in self.names.items() if is_quantized(key, weights)}
        if self._quantized - self._transposed:
            raise RuntimeError(f"{graph_path.name}: not stored as [in, out], cannot quantise: "
                               f"{', '.join(sorted(self._quantized - self._transposed))}")
        self._dequantize: list[onnx.NodeProto] = []
        if self._quantized and integer_format(weights) == "int4":  # INT4, block_size: opset 21
            self.model = version_converter.convert_version(self.model, INT4_OPSET)
            self.model.ir_version = 10
        self._file: BinaryIO = open(graph_path.parent / self.data_name, "wb")  # noqa: SIM115
        self._initializers: dict[str, onnx.TensorProto] = {}
        for name in constants:
            if name in self.names:
                self.write(name, constants[name])

    def write(self, input_name: str, tensor: torch.Tensor) -> None:
        """Append one weight, given by its graph input name."""
        value = tensor.detach().cpu()
        if input_name in self._transposed:
            value = value.t()
        name, dtype = self.names[input_name], self._dtypes[input_name]
        if input_name not in self._quantized:
            array = np.ascontiguousarray(value.numpy(), dtype=dtype)
            self._initializers[input_name] = self._append(name, array)
            return
        q = quantize(name, value.float().numpy(), self.weights, dtype)
        int4 = integer_format(self.weights) == "int4"
        values = self._append(f"{name}.quantized", q.values, pack_int4(q.values) if int4 else None,
                              onnx.TensorProto.INT4 if int4 else None)
        self._initializers[input_name] = values
        self._initializers[input_name + ".scale"] = self._append(f"{name}.scale", q.scale)
        self._dequantize.append(onnx.helper.make_node(
            "DequantizeLinear", [values.name, f"{name}.scale"], [name],
            name=f"{name}.dequantize", **q.attributes))

    def _append(self, name: str, array: np.ndarray, raw: bytes | None = None,
                data_type: int | None = None) -> onnx.TensorProto:
        """Write one tensor's bytes (raw when packed) into the data file; its initializer."""
        data = raw if raw is not None else memoryview(np.ascontiguousarray(array)).cast("B")
        self._file.write(b"\0" * (-self._file.tell() % _ALIGN))
        offset = self._file.tell()
        self._file.write(data)
        proto = onnx.TensorProto(
            name=name, dims=array.shape, data_location=onnx.TensorProto.EXTERNAL,
            data_type=data_type or onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        for k, v in (("location", self.data_name), ("offset", offset), ("length", len(data))):
            proto.external_data.add(key=k, value=str(v))
        return proto

    def finish(self) -> None:
        """Rewrite the graph: initializers in, weight inputs out, folded Transposes gone."""
        self._file.close()
        missing = sorted(n for n in self.names if n not in self._initializers)  # by input name
        if missing:
            raise RuntimeError(f"{self.path.name}: weights never written: {', '.join(missing)}")
        graph = self.model.graph
        renamed = dict(self.names)
        renamed.update({node.output[0]: self.names[node.input[0]] for node in self._folded})
        for node in self._folded:
            graph.node.remove(node)
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name in renamed:
                    node.input[j] = renamed[name]
        for node in reversed(self._dequantize):  # first: they read only initializers
            graph.node.insert(0, node)
        kept = [i for i in graph.input if i.name not in self.names]
        del graph.input[:]
        graph.input.extend(kept)
        graph.initializer.extend(self._initializers.values())
        onnx.save(self.model, str(self.path))
        onnx.checker.check_model(str(self.path))  # by path: external data and > 2 GB allowed


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
