"""Benchmark: the executor's time per camera message, 3 cameras x 1920x1080 JPEG at 30 Hz.

The node (builtin:random-tiny, `image_transport: compressed`, cameras cam0..cam2) spins on a
SingleThreadedExecutor, as its main() does; three publishers in this process send a 1080p JPEG
(a smooth synthetic scene, ~0.2 MB) each at 30 Hz through the Fast DDS large-image profile, and
a planner asks a query every 0.25 s. Measured: the time inside each camera callback (the node's
`_on_image`, wrapped), the executor's share of wall time spent in them, and the queries' round
trips (which queue behind camera callbacks on the one executor thread).

    .venv/bin/python benchmarks/bench_intake.py [--seconds 20] [--source-tree PATH]
        [--json FILE]

--source-tree runs another checkout's llava_phi_ros (e.g. a commit before frames were decoded
lazily) with this script; both need the built interfaces of this venv.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["ROS_DOMAIN_ID"] = str(random.randint(101, 199))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_images.xml")


def scene() -> bytes:
    """A 1920x1080 JPEG of gradients and shapes (compresses like a camera image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:1080, 0:1920]
    rgb = np.stack([x * 255 // 1919, y * 255 // 1079, (x + y) * 255 // 2998], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    rnd = random.Random(0)
    for _ in range(40):
        x0, y0 = rnd.randrange(1800), rnd.randrange(1000)
        draw.rectangle([x0, y0, x0 + rnd.randrange(20, 300), y0 + rnd.randrange(20, 300)],
                       fill=tuple(rnd.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--source-tree", type=Path, default=REPO)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.source_tree))
    sys.path.insert(1, str(REPO))
    import numpy as np
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    import llava_phi_ros
    import test.conftest  # noqa: F401 - the built interfaces on llava_phi_ros.__path__
    from llava_phi_ros.ros.assistant_node import AssistantNode
    from llava_phi_ros.srv import Query

    data = scene()
    rclpy.init()
    cameras = ["cam0", "cam1", "cam2"]
    node = AssistantNode(namespace="intake", parameter_overrides=[
        Parameter("model_path", value="builtin:random-tiny"),
        Parameter("cameras", value=cameras), Parameter("image_transport", value="compressed"),
        Parameter("max_image_age_s", value=0.0)])
    callback_s: list[float] = []
    real = node._on_image

    def timed(*a: object) -> None:
        start = time.perf_counter()
        real(*a)
        callback_s.append(time.perf_counter() - start)

    node._on_image = timed  # the subscriptions' lambdas look it up per message
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    planner = rclpy.create_node("intake_planner")
    executor.add_node(planner)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    pubs = [planner.create_publisher(CompressedImage, f"/intake/{c}/image_raw/compressed",
                                     qos_profile_sensor_data) for c in cameras]
    client = planner.create_client(Query, "/intake/llava_phi/query")
    assert client.wait_for_service(timeout_sec=60)
    while node.core is None or not node.core.model_loaded:
        time.sleep(0.05)
    stop = threading.Event()

    def publish(pub: object, offset: float) -> None:
        msg = CompressedImage(format="jpeg", data=data)
        next_t = time.monotonic() + offset
        while not stop.is_set():
            msg.header = Header(stamp=planner.get_clock().now().to_msg(), frame_id="cam")
            pub.publish(msg)
            next_t += 1 / 30
            stop.wait(max(0.0, next_t - time.monotonic()))

    threads = [threading.Thread(target=publish, args=(p, i / 90), daemon=True)
               for i, p in enumerate(pubs)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # warm-up: discovery and first frames
    callback_s.clear()
    round_trips, codes = [], []
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        sent = time.perf_counter()
        future = client.call_async(Query.Request(question="What is there?", max_new_tokens=2))
        while not future.done():
            time.sleep(0.001)
        round_trips.append((time.perf_counter() - sent) * 1000)
        codes.append(future.result().error_code or "answered")
        time.sleep(max(0.0, 0.25 - (time.perf_counter() - sent)))
    wall = time.monotonic() - start
    stop.set()
    per_msg = np.array(callback_s) * 1000
    result = {
        "source_tree": str(args.source_tree), "package": llava_phi_ros.__file__,
        "jpeg_bytes": len(data), "seconds": wall, "messages": len(per_msg),
        "messages_per_s": len(per_msg) / wall,
        "callback_ms_mean": float(per_msg.mean()), "callback_ms_p50": float(np.median(per_msg)),
        "callback_ms_p99": float(np.percentile(per_msg, 99)),
        "executor_busy_fraction": float(per_msg.sum() / 1000 / wall),
        "query_round_trip_ms_p50": float(np.median(round_trips)),
        "query_round_trip_ms_p99": float(np.percentile(round_trips, 99)),
        "queries": len(codes), "answered": codes.count("answered"),
    }
    executor.shutdown()
    node.release()
    node.destroy_node()
    planner.destroy_node()
    rclpy.try_shutdown()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
