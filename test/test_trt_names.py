"""Every name of TensorRT's Python API that the TensorRT code uses exists in TensorRT 10.3.

TensorRT itself cannot be imported here (its -libs wheel is fetched from NVIDIA's index, which
no machine here reaches, and needs a GPU driver), but PyPI's `tensorrt-cu12-bindings==10.3.0`
wheel holds the 10.3 Python module: a pybind11 extension whose string table carries every class,
method, property and enum value name it defines, and the package's __init__.py. The names are
read from those files without importing them. Linkers merge string tails, so a short name may
appear only as the end of a longer one ("num_errors" inside "get_num_errors"); such a tail, or
a word of the module's docstrings, counts as present.

The names checked are every attribute the TensorRT modules access, less those that are
attributes of the other objects they use (torch, tensors, streams, paths, dicts, numpy, this
project's own modules and self).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_phi_ros.backends import base
from llava_phi_ros.model.builtin import random_tiny_config
from llava_phi_ros.model.metadata import ModelMetadata
from llava_phi_ros.trt import manifest, plan

REPO = Path(__file__).resolve().parents[1]
TRT_MODULES = [REPO / "llava_phi_ros" / "trt" / "build.py",
               REPO / "llava_phi_ros" / "backends" / "tensorrt_backend.py"]
# Names any TensorRT code must use: the test cannot pass on code that no longer calls TensorRT.
CORE = {"execute_async_v3", "set_tensor_address", "set_input_shape", "parse_from_file",
        "build_serialized_network", "add_optimization_profile", "STRONGLY_TYPED",
        "deserialize_cuda_engine", "set_device_memory", "USER_MANAGED"}
_CFG = random_tiny_config()
OTHER_OBJECTS = [torch, torch.Tensor, torch.cuda, torch.cuda.Stream, torch.cuda.CUDAGraph,
                 torch.version, Path, dict, list, str, bytes, memoryview, np, base.Backend,
                 base.KVSnapshot(0, 0, None), manifest, plan, plan.GraphIO, manifest.Device,
                 _CFG, _CFG.text, _CFG.vision, os.stat("."), hashlib, hashlib.sha256(), time, sys]
# Attributes of instances the test cannot make here (a CUDA stream) or dataclass fields.
OTHER_NAMES = {"cuda_stream"} | {f.name for cls in (plan.StepPlan, plan.GraphIO, ModelMetadata)
                                 for f in dataclasses.fields(cls)}


def bindings_names() -> set[str]:
    spec = importlib.util.find_spec("tensorrt_bindings")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-cu12-bindings 10.3.0 is not installed (the kilted CI job has it; "
                    "requirements/ci.txt)")
    package = Path(next(iter(spec.submodule_search_locations)))
    metadata = next(package.parent.glob("tensorrt_cu12_bindings-*.dist-info"))
    assert metadata.name.startswith("tensorrt_cu12_bindings-10.3.0"), metadata.name
    data = (package / "tensorrt.so").read_bytes()
    literal = rb"[A-Za-z_][A-Za-z0-9_ :.`*()\[\],-]{1,200}\0"  # a NUL-terminated string
    strings = {s.decode().rstrip("\0") for s in re.findall(literal, data)}
    words = {w for s in strings for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s)}
    init = (package / "__init__.py").read_text()
    return words | set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", init)) | {
        s for s in strings if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s)}


def tail_of_some(name: str, strings: set[str]) -> bool:
    return any(s.endswith(name) for s in strings)


def used_names() -> set[str]:
    names: set[str] = set()
    own: set[str] = set()
    for path in TRT_MODULES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    own.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                own.add(node.name)
    others = {n for n in names if any(hasattr(obj, n) for obj in OTHER_OBJECTS)} | OTHER_NAMES
    return names - own - others


def test_every_tensorrt_name_the_code_uses_exists_in_10_3():
    available = bindings_names()
    used = used_names()
    assert CORE <= used, f"the TensorRT code no longer uses {sorted(CORE - used)}"
    missing = sorted(n for n in used if n not in available and not tail_of_some(n, available))
    assert missing == [], f"not in TensorRT 10.3's Python API: {missing}"
    assert len(used) > 30  # the whole API surface the builder and runtime touch was checked


def test_the_check_catches_a_name_10_3_does_not_have():
    available = bindings_names()
    for invented in ("execute_async_v4", "set_tensor_address_v2", "STRONGLY_TYPED_V2",
                     "enqueue_v3"):
        assert invented not in available and not tail_of_some(invented, available), invented
    assert "execute_v2" in available  # and one that it does
