"""The README's main job: `llava-phi-demo` (node + camera + planner over DDS) exits 0 and prints
grounded answers, each next to the truth of the frame its stamp names."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from llava_phi_ros.model import builtin
from llava_phi_ros.ros.demo import QUESTIONS, demo_scene
from llava_phi_ros.training.scenes import PALETTE


def test_demo_prints_grounded_answers_checked_against_the_frame(tmp_path):
    demo = Path(sys.executable).parent / "llava-phi-demo"
    env = dict(os.environ, ROS_DOMAIN_ID=str(random.randint(101, 199)),
               ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(demo)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    questions = re.findall(r"^Q \((service|action)\): ", proc.stdout, re.M)
    assert questions.count("service") == len(QUESTIONS) and questions.count("action") == 1
    grounding = re.findall(r"camera=camera frame_id=camera_optical_frame stamp=\d+\.\d{9}",
                           proc.stdout)
    assert len(grounding) == 4
    assert "streamed" in proc.stdout and "refused" not in proc.stdout
    verdicts = re.findall(r"ground truth at that stamp: '[^']+' -> (correct|WRONG)", proc.stdout)
    assert len(verdicts) == 4, proc.stdout  # every answer's stamp names a published frame
    if builtin.BUILTIN_TINY_DIR is None:
        assert "RANDOM weights" in proc.stderr  # the toy model says what its answers are worth
    else:  # the trained toy model answers the demo's scenes right
        assert "toy LLaVA-Phi" in proc.stderr
        assert verdicts == ["correct"] * 4, proc.stdout


def test_demo_scenes_are_what_they_say():
    for index in range(4):
        scene = demo_scene(index)
        assert scene.image.shape == (480, 640, 3) and scene.image.dtype == np.uint8
        left, right = scene.answers["square"], scene.answers["circle"]
        assert left != right and scene.answers["count"] == "two"
        assert scene.description == (f"A {left} square on the left and a {right} circle on "
                                     "the right.")
        assert tuple(scene.image[240, 133]) == PALETTE[left]  # inside the square
        assert tuple(scene.image[240, 133 + 2 * 640 // 3]) == PALETTE[right]  # the circle
        assert tuple(scene.image[20, 320]) == (205, 205, 205)  # background
    assert demo_scene(0).answers != demo_scene(1).answers
