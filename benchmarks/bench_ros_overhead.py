"""ROS overhead per query: service round trip minus the node's own time (Answer.total_ms).

Runs the real node (`llava-phi-assistant`, builtin:tiny) in its own process and a client here,
over DDS on a private domain. total_ms runs from the node accepting the request to the answer, so
round trip - total_ms is what ROS adds: (de)serialisation, DDS transport, executor scheduling and
the async bridge between the worker thread and the service callback.

    .venv/bin/python benchmarks/bench_ros_overhead.py [--queries 100]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

os.environ["ROS_DOMAIN_ID"] = str(random.randint(101, 199))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from llava_phi_ros.ros.image_conversion import rgb_to_image_msg  # noqa: E402
from llava_phi_ros.srv import Query  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    node_proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "llava-phi-assistant"), "--ros-args",
         "-p", "model_path:=builtin:tiny", "-p", "max_image_age_s:=0.0",
         "--log-level", "warn"])
    rclpy.init()
    client_node = Node("bench_client")
    try:
        client = client_node.create_client(Query, "llava_phi/query")
        if not client.wait_for_service(timeout_sec=60):
            print("the node did not come up", file=sys.stderr)
            return 1
        pub = client_node.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        frame = rgb_to_image_msg(np.zeros((480, 640, 3), np.uint8),
                                 Header(frame_id="camera_optical_frame"))

        def call(req: Query.Request) -> tuple[float, Query.Response]:
            start = time.perf_counter()
            future = client.call_async(req)
            rclpy.spin_until_future_complete(client_node, future, timeout_sec=60)
            return (time.perf_counter() - start) * 1000, future.result()

        request = Query.Request(question="What is in front of the robot?", max_new_tokens=1)
        for _ in range(100):  # until a frame is buffered
            frame.header.stamp = client_node.get_clock().now().to_msg()
            pub.publish(frame)
            rclpy.spin_once(client_node, timeout_sec=0.05)
            if call(request)[1].success:
                break
        for _ in range(10):  # warm-up
            call(request)
        rows = []
        for _ in range(args.queries):
            rtt, response = call(request)
            assert response.success, response.message
            rows.append((rtt, response.answer.total_ms))
        rtts = [r for r, _ in rows]
        overhead = sorted(r - m for r, m in rows)
        print(f"ROS overhead per query, {args.queries} service calls, builtin:tiny, "
              f"640x480 frame, node and client in separate processes, {os.cpu_count()} CPUs")
        print(f"round trip ms     median {statistics.median(rtts):7.2f}  "
              f"p95 {np.percentile(rtts, 95):7.2f}")
        print(f"node total_ms     median {statistics.median(m for _, m in rows):7.2f}")
        print(f"overhead ms       median {statistics.median(overhead):7.2f}  "
              f"p95 {np.percentile(overhead, 95):7.2f}  (target < 2 ms)")
        return 0
    finally:
        client_node.destroy_node()
        rclpy.try_shutdown()
        node_proc.terminate()
        node_proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
