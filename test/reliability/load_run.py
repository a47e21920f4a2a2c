"""Load and soak over real DDS: the node in its own process, a 1920x1080 camera at 30 Hz through
the Fast DDS large-image profile, and many planners at once, service and action mixed.

    .venv/bin/python test/reliability/load_run.py load [--clients 16] [--queries 50]
    .venv/bin/python test/reliability/load_run.py soak [--queries 10000] [--rate-hz 10]

`load`: each of N clients sends its queries one after another (even clients the ~/query
service, odd ones the ~/ask action), all clients at once; with max_pending_queries = N nothing
may be refused BUSY (one running + N - 1 waiting fit the queue). Every answer is compared token
for token with the same question asked of the same model directly (no ROS).
`soak`: one client at --rate-hz; the node process's resident memory, threads and open file
descriptors after a warm-up (10% of the queries), at every further tenth, and at the end.
Prints one JSON object (the last line of stdout); test_load.py runs a CI-sized load from it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "config" / "fastdds_large_images.xml"
# Before rclpy loads: a private domain, and the profile for this process's participant too.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(101, 199)))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

import test.conftest  # noqa: E402, F401 - the built interfaces on llava_phi_ros.__path__
from llava_phi_ros.action import Ask  # noqa: E402
from llava_phi_ros.model.generation import GenerationConfig  # noqa: E402
from llava_phi_ros.pipeline import VisionLanguageModel  # noqa: E402
from llava_phi_ros.ros.image_conversion import rgb_to_image_msg  # noqa: E402
from llava_phi_ros.srv import Query  # noqa: E402

NS = "load"
NODE = f"/{NS}/llava_phi"
MAX_NEW = 6
WAIT_S = 120.0  # a request unanswered this long is HUNG
QUESTIONS = 5  # distinct questions per client


def question(client: int, i: int) -> str:
    return f"Client {client}, question {i % QUESTIONS}: what is there?"


def start_node(pending: int, params: list[str] = ()) -> subprocess.Popen:
    """The node's own main() (test/slow_node.py without delays), random toy model."""
    extra = [arg for param in params for arg in ("-p", param)]
    return subprocess.Popen(
        [sys.executable, str(REPO / "test" / "slow_node.py"), "0", "--ros-args",
         "-r", f"__ns:=/{NS}", "-p", "model_path:=builtin:random-tiny",
         "-p", "max_image_age_s:=0.0", "-p", f"max_pending_queries:={pending}",
         "-p", "query_timeout_s:=60.0", *extra, "--log-level", "warn"],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def proc_stats(pid: int) -> dict[str, int]:
    """Resident memory, threads and open file descriptors of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
               if line.startswith("VmRSS:"))
    return {"rss_bytes": rss, "threads": len(os.listdir(f"/proc/{pid}/task")),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Camera(threading.Thread):
    """Publishes one 1920x1080 rgb8 image at `rate_hz` with fresh stamps until stopped."""

    def __init__(self, node: Any, rgb: np.ndarray, rate_hz: float = 30.0):
        super().__init__(daemon=True)
        self.pub = node.create_publisher(Image, f"/{NS}/camera/image_raw",
                                         qos_profile_sensor_data)
        self.msg = rgb_to_image_msg(rgb, Header(frame_id="camera"))
        self.clock, self.period = node.get_clock(), 1.0 / rate_hz
        self.stop, self.published = threading.Event(), 0

    def run(self) -> None:
        next_t = time.monotonic()
        while not self.stop.is_set():
            self.msg.header.stamp = self.clock.now().to_msg()
            self.pub.publish(self.msg)
            self.published += 1
            next_t += self.period
            self.stop.wait(max(0.0, next_t - time.monotonic()))


class Planner:
    """One client: the service or the action, one request at a time."""

    def __init__(self, node: Any, index: int, use_action: bool):
        depth = QoSProfile(depth=64)
        self.index, self.use_action = index, use_action
        if use_action:
            self.client = ActionClient(node, Ask, f"{NODE}/ask", goal_service_qos_profile=depth,
                                       result_service_qos_profile=depth)
            assert self.client.wait_for_server(timeout_sec=60)
        else:
            self.client = node.create_client(Query, f"{NODE}/query", qos_profile=depth)
            assert self.client.wait_for_service(timeout_sec=60)

    def ask(self, text: str) -> tuple[str, Any]:
        """(code, answer or None): "" = answered; HUNG when nothing came within WAIT_S."""
        done = threading.Event()
        if not self.use_action:
            future = self.client.call_async(Query.Request(question=text,
                                                          max_new_tokens=MAX_NEW))
            future.add_done_callback(lambda _: done.set())
            if not done.wait(WAIT_S):
                return "HUNG", None
            response = future.result()
            return response.error_code, response.answer if response.success else None
        sent = self.client.send_goal_async(Ask.Goal(question=text, max_new_tokens=MAX_NEW))
        sent.add_done_callback(lambda _: done.set())
        if not done.wait(WAIT_S):
            return "HUNG", None
        handle = sent.result()
        if not handle.accepted:
            return "REJECTED", None
        result = handle.get_result_async()
        finished = threading.Event()
        result.add_done_callback(lambda _: finished.set())
        if not finished.wait(WAIT_S):
            return "HUNG", None
        out = result.result().result
        return out.error_code, out.answer if out.success else None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rgb = np.random.default_rng(7).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    clients = args.clients if args.mode == "load" else 1
    proc = start_node(pending=max(clients, 4), params=args.param)
    rclpy.init()
    node = rclpy.create_node("load_planners")
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    camera = Camera(node, rgb)
    out: dict[str, Any] = {"mode": args.mode, "clients": clients}
    try:
        planners = [Planner(node, i, use_action=bool(i % 2)) for i in range(clients)]
        camera.start()
        deadline = time.monotonic() + 60
        while planners[0].ask("Ready?")[0] != "":  # the node up and holding a frame
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the node never answered: " + (proc.stderr.read()
                                                                   if proc.poll() else ""))
            time.sleep(0.2)
        direct = VisionLanguageModel.load("builtin:random-tiny")
        gen = GenerationConfig(max_new_tokens=MAX_NEW)
        alone = {}  # question -> (text, tokens) asked directly
        for c in range(clients):
            for i in range(QUESTIONS):
                result = direct.ask(rgb, question(c, i), generation=gen)
                alone[question(c, i)] = (result.text, len(result.token_ids))
        codes: Counter[str] = Counter()
        latencies: list[float] = []
        mismatches: list[str] = []
        lock = threading.Lock()
        samples: list[dict[str, int]] = []

        def client_loop(planner: Planner, n: int, period_s: float) -> None:
            for i in range(n):
                text = question(planner.index, i)
                start = time.monotonic()
                code, answer = planner.ask(text)
                with lock:
                    codes[code or "answered"] += 1
                    if answer is not None:
                        latencies.append((time.monotonic() - start) * 1000.0)
                        if (answer.text, answer.tokens_generated) != alone[text]:
                            mismatches.append(text)
                    if args.mode == "soak" and i % max(1, n // 10) == 0 and i:
                        samples.append(proc_stats(proc.pid))  # the first: after warm-up
                if period_s:
                    time.sleep(max(0.0, start + period_s - time.monotonic()))

        started, frames_before = time.monotonic(), camera.published
        period = 1.0 / args.rate_hz if args.mode == "soak" else 0.0
        threads = [threading.Thread(target=client_loop, args=(p, args.queries, period))
                   for p in planners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out |= {"queries": sum(codes.values()), "codes": dict(codes),
                "lost_or_hung": codes["HUNG"], "mismatches": len(mismatches),
                "busy": codes[Query.Request.BUSY], "seconds": time.monotonic() - started,
                "latency_ms_p50": percentile(latencies, 50),
                "latency_ms_p99": percentile(latencies, 99),
                "camera_hz": (camera.published - frames_before) / (time.monotonic() - started)}
        if args.mode == "soak":
            end = proc_stats(proc.pid)
            warm = samples[0]
            out |= {"after_warmup": warm, "end": end,
                    "rss_growth": end["rss_bytes"] / warm["rss_bytes"] - 1.0,
                    "rss_mb_every_tenth": [round(s["rss_bytes"] / 2**20, 1) for s in samples]}
    finally:
        camera.stop.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        proc.terminate()
        proc.communicate(timeout=30)
        out["node_exit_code"] = proc.returncode
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("load", "soak"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=None,
                        help="per client (load: 50; soak: 10000 in all, one client)")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="soak: queries per second")
    parser.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="another node parameter (repeatable), e.g. prefix_cache_mb:=0")
    args = parser.parse_args()
    args.queries = args.queries or (50 if args.mode == "load" else 10000)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
