"""Bursts and shutdown: every request ends, none is lost (the figures of README "Reliability").

Runs the real node (`llava-phi-assistant`, builtin:tiny) in its own process and clients here over
DDS on a private domain. For each burst size N: N separate Client objects send one query each at
the same instant (then N action clients one goal each); it counts answered, BUSY, other codes and
LOST (no response within --wait-s). Then SIGTERM while a goal streams and queries wait: the exit
time and what each client got.

    .venv/bin/python benchmarks/bench_reliability.py [--bursts 32 64 128] [--pending 4]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

os.environ["ROS_DOMAIN_ID"] = str(random.randint(101, 199))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from llava_phi_ros.action import Ask  # noqa: E402
from llava_phi_ros.ros.image_conversion import rgb_to_image_msg  # noqa: E402
from llava_phi_ros.srv import Query  # noqa: E402

QUESTION = "What colour is the square?"
SETTLE_S = float(os.environ.get("SETTLE_S", "0"))
_DEPTH = int(os.environ.get("CLIENT_DEPTH", "0"))
from rclpy.qos import QoSProfile  # noqa: E402

_Q = QoSProfile(depth=_DEPTH) if _DEPTH else None
CLIENT_QOS = {"qos_profile": _Q} if _Q else {}
ACTION_QOS = {"goal_service_qos_profile": _Q, "result_service_qos_profile": _Q, "cancel_service_qos_profile": _Q} if _Q else {}


def start_node(ns: str, pending: int, model: str = "builtin:tiny") -> subprocess.Popen:
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "llava-phi-assistant"), "--ros-args",
         "-r", f"__ns:=/{ns}", "-p", f"model_path:={model}", "-p", "max_image_age_s:=0.0",
         "-p", f"max_pending_queries:={pending}", "--log-level", "warn"],
        stderr=subprocess.PIPE if model != "builtin:tiny" else None, text=True)


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def feed_frame(node: Node, ns: str) -> None:
    """Publish a frame until a query about it succeeds."""
    pub = node.create_publisher(Image, f"/{ns}/camera/image_raw", qos_profile_sensor_data)
    client = node.create_client(Query, f"/{ns}/llava_phi/query")
    assert client.wait_for_service(timeout_sec=60), "the node did not come up"
    frame = rgb_to_image_msg(np.full((336, 336, 3), 200, np.uint8), Header(frame_id="cam"))
    last = "no response"
    for _ in range(200):
        frame.header.stamp.sec = 7
        pub.publish(frame)
        future = client.call_async(Query.Request(question=QUESTION, max_new_tokens=1))
        if wait_until(future.done, 2.0):
            if future.result().success:
                return
            last = f"{future.result().error_code}: {future.result().message}"
        time.sleep(0.05)
    raise RuntimeError(f"the node never answered about a frame ({last})")


def query_burst(node: Node, ns: str, n: int, wait_s: float) -> tuple[Counter, list[float]]:
    clients = [node.create_client(Query, f"/{ns}/llava_phi/query", **CLIENT_QOS) for _ in range(n)]
    for client in clients:
        assert client.wait_for_service(timeout_sec=60)
    time.sleep(SETTLE_S)
    starts, futures = [], []
    for client in clients:
        starts.append(time.perf_counter())
        futures.append(client.call_async(Query.Request(question=QUESTION, max_new_tokens=8)))
    wait_until(lambda: all(f.done() for f in futures), wait_s)
    counts: Counter = Counter()
    latencies = []
    for start, future in zip(starts, futures, strict=True):
        if not future.done():
            counts["LOST"] += 1
        elif future.result().success:
            counts["answered"] += 1
            latencies.append(future.result().answer.total_ms)
        else:
            counts[future.result().error_code] += 1
    return counts, latencies


def goal_burst(node: Node, ns: str, n: int, wait_s: float) -> Counter:
    clients = [ActionClient(node, Ask, f"/{ns}/llava_phi/ask", **ACTION_QOS) for _ in range(n)]
    for client in clients:
        assert client.wait_for_server(timeout_sec=60)
    time.sleep(SETTLE_S)
    sent = [c.send_goal_async(Ask.Goal(question=QUESTION, max_new_tokens=8)) for c in clients]
    wait_until(lambda: all(f.done() for f in sent), wait_s)
    counts: Counter = Counter()
    results = []
    for future in sent:
        if not future.done():
            counts["LOST (no goal response)"] += 1
        elif not future.result().accepted:
            counts["rejected"] += 1
        else:
            results.append(future.result().get_result_async())
    wait_until(lambda: all(r.done() for r in results), wait_s)
    for result in results:
        if not result.done():
            counts["LOST (no result)"] += 1
        else:
            done = result.result()
            counts["succeeded" if done.result.success else
                   f"status {done.status} {done.result.error_code}"] += 1
    return counts


def shutdown_run(node: Node, pending: int, wait_s: float) -> None:
    ns = "bench_shutdown"
    proc = start_node(ns, pending, "builtin:random-tiny")  # random weights: answers run long
    try:
        feed_frame(node, ns)
        action = ActionClient(node, Ask, f"/{ns}/llava_phi/ask")
        assert action.wait_for_server(timeout_sec=60)
        feedback: list = []
        sent = action.send_goal_async(Ask.Goal(question="Describe the scene.",
                                               max_new_tokens=600),
                                      feedback_callback=feedback.append)
        wait_until(sent.done, wait_s)
        result = sent.result().get_result_async()
        wait_until(lambda: feedback, wait_s)
        client = node.create_client(Query, f"/{ns}/llava_phi/query")
        assert client.wait_for_service(timeout_sec=60)
        queued = [client.call_async(Query.Request(question=QUESTION, max_new_tokens=400))
                  for _ in range(pending)]
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        exit_s = time.monotonic() - start
        wait_until(lambda: result.done() and all(f.done() for f in queued), wait_s)
        codes = Counter(f.result().error_code if f.done() else "LOST" for f in queued)
        goal = (f"{result.result().result.error_code} after "
                f"{result.result().result.answer.tokens_generated} tokens"
                if result.done() else "LOST")
        print(f"SIGTERM with a streaming goal and {pending} queued queries: exit code "
              f"{proc.returncode} after {exit_s:.2f} s; goal {goal}; queries {dict(codes)}; "
              f"traceback in stderr: {'Traceback' in stderr}")
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--pending", type=int, default=4, help="max_pending_queries")
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args()
    rclpy.init()
    node = Node("bench_reliability")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    procs = []
    try:
        print(f"builtin:tiny, max_pending_queries {args.pending}, node and clients in separate "
              f"processes, {os.cpu_count()} CPUs")
        for pending in sorted({args.pending, max(args.bursts)}):
            ns = f"bench_q{pending}"
            procs.append(start_node(ns, pending))
            feed_frame(node, ns)
            for n in args.bursts:
                if pending < args.pending:
                    continue
                counts, lat = query_burst(node, ns, n, args.wait_s)
                p = np.percentile(lat, [50, 99]) if lat else [0, 0]
                print(f"queue {pending:4d}: {n:4d} queries at once -> {dict(counts)}; answered "
                      f"total_ms p50 {p[0]:.0f} p99 {p[1]:.0f}")
                print(f"queue {pending:4d}: {n:4d} goals at once   -> "
                      f"{dict(goal_burst(node, ns, n, args.wait_s))}")
        shutdown_run(node, args.pending, args.wait_s)
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        executor.shutdown()
        spinner.join(timeout=10)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
