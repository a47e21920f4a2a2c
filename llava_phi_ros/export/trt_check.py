"""The graph check: would TensorRT 10.3's ONNX parser take an export's graphs as they are?

Every node of every graph is walked. Its op must be a standard-domain op that the operator table
of onnx-tensorrt's 10.3 release lists as supported (tensorrt_10_3_onnx_ops.json: docs/operators.md
at commit 62bdde2a, the parser TensorRT 10.3.0 pins), and the type of each of its inputs must be
one of the types that table gives the op (every tensor in the graph is some node's input or a
graph output, whose types are checked too). Also checked, where the table restricts them:
Unsqueeze/Squeeze axes and ReduceMean axes constant; LayerNormalization's Mean and InvStdDev
outputs unused; DequantizeLinear zero points absent or zero. And for every graph: opset 17..20
(21 only with DequantizeLinear), ir_version <= 10, and the past keys/values reach nothing but
MatMul (through shape-only ops): a Concat, Expand or Tile would copy the cache at every step.

Types come from ONNX type inference on the graph without its weight data, so a 3B export is
checked in seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

TABLE_FILE = Path(__file__).with_name("tensorrt_10_3_onnx_ops.json")
OPSETS = range(17, 21)  # the 17..20; 21 only for int4 DequantizeLinear
QUANTIZED_OPSET = 21
MAX_IR_VERSION = 10
GRAPHS = ("vision.onnx", "decoder.onnx")
# The table's type names for ONNX element types (DOUBLE etc. are in no op's list).
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16",
              TensorProto.BFLOAT16: "BF16", TensorProto.INT32: "INT32",
              TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8",
              TensorProto.INT8: "INT8", TensorProto.INT4: "INT4",
              TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.DOUBLE: "DOUBLE"}
SHAPE_ONLY = frozenset({"Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze"})
CACHE_READERS = frozenset({"MatMul"})
CONSTANT_AXES = {"Unsqueeze": 1, "Squeeze": 1, "ReduceMean": 1}  # op -> index of its axes input
# (op, input index) -> the types allowed where the table's types are not that input's (None:
# not type-checked here). DequantizeLinear's table types are x's (input 0); its scale is float
# (TensorRT's IDequantizeLayer takes FP32, FP16 or BF16 scales); its zero point is checked by
# _check_dequantize.
INPUT_TYPES = {("DequantizeLinear", 1): ("FP32", "FP16", "BF16"), ("DequantizeLinear", 2): None}


@cache
def operator_table() -> dict[str, Any]:
    """tensorrt_10_3_onnx_ops.json: source, opsets and per-operator support."""
    return json.loads(TABLE_FILE.read_text(encoding="utf-8"))


def check_export(export_dir: str | Path) -> dict[str, Any]:
    """Both graphs of an export: {"nodes", "ops", "problems", "source"} (no problems = pass)."""
    problems: list[str] = []
    ops: Counter[str] = Counter()
    for name in GRAPHS:
        model = onnx.load(str(Path(export_dir) / name), load_external_data=False)
        problems += [f"{name}: {p}" for p in check_graph(model)]
        ops.update(n.op_type for n in model.graph.node)
    source = operator_table()["source"]
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "problems": problems,
            "source": f"{source['repo']} {source['path']} @ {source['commit'][:12]} "
                      f"(TensorRT {source['tensorrt_version'].split()[0]})"}


def check_graph(model: onnx.ModelProto) -> list[str]:
    """Every reason the TensorRT 10.3 parser would refuse (or copy the cache in) this graph."""
    table = operator_table()["operators"]
    problems = _check_header(model)
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = _value_types(graph)
    initializers = {t.name: t for t in graph.initializer}
    constants = set(initializers) | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        entry = table.get(node.op_type)
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} (standard ops only)")
            continue
        if entry is None or not entry["supported"]:
            problems.append(f"{where}: not supported by the TensorRT 10.3 parser")
            continue
        for j, name in enumerate(node.input):
            allowed = INPUT_TYPES.get((node.op_type, j), entry["types"])
            kind = types.get(name)
            if not name or allowed is None:
                continue
            if kind is None:
                problems.append(f"{where}: input {name!r} has no inferred type")
            elif kind not in allowed:
                problems.append(f"{where}: input {name!r} is {kind}; TensorRT 10.3 takes "
                                f"{', '.join(allowed)}")
        axes = CONSTANT_AXES.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes] \
                and node.input[axes] not in constants:
            problems.append(f"{where}: axes must be a constant ({entry['restrictions']})")
        if node.op_type == "LayerNormalization" and any(o in used for o in node.output[1:]):
            problems.append(f"{where}: Mean/InvStdDev used ({entry['restrictions']})")
        if node.op_type == "DequantizeLinear":
            problems += _check_dequantize(where, node, initializers)
    for output in graph.output:
        if types.get(output.name) not in ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"):
            problems.append(f"graph output {output.name!r} is {types.get(output.name)}")
    return problems + cache_copies(graph)


def cache_copies(graph: onnx.GraphProto, prefix: str = "past_") -> list[str]:
    """Nodes other than MatMul that read a past key/value (through shape-only ops)."""
    derived = {i.name for i in graph.input if i.name.startswith(prefix)}
    problems = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        touched = [i for i in node.input if i in derived]
        if not touched:
            continue
        if node.op_type in SHAPE_ONLY:
            derived.update(node.output)
        elif node.op_type not in CACHE_READERS:
            problems.append(f"{node.op_type} {node.name or node.output[0]} reads the cache "
                            f"({', '.join(touched)}): only MatMul may (no copy of the cache)")
    return problems


def _check_header(model: onnx.ModelProto) -> list[str]:
    problems = []
    if model.ir_version > MAX_IR_VERSION:
        problems.append(f"ir_version {model.ir_version} > {MAX_IR_VERSION}")
    quantized = any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            problems.append(f"opset domain {opset.domain!r} (standard ops only)")
        elif opset.version not in OPSETS and not (quantized and opset.version == QUANTIZED_OPSET):
            problems.append(f"opset {opset.version}: this export's graphs use "
                            f"{OPSETS.start}..{OPSETS.stop - 1} (21 only for DequantizeLinear)")
    return problems


def _value_types(graph: onnx.GraphProto) -> dict[str, str]:
    """Each named tensor's element type, in the operator table's names."""
    out: dict[str, str] = {}
    infos: Iterable[onnx.ValueInfoProto] = [*graph.input, *graph.value_info, *graph.output]
    for info in infos:
        if info.type.HasField("tensor_type"):
            out[info.name] = _type_name(info.type.tensor_type.elem_type)
    for tensor in graph.initializer:
        out[tensor.name] = _type_name(tensor.data_type)
    return out


def _type_name(elem_type: int) -> str:
    return TYPE_NAMES.get(elem_type, TensorProto.DataType.Name(elem_type))


def _check_dequantize(where: str, node: onnx.NodeProto,
                      initializers: dict[str, onnx.TensorProto]) -> list[str]:
    """DequantizeLinear: a zero point, when given, is an all-zero initializer."""
    if len(node.input) < 3 or not node.input[2]:
        return []
    init = initializers.get(node.input[2])
    if init is None:
        return [f"{where}: zero point {node.input[2]!r} is not an initializer"]
    if init.data_location == TensorProto.EXTERNAL or any(onnx.numpy_helper.to_array(init)):
        return [f"{where}: zero point must be all zero (symmetric only)"]
    return []
