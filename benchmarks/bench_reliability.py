"""Bursts and shutdown: every request ends, none is lost (the figures of README "Reliability").

Runs the real node (`llava-phi-assistant`, builtin:tiny) in its own process and clients here over
DDS on a private domain. For each burst size N: N separate Client objects send one query each at
the same instant (then N action clients one goal each); it counts answered, BUSY, other codes and
LOST (no response within --wait-s). Then SIGTERM while a goal streams and queries wait: the exit
time and what each client got.

    .venv/bin/python benchmarks/bench_reliability.py [--bursts 32 64 128] [--pending 4]
        [--client-depth 0]
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
from collections.abc import Callable
from typing import Any

os.environ["ROS_DOMAIN_ID"] = str(random.randint(101, 199))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from llava_phi_ros.action import Ask  # noqa: E402
from llava_phi_ros.ros.image_conversion import rgb_to_image_msg  # noqa: E402
from llava_phi_ros.srv import Query  # noqa: E402

QUESTION = "What colour is the square?"


def wait_until(predicate: Callable[[], Any], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


class Clients:
    """Makes clients on the executor's thread: rclpy's ActionClient registers itself with the
    node before it is initialised, so one made while another thread spins can kill the executor.
    depth > 0 gives each client a response queue of that depth (rclpy's default is 10)."""

    def __init__(self, node: Node, executor: SingleThreadedExecutor, depth: int):
        self.node, self.executor = node, executor
        qos = QoSProfile(depth=depth) if depth else None
        self.service_qos = {"qos_profile": qos} if qos else {}
        self.action_qos = ({f"{kind}_service_qos_profile": qos
                            for kind in ("goal", "result", "cancel")} if qos else {})

    def _on_executor(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        task = self.executor.create_task(fn, *args, **kwargs)
        if not wait_until(task.done, 30):
            raise RuntimeError("the executor thread does not run tasks")
        return task.result()

    def service(self, name: str) -> Any:
        client = self._on_executor(self.node.create_client, Query, name, **self.service_qos)
        assert client.wait_for_service(timeout_sec=60), f"{name} did not come up"
        return client

    def action(self, name: str) -> Any:
        client = self._on_executor(ActionClient, self.node, Ask, name, **self.action_qos)
        assert client.wait_for_server(timeout_sec=60), f"{name} did not come up"
        return client


class NodeCounters:
    """The node's own count of requests it answered or refused, from /diagnostics (1 Hz)."""

    def __init__(self, node: Node):
        self.latest: dict[str, dict[str, str]] = {}
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": queries"):
                self.latest[status.hardware_id] = {kv.key: kv.value for kv in status.values}

    def handled(self, ns: str) -> int:
        """Answers plus refusals so far, as of a diagnostics message newer than this call."""
        self.latest.pop(f"/{ns}/llava_phi", None)
        wait_until(lambda: f"/{ns}/llava_phi" in self.latest, 10)
        values = self.latest[f"/{ns}/llava_phi"]
        return int(values["answers"]) + sum(int(v) for k, v in values.items()
                                            if k.startswith("errors_"))


def start_node(ns: str, pending: int, model: str = "builtin:tiny") -> subprocess.Popen:
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "llava-phi-assistant"), "--ros-args",
         "-r", f"__ns:=/{ns}", "-p", f"model_path:={model}", "-p", "max_image_age_s:=0.0",
         "-p", f"max_pending_queries:={pending}", "--log-level", "warn"],
        stderr=subprocess.PIPE, text=True)


def feed_frame(make: Clients, ns: str) -> None:
    """Publish a frame until a query about it succeeds."""
    pub = make.node.create_publisher(Image, f"/{ns}/camera/image_raw", qos_profile_sensor_data)
    client = make.service(f"/{ns}/llava_phi/query")
    frame = rgb_to_image_msg(np.full((336, 336, 3), 200, np.uint8), Header(frame_id="cam"))
    frame.header.stamp.sec = 7
    last = "no response"
    for _ in range(200):
        pub.publish(frame)
        future = client.call_async(Query.Request(question=QUESTION, max_new_tokens=1))
        if wait_until(future.done, 2.0):
            if future.result().success:
                return
            last = f"{future.result().error_code}: {future.result().message}"
        time.sleep(0.05)
    raise RuntimeError(f"the node never answered about a frame ({last})")


def query_burst(make: Clients, ns: str, n: int, wait_s: float) -> tuple[Counter, list[float]]:
    clients = [make.service(f"/{ns}/llava_phi/query") for _ in range(n)]
    futures = [c.call_async(Query.Request(question=QUESTION, max_new_tokens=8)) for c in clients]
    wait_until(lambda: all(f.done() for f in futures), wait_s)
    counts: Counter = Counter()
    latencies = []
    for future in futures:
        if not future.done():
            counts["LOST"] += 1
        elif future.result().success:
            counts["answered"] += 1
            latencies.append(future.result().answer.total_ms)
        else:
            counts[future.result().error_code] += 1
    return counts, latencies


def goal_burst(make: Clients, ns: str, n: int, wait_s: float) -> Counter:
    clients = [make.action(f"/{ns}/llava_phi/ask") for _ in range(n)]
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


def shutdown_run(make: Clients, pending: int, wait_s: float) -> None:
    """SIGTERM while a goal streams and `pending` queries wait behind it."""
    ns = "bench_shutdown"
    proc = start_node(ns, pending, "builtin:random-tiny")  # random weights: answers run long
    try:
        feed_frame(make, ns)
        action = make.action(f"/{ns}/llava_phi/ask")
        feedback: list = []
        sent = action.send_goal_async(Ask.Goal(question="Describe the scene.",
                                               max_new_tokens=600),
                                      feedback_callback=feedback.append)
        wait_until(sent.done, wait_s)
        result = sent.result().get_result_async()
        wait_until(lambda: feedback, wait_s)
        client = make.service(f"/{ns}/llava_phi/query")
        queued = [client.call_async(Query.Request(question=QUESTION, max_new_tokens=400))
                  for _ in range(pending)]
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        exit_s = time.monotonic() - start
        wait_until(lambda: result.done() and all(f.done() for f in queued), wait_s)
        codes = Counter((f.result().error_code or "answered") if f.done() else "LOST"
                        for f in queued)
        goal = (f"{result.result().result.error_code or 'answered'} after "
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
    parser.add_argument("--client-depth", type=int, default=0,
                        help="response queue depth of each client (0: rclpy's default, 10)")
    args = parser.parse_args()
    rclpy.init()
    node = Node("bench_reliability")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    counters = NodeCounters(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    make = Clients(node, executor, args.client_depth)
    procs = []
    try:
        print(f"builtin:tiny, node and clients in separate processes, client response depth "
              f"{args.client_depth or 'default (10)'}, {os.cpu_count()} CPUs")
        for pending in (args.pending, max(args.bursts)):
            ns = f"bench_q{pending}"
            procs.append(start_node(ns, pending))
            feed_frame(make, ns)
            for n in args.bursts:
                before = counters.handled(ns)
                counts, lat = query_burst(make, ns, n, args.wait_s)
                handled = counters.handled(ns) - before
                p50, p99 = np.percentile(lat, [50, 99]) if lat else (0.0, 0.0)
                print(f"queue {pending:4d}: {n:4d} queries at once -> {dict(counts)}; the node "
                      f"answered or refused {handled}; answered total_ms p50 {p50:.0f} "
                      f"p99 {p99:.0f}")
                print(f"queue {pending:4d}: {n:4d} goals at once   -> "
                      f"{dict(goal_burst(make, ns, n, args.wait_s))}")
        shutdown_run(make, args.pending, args.wait_s)
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=30)
        executor.shutdown()
        spinner.join(timeout=10)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
