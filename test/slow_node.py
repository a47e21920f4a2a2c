"""The node's own `main()` as a separate process, its model wrapped in the SlowModel double.

    python test/slow_node.py TOKEN_DELAY_S --ros-args -r __ns:=/x -p model_path:=builtin:random-tiny

The shutdown tests signal this process. It runs the source tree's code with the built interfaces,
as the tests do (test/conftest.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test.conftest  # noqa: E402, F401 - adds the built interfaces to llava_phi_ros.__path__
from llava_phi_ros.pipeline import VisionLanguageModel  # noqa: E402
from llava_phi_ros.ros.assistant_node import main  # noqa: E402
from test.doubles import SlowModel  # noqa: E402


def slow_loader(values: dict) -> SlowModel:
    return SlowModel(VisionLanguageModel.load(values["model_path"]), float(sys.argv[1]))


if __name__ == "__main__":
    main(sys.argv[2:], model_loader=slow_loader)
