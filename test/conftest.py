"""Test-wide setup: hand-written code from the source tree, generated interfaces from the build.

pyproject.toml puts the repo root first on sys.path (pytest `pythonpath = ["."]`), so tests run
the source tree's llava_phi_ros, whichever way pytest is started. The source tree has no
generated interface code (llava_phi_ros.msg/.srv/.action and their C extensions): those exist
only in a built copy (`pip install .` via scripts/setup.sh, or a colcon install on PYTHONPATH).
Append that copy's directory to the package's __path__, so `from llava_phi_ros.srv import Query`
works while every hand-written module still comes from the source tree (it is searched first).
test/test_build.py checks the installed package on its own, in subprocesses outside the repo.
"""

import os
import sys

# Triton kernels run under its CPU interpreter unless the tests target a GPU (gpu_check.sh sets
# LLAVA_PHI_TEST_DEVICE=cuda); Triton reads this when a kernel is defined, so it is set first.
if not os.environ.get("LLAVA_PHI_TEST_DEVICE", "cpu").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _add_built_interfaces() -> None:
    import llava_phi_ros

    source_pkg = os.path.join(_REPO_ROOT, "llava_phi_ros")
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "llava_phi_ros")
        if os.path.realpath(candidate) == os.path.realpath(source_pkg):
            continue
        if os.path.isfile(os.path.join(candidate, "srv", "__init__.py")):
            if candidate not in llava_phi_ros.__path__:
                llava_phi_ros.__path__.append(candidate)
            return


_add_built_interfaces()
