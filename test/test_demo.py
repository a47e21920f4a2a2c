"""The README's main job: `llava-phi-demo` (node + camera + planner over DDS) exits 0 and prints
grounded answers."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path


def test_demo_prints_grounded_answers(tmp_path):
    demo = Path(sys.executable).parent / "llava-phi-demo"
    env = dict(os.environ, ROS_DOMAIN_ID=str(random.randint(101, 199)),
               ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(demo)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RANDOM weights" in proc.stderr  # the toy model says what its answers are worth
    questions = re.findall(r"^Q \((service|action)\): ", proc.stdout, re.M)
    assert questions.count("service") == 3 and questions.count("action") == 1
    grounding = re.findall(r"camera=camera frame_id=camera_optical_frame stamp=\d+\.\d{9}",
                           proc.stdout)
    assert len(grounding) == 4
    assert "streamed" in proc.stdout and "refused" not in proc.stdout
