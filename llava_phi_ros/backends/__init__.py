"""Inference backends behind one interface (`base.Backend`), created through one registry. No ROS.

This module imports no runtime (torch, onnxruntime, tensorrt): it holds the names that the node's
parameters, the launch file, the CLI and the bench all check against, and imports a backend's
module only when one is created.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model.metadata import ModelMetadata
    from .base import Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")  # every backend name the product knows
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")  # auto: fp32 on CPU, fp16 on a GPU
# How the torch backend runs a decode step: eager (the static step, op by op), graph (that step
# captured in CUDA graphs, one per attention window), fused (the fused Triton step of
# model/fused_step.py in one CUDA graph; torch references on the CPU); auto: fused on a GPU with
# Triton, graph on a GPU without it, eager on the CPU.
DECODE_PATHS = ("auto", "eager", "graph", "fused")
EXPORT_DTYPES = ("float32", "float16")  # what `llava-phi export` writes (onnxruntime runs)
# name -> the module whose create(metadata, device, dtype, max_context) builds it
_IMPLEMENTATIONS = {"torch": "llava_phi_ros.backends.torch_backend",
                    "onnxruntime": "llava_phi_ros.backends.onnxruntime_backend",
                    "tensorrt": "llava_phi_ros.backends.tensorrt_backend"}
# The options only some backends take (node parameters of the same names); others ignore them.
BACKEND_OPTIONS = {"torch": ("decode_path",), "tensorrt": ("engine_dir", "max_prefill")}
assert set(_IMPLEMENTATIONS) <= set(BACKENDS) and set(BACKEND_OPTIONS) <= set(BACKENDS)


def implemented_backends() -> tuple[str, ...]:
    """The backends this build can create, in BACKENDS order."""
    return tuple(b for b in BACKENDS if b in _IMPLEMENTATIONS)


def create_backend(name: str, metadata: ModelMetadata, device: str = "cpu",
                   dtype: str | None = None, max_context: int | None = None,
                   options: Mapping[str, Any] | None = None) -> Backend:
    """The one way the CLI, the node and the bench make a backend; BackendError when the name
    is unknown or not built yet, or the backend refuses the device or dtype. `options`: the
    BACKEND_OPTIONS this backend takes (the rest are not its concern)."""
    from .base import BackendError

    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name not in _IMPLEMENTATIONS:
        raise BackendError(f"backend {name!r} is not implemented yet (implemented: "
                           f"{', '.join(implemented_backends())})")
    module = importlib.import_module(_IMPLEMENTATIONS[name])
    own = {k: v for k, v in (options or {}).items() if k in BACKEND_OPTIONS.get(name, ())}
    return module.create(metadata, device=device, dtype=dtype, max_context=max_context, **own)
