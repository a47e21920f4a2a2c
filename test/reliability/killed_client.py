"""A planner process that sends one query and one streaming goal to NODE, prints "sent", and
then waits to be SIGKILLed mid-request (test_faults.py).

    python test/reliability/killed_client.py /ns/llava_phi MAX_NEW_TOKENS
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import rclpy  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402

import test.conftest  # noqa: E402, F401 - adds the built interfaces to llava_phi_ros.__path__
from llava_phi_ros.action import Ask  # noqa: E402
from llava_phi_ros.srv import Query  # noqa: E402

if __name__ == "__main__":
    node_name, max_new = sys.argv[1], int(sys.argv[2])
    rclpy.init()
    node = rclpy.create_node("doomed_planner")
    query = node.create_client(Query, f"{node_name}/query")
    ask = ActionClient(node, Ask, f"{node_name}/ask")
    assert query.wait_for_service(timeout_sec=60) and ask.wait_for_server(timeout_sec=60)
    query.call_async(Query.Request(question="orphaned query", max_new_tokens=max_new))
    goal = ask.send_goal_async(Ask.Goal(question="orphaned goal", max_new_tokens=max_new))
    rclpy.spin_until_future_complete(node, goal, timeout_sec=60)
    print("sent", flush=True)
    while True:
        rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(0.01)
