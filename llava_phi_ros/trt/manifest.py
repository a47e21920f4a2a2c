"""Engines and what they were built for: the engine manifest, where engines live, and whether a
set of engines may be loaded (or must be rebuilt). No TensorRT and no GPU needed.

An engine runs only on the GPU model, TensorRT version and CUDA it was built with, and only for
the export and settings it was built from. Each build writes `engine_manifest.json` beside its
engines with every such fact (TARGET_FIELDS) and each engine file's size and sha256; loading
compares them all with this machine and these settings and names each field that differs.
Engines live under an explicit `engine_dir` or, by default, `$ROS_HOME/llava_phi_ros/engines`
(`~/.ros/...` without ROS_HOME), never relative to the working directory (`ros2 launch` does not
fix it), in a subdirectory per key (a hash of the target), so engines for several models, GPUs
or precisions sit side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINE_FORMAT = 1  # bumped when the engines' inputs, outputs or this manifest change
MANIFEST_FILE = "engine_manifest.json"
VISION_ENGINE = "vision.engine"
DECODER_ENGINE = "decoder.engine"
ENGINE_FILES = (VISION_ENGINE, DECODER_ENGINE)
TIMING_CACHE = "timing.cache"  # kept beside the engines: a rebuild reuses the kernel timings
JETSON_MODEL_FILE = Path("/proc/device-tree/model")  # "NVIDIA Jetson AGX Orin Developer Kit"
# The fields an engine set is built for: each must match this machine and these settings.
TARGET_FIELDS = ("format", "export_sha256", "source_sha256", "precision", "weights",
                 "tensorrt_version", "gpu_name", "compute_capability", "jetson_module",
                 "cuda_version", "max_context", "max_prefill", "profiles")


class EngineError(RuntimeError):
    """Engines that are missing, damaged, or built for another machine, model or setting."""


@dataclass(frozen=True)
class Device:
    """The machine facts an engine depends on (read by the backend where TensorRT runs)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    cuda_version: str  # the CUDA runtime's "12.6"
    jetson_module: str = ""  # "" off a Jetson


def jetson_module(model_file: Path = JETSON_MODEL_FILE) -> str:
    """The Jetson module from the device tree (AGX Orin / Orin NX / Orin Nano), "" elsewhere."""
    try:
        model = model_file.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return ""
    return model if "jetson" in model.lower() else ""


def target(export_manifest: Mapping[str, Any], export_sha256: str, device: Device,
           max_prefill: int, profiles: Mapping[str, Any]) -> dict[str, Any]:
    """What an engine set for this export, machine and settings must have been built for."""
    shapes = {p: {n: [list(s) for s in mmo] for n, mmo in inputs.items()}
              for p, inputs in profiles.items()}  # JSON's lists, so a read-back compares equal
    return {"format": ENGINE_FORMAT, "export_sha256": export_sha256,
            "source_sha256": export_manifest["source_sha256"],
            "precision": export_manifest["dtype"],
            "weights": export_manifest.get("weights", "float"), **asdict(device),
            "max_context": int(export_manifest["max_context"]), "max_prefill": int(max_prefill),
            "profiles": shapes}


def target_key(wanted: Mapping[str, Any]) -> str:
    """The subdirectory name of an engine set: readable facts + a hash of every target field."""
    digest = hashlib.sha256(json.dumps({f: wanted[f] for f in TARGET_FIELDS},
                                       sort_keys=True).encode()).hexdigest()[:12]
    gpu = re.sub(r"[^a-z0-9]+", "-", wanted["gpu_name"].lower()).strip("-")
    return (f"{wanted['source_sha256'][:8]}-{wanted['precision']}-{wanted['weights']}-"
            f"{gpu}-sm{wanted['compute_capability'].replace('.', '')}-"
            f"trt{wanted['tensorrt_version']}-{digest}")


def engines_root(engine_dir: str = "", environ: Mapping[str, str] = os.environ) -> Path:
    """The engine directory: engine_dir (absolute, ~ expanded) or $ROS_HOME/llava_phi_ros/engines
    (ROS_HOME defaulting to ~/.ros, as ROS 2 does)."""
    if engine_dir:
        path = Path(engine_dir).expanduser()
        if not path.is_absolute():
            raise EngineError(f"engine_dir must be an absolute path, got {engine_dir!r}: the "
                              "working directory of a launched node is not fixed")
        return path
    ros_home = environ.get("ROS_HOME") or str(Path(environ.get("HOME", "~")) / ".ros")
    return Path(ros_home).expanduser() / "llava_phi_ros" / "engines"


def engine_set_dir(root: Path, wanted: Mapping[str, Any]) -> Path:
    """Where this target's engines are: root itself when it holds a build (engine_dir pointing
    at one), else root/<target_key>."""
    return root if (root / MANIFEST_FILE).is_file() else root / target_key(wanted)


def mismatches(wanted: Mapping[str, Any], built: Mapping[str, Any]) -> list[str]:
    """Each target field that differs: 'field: built for X, needed Y'."""
    return [f"{f}: built for {built.get(f)!r}, needed {wanted[f]!r}" for f in TARGET_FIELDS
            if built.get(f) != wanted[f]]


def file_entry(path: Path) -> dict[str, Any]:
    """An engine file's size and sha256, as the manifest records it."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(engine_dir: Path, wanted: Mapping[str, Any],
                   extra: Mapping[str, Any]) -> dict[str, Any]:
    """Record a finished build (the engine files must be written already)."""
    manifest = {**wanted, **extra,
                "files": {name: file_entry(engine_dir / name) for name in ENGINE_FILES}}
    tmp = engine_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(engine_dir / MANIFEST_FILE)  # last: a build cut short leaves no manifest
    return manifest


def problems(engine_dir: Path, wanted: Mapping[str, Any]) -> list[str]:
    """Why the engines in engine_dir cannot serve this target ([] = they can): no build there,
    a field that differs, a file missing, truncated or changed since the build. The backend
    refuses to load with these; `build-engines` rebuilds for them (and reuses otherwise)."""
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        return [f"no engines in {engine_dir} (build them: llava-phi build-engines)"]
    try:
        built = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path} is unreadable: {exc}"]
    found = mismatches(wanted, built)
    for name in ENGINE_FILES:
        recorded = built.get("files", {}).get(name)
        file = engine_dir / name
        if not file.is_file():
            found.append(f"{name}: missing")
        elif recorded is None:
            found.append(f"{name}: not in the manifest")
        elif file.stat().st_size != recorded["bytes"]:
            found.append(f"{name}: {file.stat().st_size} bytes, the build wrote "
                         f"{recorded['bytes']} (truncated or replaced)")
        elif file_entry(file)["sha256"] != recorded["sha256"]:
            found.append(f"{name}: its sha256 differs from the build's (corrupted or replaced)")
    return found

