"""bench/gpu_check.sh, dry-run on the CPU (tiny config, Triton under its interpreter): every
stage runs and writes its results, so the one GPU run it is prepared for is not spent on a
broken script. What it measures on a GPU is only measured there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu",
               GPU_CHECK_CONFIG="tiny", GPU_CHECK_PATHS="torch:fused,torch:eager")
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:]
    for stage in ("kernels", "bench", "bench-1080p"):
        assert f"== {stage}: exit 0" in summary
    assert "passed" in (tmp_path / "kernels.log").read_text()
    reports = sorted(tmp_path.glob("cpu-tiny-fp16-*.json"))
    assert len(reports) == 2 and len(list(tmp_path.glob("*.png"))) == 2
    for path in reports:
        report = json.loads(path.read_text())
        ceiling = report["ceiling"]
        assert ceiling["copy"]["bytes"] >= 2**30 and ceiling["decode_ceiling_tok_s"] > 0
        assert set(ceiling["fraction_of_ceiling"]) == set(report["backends"])
    assert "--preprocess device" in json.loads(reports[0].read_text())["command"]
    assert (tmp_path / "profile.txt").stat().st_size > 0
