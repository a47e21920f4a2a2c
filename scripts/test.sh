#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, pinned requirements, `pip install .`), then run the tests.
# Extra arguments go to pytest, e.g.  scripts/test.sh -m "not colcon" -x  or  scripts/test.sh test/test_build.py
# Exits non-zero when setup or any test fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLAVA_PHI_VENV:-$ROOT/.venv}"

bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# No path arguments: pytest uses testpaths (test/) from pyproject.toml.
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
