"""The code base stays within its linter settings (Python 3.10 target, see pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean_for_python_310():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--target-version", "py310",
                           str(REPO)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
