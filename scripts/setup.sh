#!/usr/bin/env bash
# Set up the development / CI environment: system build tools, .venv in the repo root with the
# pinned requirements (requirements/ci.txt: torch CPU, transformers, ROS 2 Kilted wheels, ...),
# and this package installed into it (`pip install .`: generates the msg/srv/action code).
#
# For x86_64 Debian/Ubuntu with Python 3.10-3.12 and no ROS installed. Idempotent: a rerun skips
# what is already there (requirements are reinstalled only when the requirements file changes)
# and always reinstalls the package itself, incrementally (build/<wheel tag>/ keeps the CMake
# build, so a cp310 and a cp311 venv of the same checkout do not share one).
#
# Environment:
#   LLAVA_PHI_VENV          venv location (default: <repo>/.venv)
#   LLAVA_PHI_PYTHON        interpreter to create the venv with (default: python3.11, else python3)
#   LLAVA_PHI_REQUIREMENTS  pinned requirements file (default: <repo>/requirements/ci.txt, Python
#                           3.11 + Kilted; scripts/test.sh's second job passes
#                           requirements/jazzy-py310.txt with a Python 3.10 interpreter). It must
#                           pin torch and hold the build requirements (rosidl, ament, ...): the
#                           package is built without isolation, from this venv.
#   TORCH_INDEX_URL         extra pip index for torch (e.g. https://download.pytorch.org/whl/cpu);
#                           without it pip's configured indexes are used.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLAVA_PHI_VENV:-$ROOT/.venv}"
REQS="${LLAVA_PHI_REQUIREMENTS:-$ROOT/requirements/ci.txt}"
# A relative path is taken from the current directory, else from the repository root.
[ -f "$REQS" ] || [ ! -f "$ROOT/$REQS" ] || REQS="$ROOT/$REQS"
[ -f "$REQS" ] || { echo "[setup] ERROR: requirements file $REQS not found" >&2; exit 1; }
REQS="$(cd "$(dirname "$REQS")" && pwd)/$(basename "$REQS")"
STAMP="$VENV/.llava_phi_ros-requirements.sha256"
START=$SECONDS

log() { echo "[setup $((SECONDS - START))s] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

cd "$ROOT"

# --- 1. System packages (skipped when the tools are already there) ----------------------------
if [ -n "${LLAVA_PHI_PYTHON:-}" ]; then
    PY="$LLAVA_PHI_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
    PY=python3.11
else
    PY=python3
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PY" >/dev/null 2>&1 || missing+=(python3)
    # Debian's python3 lacks ensurepip (needed by `python -m venv`) without python3-venv.
    "$PY" -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}: run as root or install sudo"
        SUDO=sudo
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "system tools present (cmake, g++, ninja)"
fi

# --- 2. The virtual environment ------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    log "removing broken venv $VENV"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' \
        || die "$PY is Python $("$PY" -c 'import sys; print(sys.version.split()[0])'); the ROS 2 wheels need 3.10-3.12"
    log "creating venv $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PY" -m venv "$VENV"
else
    log "venv $VENV exists ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# The pip a new venv starts with (23.x on Python 3.11) is old and noisy; any recent one will do.
if ! "$VENV/bin/python" -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 24)'; then
    log "upgrading pip"
    "${PIP[@]}" install -q "pip>=24"
fi

# --- 3. Pinned requirements (torch first, alone) -------------------------------------------------
want="$( (cat "$REQS"; "$VENV/bin/python" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    log "requirements up to date ($(basename "$REQS") unchanged)"
else
    torch_pin="$(grep -E '^torch==' "$REQS")" || die "no torch== pin in $REQS"
    torch_args=()
    [ -n "${TORCH_INDEX_URL:-}" ] && torch_args=(--extra-index-url "$TORCH_INDEX_URL")
    # torch alone and pinned, so that no other requirement can pull a multi-GB CUDA build.
    log "pip install $torch_pin"
    "${PIP[@]}" install -q "${torch_args[@]}" "$torch_pin"
    log "pip install -r ${REQS#"$ROOT"/}"
    "${PIP[@]}" install -q -r "$REQS"
    echo "$want" > "$STAMP"
fi

# --- 4. This package (always: the source may have changed) -------------------------------------
# The build requirements are in the venv (the requirements file), so build without isolation and
# keep the CMake build dir: a rerun takes seconds instead of ~30 s. A stale or foreign build dir
# (moved checkout, other interpreter) is removed and the build retried once.
install_pkg() {
    "${PIP[@]}" install -q --no-deps --no-build-isolation \
        -C "build-dir=build/{wheel_tag}" "$ROOT"
}
log "pip install . (no deps, no build isolation, build dir build/<wheel tag>)"
if ! install_pkg; then
    # Only this interpreter's build dir (build/cpXY-cpXY-<platform>): another venv's stays.
    tag="$("$VENV/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
    log "retrying with a clean build directory (build/$tag-*)"
    rm -rf "$ROOT"/build/"$tag"-*
    install_pkg
fi
log "done: $("$VENV/bin/python" -c 'import sys; print(sys.prefix)')"
