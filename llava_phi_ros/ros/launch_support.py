"""What launch/assistant.launch.py computes, as pure functions tested without `launch`.

The launch file declares the arguments listed in LAUNCH_ARGUMENTS and, in an OpaqueFunction,
hands the resolved argument strings to plan_launch(); it only turns the returned LaunchPlan into
launch_ros actions. Also here: validation of a parameters YAML (config/assistant.yaml) against
the node's documented parameters, and the rviz config rewritten for a namespace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import parameters

__all__ = [
    "DOCUMENTED_PARAMETERS",
    "LAUNCH_ARGUMENTS",
    "LaunchArgument",
    "LaunchConfigError",
    "LaunchPlan",
    "ParameterFileError",
    "debug_image_topic",
    "image_topic_remappings",
    "node_parameter_overrides",
    "parse_bool",
    "check_launch_executables",
    "plan_launch",
    "rviz_config_for_namespace",
    "validate_namespace",
    "validate_parameters_yaml",
    "validate_rviz_config",
    "validate_topic_name",
]

PACKAGE = "llava_phi_ros"
NODE_NAME = "llava_phi"
EXECUTABLE = "assistant"
DEFAULT_CAMERA = "camera"


class LaunchConfigError(ValueError):
    """A launch argument with a value the node cannot start with."""


class ParameterFileError(ValueError):
    """A parameters YAML that does not match the node's parameters."""


@dataclass(frozen=True)
class LaunchArgument:
    """One launch argument: name, default (None = required) and description."""

    name: str
    default: str | None
    description: str


# `params_file` has no default string here: the launch file gives it the package's
# config/assistant.yaml through FindPackageShare (its path is only known on the machine).
LAUNCH_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument("model_path", None,
                   "Required. LLaVA-Phi checkpoint directory, or builtin:tiny for the embedded "
                   "toy model (demos and tests only)."),
    LaunchArgument("backend", "torch", "Inference backend: torch | onnxruntime | tensorrt."),
    LaunchArgument("device", "cpu", "torch device for the model: cpu, cuda, cuda:0, ..."),
    LaunchArgument("params_file", None,
                   "Node parameters YAML (default: this package's config/assistant.yaml); "
                   "model_path, backend, device and use_sim_time from these arguments override "
                   "it."),
    LaunchArgument("namespace", "", "Namespace of the node (and of its camera topics)."),
    LaunchArgument("use_sim_time", "false",
                   "Use /clock (simulation or rosbag replay): true|false."),
    LaunchArgument("use_rviz", "false",
                   "Also start rviz2 showing the annotated debug image: true|false."),
    LaunchArgument("image_topic", "",
                   "Image topic of the camera given by `camera` (e.g. /front/color/image_raw); "
                   "remaps <camera>/image_raw to it and <camera>/image_raw/compressed to "
                   "<image_topic>/compressed. Empty: no remapping."),
    LaunchArgument("camera", DEFAULT_CAMERA,
                   "Which name of the `cameras` parameter image_topic applies to (default: the "
                   "default camera, 'camera')."),
)

# Every parameter of the node that belongs in a parameters file, with its default: the schema's.
DOCUMENTED_PARAMETERS: dict[str, Any] = dict(parameters.DEFAULTS)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
# A ROS name token: letters, digits, '_', not starting with a digit; '~' and '/' handled apart.
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_bool(value: str | bool, name: str) -> bool:
    """Parse a launch boolean ("true"/"false", also 1/0, yes/no, on/off), else raise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LaunchConfigError(f"{name} must be true or false, got {value!r}")


def validate_topic_name(name: str, what: str = "topic", *, allow_private: bool = False) -> str:
    """Return a valid ROS topic name (absolute or relative) unchanged, else raise."""
    text = str(name)
    body = text
    if allow_private and body.startswith("~/"):
        body = body[2:]
    elif body.startswith("/"):
        body = body[1:]
    tokens = body.split("/")
    if not body or any(not _TOKEN.fullmatch(tok) for tok in tokens):
        raise LaunchConfigError(
            f"{what} {text!r} is not a valid ROS name: tokens of letters, digits and '_', "
            "not starting with a digit, separated by single '/', no trailing '/'"
        )
    return text


def validate_namespace(namespace: str) -> str:
    """Return the namespace ('' or a valid name) normalised to start with '/' when set."""
    text = str(namespace).strip()
    if text in ("", "/"):
        return ""
    validate_topic_name(text, "namespace")
    return text if text.startswith("/") else "/" + text


def image_topic_remappings(image_topic: str, camera: str = DEFAULT_CAMERA) -> list[tuple[str, str]]:
    """Remappings sending camera ``camera``'s raw and compressed topics to ``image_topic``."""
    topic = str(image_topic).strip()
    if not topic:
        return []
    validate_topic_name(topic, "image_topic")
    validate_topic_name(camera, "camera")
    if camera.startswith("/"):
        raise LaunchConfigError(f"camera {camera!r} must be a relative name, as in `cameras`")
    return [
        (f"{camera}/image_raw", topic),
        (f"{camera}/image_raw/compressed", f"{topic}/compressed"),
    ]


def node_parameter_overrides(
    model_path: str, backend: str, device: str, use_sim_time: str | bool
) -> dict[str, Any]:
    """The parameters the launch arguments set on top of params_file, validated and typed."""
    path = str(model_path).strip()
    if not path:
        raise LaunchConfigError(
            "model_path is required: a LLaVA-Phi checkpoint directory, or builtin:tiny for the "
            "embedded toy model (e.g. model_path:=builtin:tiny)"
        )
    try:  # the node's own checks (the parameter schema)
        backend = parameters.check("backend", str(backend).strip())
        device = parameters.check("device", str(device).strip())
    except parameters.ParameterError as exc:
        raise LaunchConfigError(str(exc)) from exc
    return {
        "model_path": path,
        "backend": backend,
        "device": device,
        "use_sim_time": parse_bool(use_sim_time, "use_sim_time"),
    }


def debug_image_topic(namespace: str = "") -> str:
    """The absolute topic of the node's debug image under ``namespace``."""
    return f"{validate_namespace(namespace)}/{NODE_NAME}/debug_image"


def rviz_config_for_namespace(config_text: str, namespace: str) -> str:
    """The rviz config text with its debug image topic moved under ``namespace``."""
    default_topic = debug_image_topic("")
    if default_topic not in config_text:
        raise LaunchConfigError(f"the rviz config does not show {default_topic}")
    return config_text.replace(default_topic, debug_image_topic(namespace))


@dataclass
class LaunchPlan:
    """Everything the launch file needs to build its actions."""

    namespace: str
    parameters: list[Any]  # [params_file path, overrides dict]: later entries win
    remappings: list[tuple[str, str]]
    use_rviz: bool
    rviz_config: str | None  # path of the shipped rviz config; the namespaced text is apart
    rviz_config_text: str | None = None  # set when the namespace changes the debug image topic
    use_sim_time: bool = False
    node_name: str = NODE_NAME
    package: str = PACKAGE
    executable: str = EXECUTABLE


def check_launch_executables(plan: LaunchPlan, package_prefix: Callable[[str], str]) -> None:
    """Refuse a launch whose executables are missing, before anything starts (LaunchConfigError).

    package_prefix(name) returns a package's install prefix or raises (ament_index_python's
    get_package_prefix). Without this, a missing rviz2 aborts the launch after the node has
    started, and the node is left running orphaned.
    """
    needed = [plan.package] + (["rviz2"] if plan.use_rviz else [])
    for package in needed:
        try:
            package_prefix(package)
        except Exception as exc:  # noqa: BLE001 - ament raises its own PackageNotFoundError
            hint = " (install rviz2, or launch with use_rviz:=false)" if package == "rviz2" else ""
            raise LaunchConfigError(f"package {package!r} is not installed or not sourced: "
                                    f"{exc}{hint}") from exc


def plan_launch(arguments: Mapping[str, str], share_dir: str) -> LaunchPlan:
    """Validate resolved launch arguments and compute the node's configuration."""
    if "model_path" not in arguments:
        raise LaunchConfigError(
            "missing launch argument: model_path (e.g. model_path:=builtin:tiny)")

    def arg(name: str) -> str:
        if name in arguments:
            return str(arguments[name])
        default = next(a.default for a in LAUNCH_ARGUMENTS if a.name == name)
        return "" if default is None else default

    params_file = arg("params_file") or os.path.join(share_dir, "config", "assistant.yaml")
    if not os.path.isfile(params_file):
        raise LaunchConfigError(f"params_file {params_file!r} does not exist")
    overrides = node_parameter_overrides(arg("model_path"), arg("backend"), arg("device"),
                                         arg("use_sim_time"))
    namespace = validate_namespace(arg("namespace"))
    use_rviz = parse_bool(arg("use_rviz"), "use_rviz")
    rviz_config = os.path.join(share_dir, "rviz", "assistant.rviz") if use_rviz else None
    rviz_text = None
    if rviz_config is not None and namespace:
        with open(rviz_config, encoding="utf-8") as fh:
            rviz_text = rviz_config_for_namespace(fh.read(), namespace)
    return LaunchPlan(
        namespace=namespace,
        parameters=[params_file, overrides],
        remappings=image_topic_remappings(arg("image_topic"), arg("camera") or DEFAULT_CAMERA),
        use_rviz=use_rviz,
        rviz_config=rviz_config,
        rviz_config_text=rviz_text,
        use_sim_time=overrides["use_sim_time"],
    )


def validate_parameters_yaml(
    document: Any,
    expected: Mapping[str, Any] = DOCUMENTED_PARAMETERS,
    *,
    require_all: bool = True,
    node_key: str = "/**",
) -> dict[str, Any]:
    """Check a parsed parameters YAML (``{node_key: {ros__parameters: {...}}}``); return them.

    Refuses other top-level keys, unknown names (typos), missing names when ``require_all``,
    values of the wrong ROS type and values the node would refuse (the parameter schema's
    checks, llava_phi_ros/parameters.py); an integer is accepted for a double, as the node does.
    """
    if not isinstance(document, Mapping):
        raise ParameterFileError("a parameters file must be a mapping at the top level")
    if set(document) != {node_key}:
        raise ParameterFileError(
            f"expected exactly one top-level key {node_key!r}, got {sorted(map(str, document))}"
        )
    section = document[node_key]
    if not isinstance(section, Mapping) or set(section) != {"ros__parameters"}:
        raise ParameterFileError(f"{node_key!r} must hold exactly one key, 'ros__parameters'")
    params = section["ros__parameters"]
    if not isinstance(params, Mapping):
        raise ParameterFileError("ros__parameters must be a mapping of parameter names to values")
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise ParameterFileError(
            f"unknown parameter(s): {', '.join(map(str, unknown))}; "
            f"the node has: {', '.join(expected)}"
        )
    missing = [name for name in expected if name not in params]
    if require_all and missing:
        raise ParameterFileError(f"missing parameter(s): {', '.join(missing)}")
    try:
        checked = {name: parameters.check(name, value) for name, value in params.items()}
        parameters.check_together(checked)
    except parameters.ParameterError as exc:
        raise ParameterFileError(str(exc)) from exc
    return checked


def validate_rviz_config(document: Any, topic: str) -> None:
    """Check a parsed rviz config has an Image display subscribed to ``topic``."""
    try:
        displays: Sequence[Any] = document["Visualization Manager"]["Displays"]
    except (KeyError, TypeError) as exc:
        raise LaunchConfigError("not an rviz2 config: no 'Visualization Manager' Displays") from exc
    for display in displays:
        if (isinstance(display, Mapping) and display.get("Class") == "rviz_default_plugins/Image"
                and isinstance(display.get("Topic"), Mapping)
                and display["Topic"].get("Value") == topic):
            return
    raise LaunchConfigError(f"the rviz config has no Image display of {topic}")
