"""Launch logic, parameters YAML and rviz config: pure Python, no `launch` package needed."""

import ast
import copy
from pathlib import Path

import pytest
import yaml

from llava_phi_ros import parameters
from llava_phi_ros.ros.launch_support import (
    DOCUMENTED_PARAMETERS,
    LAUNCH_ARGUMENTS,
    LaunchConfigError,
    ParameterFileError,
    check_launch_executables,
    debug_image_topic,
    image_topic_remappings,
    node_parameter_overrides,
    parse_bool,
    plan_launch,
    rviz_config_for_namespace,
    validate_namespace,
    validate_parameters_yaml,
    validate_rviz_config,
    validate_topic_name,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "config" / "assistant.yaml"
RVIZ = REPO / "rviz" / "assistant.rviz"
LAUNCH_FILE = REPO / "launch" / "assistant.launch.py"


def _shipped_params() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


# ----- config/assistant.yaml ------------------------------------------------------------------
def test_shipped_yaml_has_exactly_the_documented_parameters_with_their_defaults():
    doc = _shipped_params()
    assert list(doc) == ["/**"] and list(doc["/**"]) == ["ros__parameters"]
    params = validate_parameters_yaml(doc)
    assert params == DOCUMENTED_PARAMETERS == parameters.DEFAULTS
    # Doubles are written as doubles (2.0, not 2), so `ros2 param` tools see the declared type.
    for name, value in doc["/**"]["ros__parameters"].items():
        assert type(value) is type(DOCUMENTED_PARAMETERS[name]), name


def test_shipped_yaml_is_what_the_schema_generates():
    assert PARAMS_YAML.read_text() == parameters.params_yaml(), (
        "regenerate it: python -m llava_phi_ros.parameters --yaml > config/assistant.yaml")


def test_config_readme_table_is_what_the_schema_generates():
    readme = (REPO / "config" / "README.md").read_text()
    assert parameters.markdown_table() in readme, (
        "regenerate the table: python -m llava_phi_ros.parameters")


def test_shipped_yaml_comments_every_parameter():
    lines = PARAMS_YAML.read_text().splitlines()
    for name in DOCUMENTED_PARAMETERS:
        (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
        line = lines[index]
        assert "#" in line or lines[index - 1].strip().startswith("#"), name


def test_shipped_yaml_values_pass_the_core_validation():
    core = pytest.importorskip("llava_phi_ros.assistant")
    params = validate_parameters_yaml(_shipped_params())
    fields = {f for f in core.AssistantSettings.__dataclass_fields__}
    settings = core.AssistantSettings(**{k: v for k, v in params.items() if k in fields})
    settings.validate()


def test_every_core_setting_is_a_schema_parameter():
    core = pytest.importorskip("llava_phi_ros.assistant")
    fields = set(core.AssistantSettings.__dataclass_fields__)
    assert fields <= set(parameters.SPECS), fields - set(parameters.SPECS)
    assert core.AssistantSettings().max_new_tokens == parameters.DEFAULTS["max_new_tokens"]


def test_an_integer_is_accepted_for_a_double_as_the_node_accepts_it():
    doc = copy.deepcopy(_shipped_params())
    doc["/**"]["ros__parameters"]["max_image_age_s"] = 2
    got = validate_parameters_yaml(doc)["max_image_age_s"]
    assert got == 2.0 and isinstance(got, float)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.update(max_image_age_s="2"), "max_image_age_s: expected a double, got '2'"),
    (lambda p: p.update(max_new_tokens=64.0), "max_new_tokens: expected an integer"),
    (lambda p: p.update(max_new_tokens=2**63 - 1), r"max_new_tokens must be in \[1, 8192\]"),
    (lambda p: p.update(qos_reliable="false"), "qos_reliable: expected a bool"),
    (lambda p: p.update(cameras="camera"), "cameras: expected a string array"),
    (lambda p: p.update(cameras=["a", 3]), "cameras: expected a string array"),
    (lambda p: p.update(cameras=[]), "cameras must be a non-empty list"),
    (lambda p: p.update(cameras=["a", "a"]), "unique"),
    (lambda p: p.update(cameras=["/abs"]), "relative"),
    (lambda p: p.update(cameras=["1cam"]), "not a valid relative ROS name"),
    (lambda p: p.update(backend="tensorflow"), "backend must be torch | onnxruntime | tensorrt"),
    (lambda p: p.update(image_transport="theora"), "image_transport must be raw | compressed"),
    (lambda p: p.update(dtype="int8"), "dtype must be"),
    (lambda p: p.update(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda p: p.update(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda p: p.update(temperature=-1.0), r"temperature must be in \[0, 100\]"),
    (lambda p: p.update(frame_buffer_s=0.0), r"frame_buffer_s must be in \(0, 3600\]"),
    (lambda p: p.update(query_timeout_s=float("inf")), "finite"),
    (lambda p: p.update(max_sessions=0), r"max_sessions must be in \[1, 10000\]"),
    (lambda p: p.update(max_pending_queries=-1), r"max_pending_queries must be in \[0, 4096\]"),
    (lambda p: p.update(max_pending_queries=300), "must be below request_queue_depth"),
    (lambda p: p.update(device="gpu0"), "device must be cpu, cuda, cuda:N or mps"),
    (lambda p: p.update(max_new_token=64), "unknown parameter.*max_new_token"),
    (lambda p: p.update(test_only_token_delay_s=0.1), "unknown parameter.*test_only"),
    (lambda p: p.pop("autostart"), "missing parameter.*autostart"),
])
def test_bad_parameter_files_are_refused_with_the_reason(mutate, match):
    doc = copy.deepcopy(_shipped_params())
    mutate(doc["/**"]["ros__parameters"])
    with pytest.raises(ParameterFileError, match=match):
        validate_parameters_yaml(doc)


def test_partial_parameter_files_and_layout_errors():
    assert validate_parameters_yaml({"/**": {"ros__parameters": {"device": "cuda"}}},
                                    require_all=False) == {"device": "cuda"}
    for doc, match in [
        ([], "mapping at the top level"),
        ({"llava_phi": {"ros__parameters": {}}}, "top-level key '/\\*\\*'"),
        ({"/**": {"parameters": {}}}, "ros__parameters"),
        ({"/**": {"ros__parameters": ["a"]}}, "mapping of parameter names"),
    ]:
        with pytest.raises(ParameterFileError, match=match):
            validate_parameters_yaml(doc)
    assert issubclass(ParameterFileError, ValueError)


# ----- launch arguments -----------------------------------------------------------------------
def test_every_launch_argument_has_a_description_and_model_path_is_required():
    names = [a.name for a in LAUNCH_ARGUMENTS]
    assert len(names) == len(set(names))
    for required in ("model_path", "backend", "device", "params_file", "namespace",
                     "use_sim_time", "use_rviz", "image_topic"):
        assert required in names
    for arg in LAUNCH_ARGUMENTS:
        assert len(arg.description) > 20, arg.name
    defaults = {a.name: a.default for a in LAUNCH_ARGUMENTS}
    assert defaults["model_path"] is None
    assert (defaults["backend"], defaults["device"], defaults["use_sim_time"],
            defaults["use_rviz"], defaults["namespace"]) == ("torch", "cpu", "false", "false", "")


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True),
                                        ("yes", True), ("false", False), ("FALSE", False),
                                        ("0", False), ("off", False), (True, True)])
def test_parse_bool(text, value):
    assert parse_bool(text, "use_rviz") is value


def test_parse_bool_refuses_other_text():
    with pytest.raises(LaunchConfigError, match="use_rviz must be true or false, got 'ture'"):
        parse_bool("ture", "use_rviz")


def test_image_topic_remappings():
    assert image_topic_remappings("") == []
    assert image_topic_remappings("/front/color/image_raw") == [
        ("camera/image_raw", "/front/color/image_raw"),
        ("camera/image_raw/compressed", "/front/color/image_raw/compressed"),
    ]
    assert image_topic_remappings("usb_cam/image_raw", "wrist") == [
        ("wrist/image_raw", "usb_cam/image_raw"),
        ("wrist/image_raw/compressed", "usb_cam/image_raw/compressed"),
    ]
    for bad in ("/front//image", "/front/image/", "front image", "/1front"):
        with pytest.raises(LaunchConfigError, match="image_topic"):
            image_topic_remappings(bad)
    with pytest.raises(LaunchConfigError, match="relative"):
        image_topic_remappings("/x", "/camera")


def test_topic_and_namespace_validation():
    assert validate_topic_name("/a/b_1") == "/a/b_1"
    assert validate_topic_name("~/debug", allow_private=True) == "~/debug"
    with pytest.raises(LaunchConfigError):
        validate_topic_name("~/debug")
    assert validate_namespace("") == "" and validate_namespace("/") == ""
    assert validate_namespace("robot1") == "/robot1"
    assert validate_namespace("/robot1/arm") == "/robot1/arm"
    with pytest.raises(LaunchConfigError, match="namespace"):
        validate_namespace("robot-1")


def test_node_parameter_overrides():
    assert node_parameter_overrides("builtin:tiny", "torch", "cpu", "false") == {
        "model_path": "builtin:tiny", "backend": "torch", "device": "cpu", "use_sim_time": False}
    assert node_parameter_overrides(" /m ", "tensorrt", "cuda:0", "true")["use_sim_time"] is True
    with pytest.raises(LaunchConfigError, match="model_path is required.*builtin:tiny"):
        node_parameter_overrides("", "torch", "cpu", "false")
    with pytest.raises(LaunchConfigError, match="backend must be torch | onnxruntime"):
        node_parameter_overrides("m", "tf", "cpu", "false")
    with pytest.raises(LaunchConfigError, match="device must be cpu, cuda, cuda:N or mps"):
        node_parameter_overrides("m", "torch", " ", "false")
    with pytest.raises(LaunchConfigError, match="device must be"):
        node_parameter_overrides("m", "torch", "gpu", "false")
    with pytest.raises(LaunchConfigError, match="use_sim_time"):
        node_parameter_overrides("m", "torch", "cpu", "maybe")


def _share(tmp_path: Path) -> Path:
    """A fake install share dir with the shipped config and rviz files."""
    (tmp_path / "config").mkdir()
    (tmp_path / "rviz").mkdir()
    (tmp_path / "config" / "assistant.yaml").write_text(PARAMS_YAML.read_text())
    (tmp_path / "rviz" / "assistant.rviz").write_text(RVIZ.read_text())
    return tmp_path


def test_plan_launch_defaults(tmp_path):
    share = _share(tmp_path)
    plan = plan_launch({"model_path": "builtin:tiny"}, str(share))
    assert plan.namespace == "" and plan.remappings == [] and plan.use_rviz is False
    assert plan.parameters == [
        str(share / "config" / "assistant.yaml"),
        {"model_path": "builtin:tiny", "backend": "torch", "device": "cpu",
         "use_sim_time": False},
    ]
    assert (plan.package, plan.executable, plan.node_name) == ("llava_phi_ros", "assistant",
                                                               "llava_phi")
    assert plan.rviz_config is None


def test_plan_launch_everything_set(tmp_path):
    share = _share(tmp_path)
    custom = tmp_path / "mine.yaml"
    custom.write_text("/**:\n  ros__parameters:\n    device: cuda\n")
    plan = plan_launch({
        "model_path": "/models/llava-phi", "backend": "onnxruntime", "device": "cuda:1",
        "params_file": str(custom), "namespace": "robot1", "use_sim_time": "true",
        "use_rviz": "true", "image_topic": "/front/image_raw", "camera": "camera",
    }, str(share))
    assert plan.namespace == "/robot1"
    assert plan.parameters[0] == str(custom)
    assert plan.parameters[1]["device"] == "cuda:1" and plan.parameters[1]["use_sim_time"]
    assert plan.remappings[0] == ("camera/image_raw", "/front/image_raw")
    assert plan.use_rviz and plan.use_sim_time
    assert plan.rviz_config == str(share / "rviz" / "assistant.rviz")
    doc = yaml.safe_load(plan.rviz_config_text)
    validate_rviz_config(doc, "/robot1/llava_phi/debug_image")


def test_plan_launch_errors(tmp_path):
    share = _share(tmp_path)
    with pytest.raises(LaunchConfigError, match="model_path"):
        plan_launch({}, str(share))
    with pytest.raises(LaunchConfigError, match="model_path is required"):
        plan_launch({"model_path": ""}, str(share))
    with pytest.raises(LaunchConfigError, match="params_file .* does not exist"):
        plan_launch({"model_path": "m", "params_file": str(tmp_path / "nope.yaml")}, str(share))
    with pytest.raises(LaunchConfigError, match="use_rviz"):
        plan_launch({"model_path": "m", "use_rviz": "sure"}, str(share))


def test_missing_rviz2_is_refused_before_anything_starts(tmp_path):
    share = _share(tmp_path)

    def prefix(package: str) -> str:
        if package == "rviz2":
            raise KeyError("package 'rviz2' not found")  # ament's PackageNotFoundError is one
        return "/opt/ros/humble"

    with_rviz = plan_launch({"model_path": "m", "use_rviz": "true"}, str(share))
    with pytest.raises(LaunchConfigError, match="rviz2.*use_rviz:=false"):
        check_launch_executables(with_rviz, prefix)
    check_launch_executables(plan_launch({"model_path": "m"}, str(share)), prefix)  # no rviz


# ----- rviz ----------------------------------------------------------------------------------
def test_rviz_config_parses_and_shows_the_debug_image_reliably():
    doc = yaml.safe_load(RVIZ.read_text())
    validate_rviz_config(doc, "/llava_phi/debug_image")
    (display,) = [d for d in doc["Visualization Manager"]["Displays"]
                  if d["Class"] == "rviz_default_plugins/Image"]
    assert display["Topic"]["Reliability Policy"] == "Reliable"
    assert display["Topic"]["Depth"] == 1
    assert doc["Visualization Manager"]["Global Options"]["Fixed Frame"]
    with pytest.raises(LaunchConfigError, match="no Image display"):
        validate_rviz_config(doc, "/other/debug_image")
    with pytest.raises(LaunchConfigError, match="not an rviz2 config"):
        validate_rviz_config({}, "/llava_phi/debug_image")


def test_rviz_config_for_namespace():
    text = RVIZ.read_text()
    assert debug_image_topic("") == "/llava_phi/debug_image"
    assert debug_image_topic("r1") == "/r1/llava_phi/debug_image"
    assert rviz_config_for_namespace(text, "") == text
    moved = rviz_config_for_namespace(text, "/r1")
    assert "/r1/llava_phi/debug_image" in moved
    with pytest.raises(LaunchConfigError, match="does not show"):
        rviz_config_for_namespace("Panels: []", "/r1")


# ----- the launch file stays thin and standard ----------------------------------------------
def test_launch_file_is_thin_and_uses_launch_support():
    source = LAUNCH_FILE.read_text()
    tree = ast.parse(source)  # valid Python without importing `launch`
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    assert "plan_launch" in source and "LAUNCH_ARGUMENTS" in source
    assert "LifecycleNode(" in source and "OpaqueFunction(" in source
    assert "FindPackageShare" in source and "PathJoinSubstitution" in source
    # the executables are checked before any action is returned (nothing starts otherwise)
    assert source.index("check_launch_executables(plan") < source.index("actions = [")
    assert len(source.splitlines()) < 90


# ----- Fast DDS profile -------------------------------------------------------------------------
def test_fastdds_profile_is_a_default_profile_with_large_shm_and_udp():
    import xml.etree.ElementTree as ET

    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(REPO / "config" / "fastdds_large_images.xml").getroot()
    assert root.tag == "{http://www.eprosima.com}dds"
    transports = {t.findtext("d:transport_id", namespaces=ns): t
                  for t in root.iterfind("d:profiles/d:transport_descriptors/"
                                         "d:transport_descriptor", ns)}
    types = {tid: t.findtext("d:type", namespaces=ns) for tid, t in transports.items()}
    assert sorted(types.values()) == ["SHM", "UDPv4"]
    (shm,) = [t for t in transports.values() if t.findtext("d:type", namespaces=ns) == "SHM"]
    assert int(shm.findtext("d:segment_size", namespaces=ns)) == 32 * 1024 * 1024
    (participant,) = root.iterfind("d:profiles/d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.findtext("d:rtps/d:useBuiltinTransports", namespaces=ns) == "false"
    used = [e.text for e in participant.iterfind("d:rtps/d:userTransports/d:transport_id", ns)]
    assert sorted(used) == sorted(transports)


def test_config_readme_documents_both_files_and_the_camera_driver():
    text = (REPO / "config" / "README.md").read_text()
    for needle in ("assistant.yaml", "fastdds_large_images.xml", "FASTDDS_DEFAULT_PROFILES_FILE",
                   "camera driver", "/**"):
        assert needle in text, needle


def test_backend_and_dtype_names_have_one_source():
    from llava_phi_ros import backends, cli

    assert cli.BACKENDS is backends.BACKENDS
    assert parameters.SPECS["backend"].choices is backends.BACKENDS
    assert parameters.SPECS["dtype"].choices is backends.DTYPE_NAMES
