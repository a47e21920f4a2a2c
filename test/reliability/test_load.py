"""The load test in CI: 16 planners x 50 queries at once over real DDS (service and action
mixed) while a 1920x1080 camera streams at 30 Hz through the Fast DDS profile, against the
node's own process (load_run.py). Nothing lost or hung, nothing refused BUSY (the queue holds
every client), every answer token-identical to the same question asked alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS, QUERIES = 16, 50


def test_16_planners_x_50_queries_under_a_1080p_camera():
    done = subprocess.run([sys.executable, str(HERE / "load_run.py"), "load", "--clients",
                           str(CLIENTS), "--queries", str(QUERIES)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # p50/p99 and rates, in the test log
    assert result["queries"] == CLIENTS * QUERIES
    assert result["codes"] == {"answered": CLIENTS * QUERIES}, result["codes"]
    assert result["lost_or_hung"] == 0 and result["busy"] == 0
    assert result["mismatches"] == 0
    assert result["node_exit_code"] == 0
