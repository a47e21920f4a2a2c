#!/usr/bin/env bash
# Set up and run the tests of both CI jobs, one after the other, each in its own venv:
#   kilted  Python 3.11 + ROS 2 Kilted wheels (requirements/ci.txt) in .venv, the demo's venv
#   jazzy   Python 3.10 + ROS 2 Jazzy wheels (rclpy 7.1) with the oldest numpy and Pillow the
#           pins accept (requirements/jazzy-py310.txt) in .venv-jazzy: Humble-era Python and an
#           older rclpy
# Each job runs scripts/setup.sh (venv, pinned requirements, `pip install .`), then pytest. A job
# whose setup or tests fail does not stop the next; the exit code is non-zero if any failed.
# Extra arguments go to pytest in every job, e.g.  scripts/test.sh -m "not colcon" -x  or
# scripts/test.sh test/test_build.py
#
# Environment:
#   LLAVA_PHI_TEST_JOBS     the jobs to run, in order (default: "kilted jazzy"; e.g. "kilted")
#   LLAVA_PHI_VENV, LLAVA_PHI_PYTHON, LLAVA_PHI_REQUIREMENTS   the kilted job's (scripts/setup.sh)
#   LLAVA_PHI_JAZZY_VENV    the jazzy job's venv (default: <repo>/.venv-jazzy)
#   LLAVA_PHI_JAZZY_PYTHON  a Python 3.10 for it (default: python3.10 on PATH, else pyenv's
#                           newest 3.10.x, else apt's python3.10 where apt has one, e.g. Ubuntu
#                           22.04; Debian 12 has none: install one with pyenv, or set
#                           LLAVA_PHI_TEST_JOBS=kilted to run only the Kilted job)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${LLAVA_PHI_TEST_JOBS:-kilted jazzy}"
JAZZY_VENV="${LLAVA_PHI_JAZZY_VENV:-$ROOT/.venv-jazzy}"
START=$SECONDS

log() { echo "[test $((SECONDS - START))s] $*"; }
die() { echo "[test] ERROR: $*" >&2; exit 1; }

for job in $JOBS; do
    case "$job" in kilted|jazzy) ;; *) die "unknown job '$job' in LLAVA_PHI_TEST_JOBS (kilted, jazzy)" ;; esac
done

is_py310() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; }

# Prints a Python 3.10 interpreter, or fails. (A pyenv shim named python3.10 that is not
# enabled fails when run, so every candidate is run, not just looked up.)
find_python310() {
    if [ -n "${LLAVA_PHI_JAZZY_PYTHON:-}" ]; then
        if is_py310 "$LLAVA_PHI_JAZZY_PYTHON"; then echo "$LLAVA_PHI_JAZZY_PYTHON"; return 0; fi
        echo "[test] LLAVA_PHI_JAZZY_PYTHON=$LLAVA_PHI_JAZZY_PYTHON is not a working Python 3.10" >&2
        return 1
    fi
    if is_py310 python3.10; then command -v python3.10; return 0; fi
    local pyenv_root candidate
    pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in $(ls -d "$pyenv_root"/versions/3.10.*/bin/python3.10 2>/dev/null | sort -rV); do
        if is_py310 "$candidate"; then echo "$candidate"; return 0; fi
    done
    if [ -x "$JAZZY_VENV/bin/python" ] && is_py310 "$JAZZY_VENV/bin/python"; then
        echo "$JAZZY_VENV/bin/python"; return 0  # only used to create a venv, which exists
    fi
    if command -v apt-get >/dev/null 2>&1 \
        && apt-cache policy python3.10-venv 2>/dev/null | grep -q "Candidate: [0-9]"; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        echo "[test] apt-get install python3.10 python3.10-venv" >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            python3.10 python3.10-venv >&2 && is_py310 python3.10 && { command -v python3.10; return 0; }
    fi
    return 1
}

# Find the interpreter before any job runs, so a machine without one fails at once.
PY310=""
if [[ " $JOBS " == *" jazzy "* ]]; then
    PY310="$(find_python310)" || die "the jazzy job needs Python 3.10 and none was found (tried \
LLAVA_PHI_JAZZY_PYTHON, python3.10 on PATH, pyenv's versions/3.10.*, apt): install one (pyenv \
install 3.10; Ubuntu 22.04: apt install python3.10-venv) and set LLAVA_PHI_JAZZY_PYTHON, or run \
only the Kilted job with LLAVA_PHI_TEST_JOBS=kilted"
fi

summary=()
failed=0
for job in $JOBS; do
    if [ "$job" = kilted ]; then
        venv="${LLAVA_PHI_VENV:-$ROOT/.venv}"
        what="Python 3.11 + ROS 2 Kilted, ${LLAVA_PHI_REQUIREMENTS:-requirements/ci.txt}"
        setup=(bash "$ROOT/scripts/setup.sh")
    else
        venv="$JAZZY_VENV"
        what="Python 3.10 + ROS 2 Jazzy, requirements/jazzy-py310.txt"
        setup=(env LLAVA_PHI_VENV="$venv" LLAVA_PHI_PYTHON="$PY310"
               LLAVA_PHI_REQUIREMENTS="$ROOT/requirements/jazzy-py310.txt"
               bash "$ROOT/scripts/setup.sh")
    fi
    log "=== job $job ($what) in $venv ==="
    t0=$SECONDS
    if ! "${setup[@]}"; then
        summary+=("$job: setup FAILED after $((SECONDS - t0)) s")
        failed=1
        continue
    fi
    t1=$SECONDS
    # No path arguments: pytest uses testpaths (test/) from pyproject.toml.
    if (cd "$ROOT" && "$venv/bin/python" -m pytest -p no:cacheprovider "$@"); then
        result=passed
    else
        result="FAILED (pytest exit $?)"
        failed=1
    fi
    summary+=("$job: setup $((t1 - t0)) s, tests $((SECONDS - t1)) s: $result")
done

log "=== summary ==="
for line in "${summary[@]}"; do log "$line"; done
exit "$failed"
