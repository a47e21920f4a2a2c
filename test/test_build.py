"""Packaging tests: the pip-installed package and a colcon build both provide the Python code
and the generated interfaces (one package, ros2/rosidl_python#141 worked around in CMakeLists).

The checks run in subprocesses with the working directory outside the repository, so that the
source tree (on sys.path for the other tests) cannot shadow the built copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX = Path(sys.prefix)  # the venv the tests run in; `pip install .` installs into it

ERROR_CODES = [
    "NO_IMAGE",
    "STALE_IMAGE",
    "STAMP_OUT_OF_RANGE",
    "UNKNOWN_CAMERA",
    "BAD_IMAGE",
    "BAD_REQUEST",
    "UNKNOWN_SESSION",
    "CONTEXT_OVERFLOW",
    "BUSY",
    "TIMEOUT",
    "CANCELLED",
    "NOT_READY",
    "MODEL_ERROR",
]
REQUEST_FIELDS = {
    "request_id": "string",
    "question": "string",
    "camera": "string",
    "stamp": "builtin_interfaces/Time",
    "image": "sensor_msgs/Image",
    "choices": "sequence<string>",
    "max_new_tokens": "uint32",
    "temperature": "float",
    "top_p": "float",
    "session_id": "string",
}
RESPONSE_FIELDS = {
    "success": "boolean",
    "error_code": "string",
    "message": "string",
    "answer": "llava_phi_ros/Answer",
}
ANSWER_FIELDS = {
    "header": "std_msgs/Header",
    "request_id": "string",
    "camera": "string",
    "question": "string",
    "text": "string",
    "finish_reason": "string",
    "choices": "sequence<string>",
    "choice_logprobs": "sequence<float>",
    "choice_probs": "sequence<float>",
    "choice_index": "int32",
    "model_id": "string",
    "tokens_generated": "uint32",
    "prompt_tokens": "uint32",
    "reused_prompt_tokens": "uint32",
    "queue_ms": "float",
    "vision_ms": "float",
    "prefill_ms": "float",
    "time_to_first_token_ms": "float",
    "decode_tokens_per_s": "float",
    "total_ms": "float",
}
FEEDBACK_FIELDS = {"text": "string", "tokens_generated": "uint32"}

# Runs in a subprocess against whatever llava_phi_ros the environment provides; prints JSON.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    import llava_phi_ros
    import llava_phi_ros.model
    from llava_phi_ros.action import Ask
    from llava_phi_ros.msg import Answer
    from llava_phi_ros.srv import Query
    from rclpy.serialization import deserialize_message, serialize_message
    from ament_index_python.packages import get_package_prefix, get_package_share_directory

    req = Query.Request(question="Is the door open?", choices=["yes", "no"])
    ans = Answer(text="yes", choices=["yes", "no"], choice_probs=[0.75, 0.25], choice_index=0)
    ans2 = deserialize_message(serialize_message(ans), Answer)
    res = Query.Response(success=True, answer=ans)
    res2 = deserialize_message(serialize_message(res), Query.Response)
    print(json.dumps({
        "package_file": llava_phi_ros.__file__,
        "model_file": llava_phi_ros.model.__file__,
        "request_fields": Query.Request.get_fields_and_field_types(),
        "response_fields": Query.Response.get_fields_and_field_types(),
        "answer_fields": Answer.get_fields_and_field_types(),
        "goal_fields": Ask.Goal.get_fields_and_field_types(),
        "result_fields": Ask.Result.get_fields_and_field_types(),
        "feedback_fields": Ask.Feedback.get_fields_and_field_types(),
        "constants": {k: v for k, v in vars(Query.Request).items()
                      if k.isupper() and not k.startswith("_") and isinstance(v, str)},
        "default_temperature": req.temperature,
        "default_top_p": req.top_p,
        "default_choice_index": Answer().choice_index,
        "default_max_new_tokens": req.max_new_tokens,
        "roundtrip": [ans2.text, list(ans2.choices), list(ans2.choice_probs),
                      res2.answer.choice_index],
        "share_dir": get_package_share_directory("llava_phi_ros"),
        "package_prefix": get_package_prefix("llava_phi_ros"),
    }))
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH")
    }
    env["PATH"] = f"{PREFIX / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd, *, cwd: Path, env: dict[str, str], timeout: float = 120):
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{cmd!r} failed ({proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


def _probe(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _check_interfaces(info: dict) -> None:
    assert info["request_fields"] == REQUEST_FIELDS
    assert info["goal_fields"] == REQUEST_FIELDS
    assert info["response_fields"] == RESPONSE_FIELDS
    assert info["result_fields"] == RESPONSE_FIELDS
    assert info["answer_fields"] == ANSWER_FIELDS
    assert info["feedback_fields"] == FEEDBACK_FIELDS
    assert info["constants"] == {code: code for code in ERROR_CODES}
    assert info["default_temperature"] == -1.0
    assert info["default_top_p"] == -1.0
    assert info["default_choice_index"] == -1  # DESIGN.md: -1 when there were no choices
    assert info["default_max_new_tokens"] == 0
    assert info["roundtrip"] == ["yes", ["yes", "no"], [0.75, 0.25], 0]


def _source_files() -> list[Path]:
    """Files of the hand-written package that an install must carry (code and package data)."""
    pkg = REPO / "llava_phi_ros"
    return sorted(
        p.relative_to(pkg)
        for p in pkg.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix not in (".pyc", ".pyo")
        and not any(part.startswith(".") for part in p.relative_to(pkg).parts)
    )


# executable in lib/llava_phi_ros (what `ros2 run llava_phi_ros NAME` starts) -> its entry module
EXECUTABLES = {"assistant": "llava_phi_ros.ros.assistant_node", "llava-phi": "llava_phi_ros.cli"}


def _check_executables(lib_dir: Path, run: Callable[[list[str]], subprocess.CompletedProcess]
                       ) -> None:
    """Each executable is a script whose interpreter exists and whose entry point imports;
    `llava-phi --help` runs. `run` runs a command in the environment a user would have."""
    for name, module in EXECUTABLES.items():
        exe = lib_dir / name
        assert exe.is_file() and os.access(exe, os.X_OK), f"{exe} missing or not executable"
        text = exe.read_text()
        shebang = text.splitlines()[0]
        assert shebang.startswith("#!") and Path(shebang[2:].strip()).exists(), shebang
        assert re.search(rf"^from {re.escape(module)} import main$", text, re.M), text
        # The entry module imports with the script's own interpreter (the assistant is not run:
        # it would start a ROS node).
        run([shebang[2:].strip(), "-c", f"from {module} import main; assert callable(main)"])
    proc = run([str(lib_dir / "llava-phi"), "--help"])
    assert proc.stdout.startswith("usage: llava-phi") and "convert" in proc.stdout, proc.stdout


def test_pip_installed_package(tmp_path: Path) -> None:
    """`pip install .` (scripts/setup.sh) put code, interfaces, share/, executables in the venv."""
    site = Path(sysconfig.get_paths()["platlib"])
    installed_pkg = site / "llava_phi_ros"
    assert (installed_pkg / "srv" / "__init__.py").is_file(), (
        f"llava_phi_ros with generated interfaces is not installed in {site}: "
        "run scripts/setup.sh (or `pip install .`)"
    )

    env = _clean_env(AMENT_PREFIX_PATH=str(PREFIX))
    info = _probe(_run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env).stdout)

    assert Path(info["package_file"]).resolve() == (installed_pkg / "__init__.py").resolve()
    assert Path(info["model_file"]).resolve().is_relative_to(installed_pkg.resolve())
    _check_interfaces(info)

    share = PREFIX / "share" / "llava_phi_ros"
    assert Path(info["share_dir"]).resolve() == share.resolve()
    assert Path(info["package_prefix"]).resolve() == PREFIX.resolve()
    assert (share / "package.xml").is_file()
    assert (PREFIX / "share/ament_index/resource_index/packages/llava_phi_ros").is_file()
    for rel in ("msg/Answer.msg", "srv/Query.srv", "action/Ask.action"):
        assert (share / rel).read_text() == (REPO / rel).read_text(), (
            f"{share / rel} differs from the source (stale install? rerun scripts/setup.sh)"
        )
    missing = [str(rel) for rel in _source_files() if not (installed_pkg / rel).is_file()]
    assert not missing, f"not installed (stale install? rerun scripts/setup.sh): {missing}"

    _check_executables(PREFIX / "lib" / "llava_phi_ros",
                       lambda cmd: _run(cmd, cwd=tmp_path, env=env))
    for script in ("llava-phi", "llava-phi-assistant"):
        assert (PREFIX / "bin" / script).is_file(), f"console script {script} not installed"
    proc = _run([str(PREFIX / "bin" / "llava-phi"), "--help"], cwd=tmp_path, env=env)
    assert proc.stdout.startswith("usage: llava-phi") and "convert" in proc.stdout, proc.stdout
    assert re.search(r"^from llava_phi_ros\.ros\.assistant_node import main$",
                     (PREFIX / "bin" / "llava-phi-assistant").read_text(), re.M)
    # ament_cmake_python's egg-info must not be shipped next to the wheel's dist-info.
    assert not list(site.glob("llava_phi_ros-*.egg-info"))


_TOP_LEVEL_SKIP = {".git", ".venv", "venv", "build", "install", "log", "engines"}
_ANYWHERE_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")


def _colcon_ignore(directory: str, names: list[str]) -> set[str]:
    """What not to copy into the workspace: venvs, build outputs, engines and caches."""
    skipped = set(_ANYWHERE_SKIP(directory, names))
    if Path(directory).resolve() == REPO:
        # .venv-* too: scripts/test.sh's Jazzy job keeps its venv (5 GB) in .venv-jazzy.
        skipped |= _TOP_LEVEL_SKIP.intersection(names)
        skipped |= {name for name in names if name.startswith(".venv")}
    return skipped


@pytest.mark.colcon
def test_colcon_build(tmp_path: Path) -> None:
    """`colcon build` in a ROS workspace (here: the ros-* wheels of the venv as the underlay)."""
    colcon = PREFIX / "bin" / "colcon"
    assert colcon.is_file(), f"{colcon} not found: run scripts/setup.sh"
    assert shutil.which("cmake"), "cmake not found: run scripts/setup.sh"

    ws = tmp_path / "ws"
    shutil.copytree(REPO, ws / "src" / "llava_phi_ros", ignore=_colcon_ignore)
    env = _clean_env(AMENT_PREFIX_PATH=str(PREFIX))
    env.pop("MAKEFLAGS", None)
    cmd = [
        str(colcon),
        "--log-base", str(ws / "log"),
        "build",
        "--base-paths", str(ws / "src"),
        "--build-base", str(ws / "build"),
        "--install-base", str(ws / "install"),
        "--event-handlers", "console_direct-", "console_cohesion-", "summary+",
        "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
    ]  # fmt: skip
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    proc = subprocess.run(
        cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        logs = sorted((ws / "log").glob("latest_build/llava_phi_ros/std*.log"))
        details = "\n".join(f"--- {p.name} ---\n{p.read_text()[-6000:]}" for p in logs)
        pytest.fail(f"colcon build failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{details}")

    install = ws / "install" / "llava_phi_ros"
    installed_pkg = install / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    installed_pkg = installed_pkg / "site-packages" / "llava_phi_ros"
    missing = [str(rel) for rel in _source_files() if not (installed_pkg / rel).is_file()]
    assert not missing, f"not installed by colcon: {missing}"
    assert (install / "share/ament_index/resource_index/packages/llava_phi_ros").is_file()

    # Use the workspace as a ROS user would: source its setup file, then run or import.
    env = _clean_env(AMENT_PREFIX_PATH=str(PREFIX))
    setup = ws / "install" / "local_setup.sh"
    _check_executables(install / "lib" / "llava_phi_ros", lambda cmd: _run(
        ["bash", "-c", f'. "{setup}" && exec "$@"', "bash", *cmd], cwd=tmp_path, env=env))
    probe_file = tmp_path / "probe.py"
    probe_file.write_text(PROBE)
    script = f'. "{setup}" && exec "{sys.executable}" "{probe_file}"'
    info = _probe(_run(["bash", "-c", script], cwd=tmp_path, env=env).stdout)

    assert Path(info["package_file"]).resolve() == (installed_pkg / "__init__.py").resolve()
    assert Path(info["model_file"]).resolve().is_relative_to(installed_pkg.resolve())
    _check_interfaces(info)
    assert Path(info["share_dir"]).resolve() == (install / "share" / "llava_phi_ros").resolve()
