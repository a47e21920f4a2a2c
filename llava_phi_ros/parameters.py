"""The node's parameters: ONE schema, from which everything else is made.

Each `Param` has a name, a default (its type is the ROS parameter type), a description, a range or
a set of choices, and when a new value applies:
- `LIVE`: at once (the next request sees it);
- `RELOAD`: only while the node is unconfigured (clean up, set, configure);
- `STARTUP`: read-only, set at start (`-p`, a params file or the launch file).

The node's declarations and descriptors (`ros2 param describe`), its validation at start and at
`ros2 param set`, the service core's settings, the params-YAML check of `launch_support` and the
parameter table in config/README.md (`python -m llava_phi_ros.parameters`) and
config/assistant.yaml (`... --yaml`) all come from `PARAMETERS`. ROS-free.
"""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends import BACKENDS, DECODE_PATHS, DTYPE_NAMES

LIVE, RELOAD, STARTUP = "live", "reload", "startup"
IMAGE_TRANSPORTS = ("raw", "compressed")

# A relative ROS name: tokens of letters, digits and '_' separated by '/', none starting with a
# digit; no leading '/', no empty token.
_RELATIVE_ROS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")


class ParameterError(ValueError):
    """A parameter value the node cannot use; the message names the parameter and why."""


@dataclass(frozen=True)
class Param:
    """One node parameter."""

    name: str
    default: bool | int | float | str | tuple[str, ...]  # a tuple stands for a string array
    description: str
    applies: str  # LIVE, RELOAD or STARTUP
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low bound itself is refused: (low, high]
    choices: tuple[str, ...] = ()
    rule: Callable[[Any], str | None] | None = None  # further check: what is wrong, or None

    @property
    def type_name(self) -> str:
        """The ROS parameter type: bool, integer, double, string or string array."""
        return _type_name(self.default)

    @property
    def default_value(self) -> Any:
        """The default as rclpy declares it (a list for a string array)."""
        return list(self.default) if isinstance(self.default, tuple) else self.default

    @property
    def bounds(self) -> str:
        """The accepted values, for messages and docs: '[1, 8192]', '(0, 1]', 'a | b'."""
        if self.choices:
            return " | ".join(self.choices)
        if self.low is None:
            return ""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


def _type_name(value: Any) -> str:
    """The ROS parameter type a Python value stands for."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "string array"
    return type(value).__name__


def _camera_names(cameras: list[str]) -> str | None:
    """What is wrong with a `cameras` list, or None."""
    if not cameras:
        return "cameras must be a non-empty list of names"
    for name in cameras:
        if not _RELATIVE_ROS_NAME.fullmatch(name):
            return (f"cameras: {name!r} is not a valid relative ROS name (letters, digits, '_' and "
                    "'/'; no leading '/', no token starting with a digit, no empty token)")
    if len(set(cameras)) != len(cameras):
        repeated = sorted({c for c in cameras if cameras.count(c) > 1})
        return f"cameras must be unique; repeated: {', '.join(repeated)}"
    return None


def _device_name(device: str) -> str | None:
    """What is wrong with a device name, or None (whether it exists is the backend's check)."""
    if not _DEVICE.fullmatch(device):
        return f"device must be cpu, cuda, cuda:N or mps, got {device!r}"
    return None


PARAMETERS: tuple[Param, ...] = (
    # --- model (needs a reload) --------------------------------------------------------------
    Param("model_path", "", "Checkpoint directory, or builtin:tiny for the embedded toy model "
          "(builtin:random-tiny: random weights, for plumbing tests). Required: an empty or "
          "unreadable path fails configure.", RELOAD),
    Param("backend", "torch", "Inference backend.", RELOAD, choices=BACKENDS),
    Param("device", "cpu", "Device for the model: cpu, cuda, cuda:N.", RELOAD, rule=_device_name),
    Param("dtype", "auto", "Weights dtype; auto = float32 on CPU, float16 on a GPU.", RELOAD,
          choices=DTYPE_NAMES),
    Param("decode_path", "auto", "How the torch backend runs a decode step: eager, graph (CUDA "
          "graphs), fused (fused Triton kernels in one CUDA graph); auto = fused on a GPU with "
          "Triton, graph without it, eager on the CPU.", RELOAD, choices=DECODE_PATHS),
    Param("engine_dir", "", "Directory of TensorRT engines (backend tensorrt): absolute; empty "
          "= $ROS_HOME/llava_phi_ros/engines (~/.ros/... without ROS_HOME).", RELOAD),
    Param("max_context", 0, "KV cache positions (prompt with image + answer); 0 = the model's "
          "max_position_embeddings, or what an export or engine was built for (which must "
          "match).", RELOAD, 0, 131072),
    Param("max_prefill", 0, "Positions per prefill run of the TensorRT decoder engine (its "
          "prefill profile; longer prompts run in chunks); 0 = min(1024, max_context). Must "
          "match the engines' build (llava-phi build-engines --max-prefill).", RELOAD, 0, 131072),
    # --- generation defaults (a request may override them) ------------------------------------
    Param("max_new_tokens", 64, "Default answer length limit in tokens.", LIVE, 1, 8192),
    Param("temperature", 0.0, "Default sampling temperature; 0 = greedy.", LIVE, 0.0, 100.0),
    Param("top_p", 1.0, "Default nucleus sampling mass.", LIVE, 0.0, 1.0, low_open=True),
    Param("system_prompt", "", "System prompt; empty = the model's default.", LIVE),
    # --- cameras (needs a reload: they are subscriptions) -------------------------------------
    Param("cameras", ("camera",), "Camera names; each NAME subscribes to NAME/image_raw (or "
          "NAME/image_raw/compressed). Relative names, so namespaces and remapping apply.",
          RELOAD, rule=_camera_names),
    Param("image_transport", "raw", "raw (sensor_msgs/Image) or compressed (CompressedImage).",
          RELOAD, choices=IMAGE_TRANSPORTS),
    Param("qos_reliable", False, "Subscribe to cameras with reliable QoS instead of sensor-data "
          "QoS (best effort).", RELOAD),
    # --- frames and time (node clock) ---------------------------------------------------------
    Param("max_image_age_s", 2.0, "Refuse the latest frame when older than this (node clock); "
          "0 = no limit.", LIVE, 0.0, 86400.0),
    Param("frame_buffer_s", 5.0, "Seconds of frames kept per camera, for stamp lookups.", LIVE,
          0.0, 3600.0, low_open=True),
    Param("frame_buffer_max_mb", 256.0, "Memory bound of each camera's frame buffer, in MiB.",
          LIVE, 0.0, 65536.0, low_open=True),
    Param("stamp_tolerance_s", 0.05, "A requested stamp matches a buffered frame within this.",
          LIVE, 0.0, 60.0),
    Param("max_future_stamp_s", 0.5, "Refuse camera frames stamped further than this ahead of "
          "the node clock (clock skew; a bad stamp must not become the latest frame).", LIVE,
          0.0, 3600.0),
    # --- queries ------------------------------------------------------------------------------
    Param("query_timeout_s", 60.0, "From acceptance to answer, steady clock; then TIMEOUT.",
          LIVE, 0.0, 86400.0, low_open=True),
    Param("max_pending_queries", 4, "Queries that may wait while one runs; beyond that BUSY "
          "(the action rejects the goal). Below request_queue_depth.", LIVE, 0, 4096),
    Param("request_queue_depth", 256, "Requests the query service and the action's goal, "
          "result and cancel services hold before the node takes them (DDS history depth); "
          "also the depth of ~/answers. Well above max_pending_queries: the excess is taken and "
          "refused BUSY, never dropped unanswered.", STARTUP, 1, 100000),
    Param("session_ttl_s", 300.0, "Idle conversations expire after this many seconds.", LIVE,
          0.0, 86400.0, low_open=True),
    Param("max_sessions", 16, "Conversations kept at most (least recently used evicted).", LIVE,
          1, 10000),
    Param("max_session_turns", 8, "Earlier turns a conversation carries into its prompt.", LIVE,
          1, 1000),
    Param("preencode_latest", False, "Encode each camera's newest frame in the background.",
          LIVE),
    Param("prefix_cache_mb", 512.0, "Memory (on the model's device) for the KV of system "
          "prompt + image (+ a session's earlier turns) kept per frame, so a question about any "
          "of them prefills only its own tokens; least recently used evicted. 0 keeps only the "
          "last request's.", LIVE, 0.0, 65536.0),
    # --- lifecycle ----------------------------------------------------------------------------
    Param("autostart", True, "Configure and activate at start.", STARTUP),
)
SPECS: dict[str, Param] = {p.name: p for p in PARAMETERS}
DEFAULTS: dict[str, Any] = {p.name: p.default_value for p in PARAMETERS}
APPLIES_TEXT = {LIVE: "takes effect at once",
                RELOAD: "needs a reload: set it while the node is unconfigured (clean up first), "
                        "then configure",
                STARTUP: "read-only: set it at start (-p, a params file or the launch file)"}


def coerce(name: str, value: Any) -> Any:
    """The value as the parameter's type (an integer is accepted for a double); or raise."""
    spec = _spec(name)
    expected = spec.type_name
    if expected == "double" and _type_name(value) == "integer":
        return float(value)
    if expected == "string array" and isinstance(value, (list, tuple)) and all(
            isinstance(v, str) for v in value):
        return list(value)
    if _type_name(value) != expected or expected == "string array":
        article = "an" if expected[0] in "aeiou" else "a"
        raise ParameterError(f"{name}: expected {article} {expected}, got {value!r}")
    return value


def check(name: str, value: Any) -> Any:
    """The value coerced and checked against its range, choices and rule; or ParameterError."""
    spec = _spec(name)
    value = coerce(name, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value}")
    if spec.choices and value not in spec.choices:
        raise ParameterError(f"{name} must be {spec.bounds}, got {value!r}")
    if spec.low is not None:
        too_low = value <= spec.low if spec.low_open else value < spec.low
        if too_low or value > spec.high:
            raise ParameterError(f"{name} must be in {spec.bounds}, got {value}")
    if spec.rule is not None:
        problem = spec.rule(value)
        if problem:
            raise ParameterError(problem)
    return value


def check_together(values: Mapping[str, Any]) -> None:
    """Rules between parameters (each value already checked alone); ParameterError."""
    pending, depth = values.get("max_pending_queries"), values.get("request_queue_depth")
    if pending is not None and depth is not None and pending >= depth:
        raise ParameterError(f"max_pending_queries ({pending}) must be below request_queue_depth "
                             f"({depth}): requests beyond the DDS queue would be lost unanswered")


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every value checked and coerced, then the rules between them; unknown names refused."""
    unknown = sorted(set(values) - set(SPECS))
    if unknown:
        raise ParameterError(f"unknown parameter(s): {', '.join(map(str, unknown))}; the node "
                             f"has: {', '.join(SPECS)}")
    checked = {name: check(name, value) for name, value in values.items()}
    check_together(checked)
    return checked


def _spec(name: str) -> Param:
    try:
        return SPECS[name]
    except KeyError:
        raise ParameterError(f"unknown parameter {name!r}") from None


def markdown_table(params: Iterable[Param] = PARAMETERS) -> str:
    """The parameter table of config/README.md."""
    rows = ["| parameter | type | default | range | applies | what |",
            "|---|---|---|---|---|---|"]
    for p in params:
        default = _yaml_value(p.default_value)
        bounds = p.bounds.replace("|", "\\|")
        rows.append(f"| `{p.name}` | {p.type_name} | `{default}` | {bounds} | {p.applies} | "
                    f"{p.description} |")
    return "\n".join(rows)


YAML_HEADER = """\
# Parameters of the llava_phi node, all of them, with their defaults. GENERATED from the schema in
# llava_phi_ros/parameters.py: `python -m llava_phi_ros.parameters --yaml > config/assistant.yaml`
# (test/test_launch_support.py checks that this file is what the schema gives).
#
# `/**` matches the node whatever its name or namespace, so several namespaced instances can
# share this file. launch/assistant.launch.py loads it (argument params_file) and then sets
# model_path, backend, device and use_sim_time from its own arguments on top of it. A bad value
# leaves the node up and unconfigured, with the reason in its log and diagnostics.
/**:
  ros__parameters:
"""


def _yaml_value(value: Any) -> str:
    """A default as YAML that ROS reads back with the same type (2.0 stays a double)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str, list)):
        return json.dumps(value)
    raise TypeError(f"no YAML form for {value!r}")


def params_yaml(params: Iterable[Param] = PARAMETERS) -> str:
    """config/assistant.yaml: every parameter with its default, its description as a comment."""
    lines = [YAML_HEADER.rstrip("\n")]
    for p in params:
        lines.append("")
        bounds = f"{'one of ' if p.choices else 'in '}{p.bounds}; " if p.bounds else ""
        about = f"{p.description} ({bounds}{p.applies})"
        lines += ["    # " + line for line in textwrap.wrap(about, 94)]
        lines.append(f"    {p.name}: {_yaml_value(p.default_value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(params_yaml() if sys.argv[1:] == ["--yaml"] else markdown_table() + "\n")
