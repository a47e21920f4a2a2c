"""The node's own `main()` as a separate process, its model wrapped in the SlowModel double.

    python test/slow_node.py TOKEN_DELAY_S [LOAD_DELAY_S] --ros-args -r __ns:=/x -p ...

TOKEN_DELAY_S slows every generated token; LOAD_DELAY_S (default 0) holds the model load that
long first, as a Jetson's 30-60 s load would. The shutdown tests signal this process. It runs the
source tree's code with the built interfaces, as the tests do (test/conftest.py).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test.conftest  # noqa: E402, F401 - adds the built interfaces to llava_phi_ros.__path__
from llava_phi_ros.pipeline import VisionLanguageModel  # noqa: E402
from llava_phi_ros.ros.assistant_node import main  # noqa: E402
from test.doubles import SlowModel  # noqa: E402

ROS_ARGS = sys.argv.index("--ros-args") if "--ros-args" in sys.argv else len(sys.argv)
TOKEN_DELAY_S, LOAD_DELAY_S = (list(map(float, sys.argv[1:ROS_ARGS])) + [0.0, 0.0])[:2]


def slow_loader(values: dict) -> SlowModel:
    time.sleep(LOAD_DELAY_S)
    return SlowModel(VisionLanguageModel.load(values["model_path"]), TOKEN_DELAY_S)


if __name__ == "__main__":
    main(sys.argv[ROS_ARGS:], model_loader=slow_loader)
