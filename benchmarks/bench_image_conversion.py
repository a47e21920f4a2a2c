"""Benchmark: sensor_msgs/Image and CompressedImage -> RGB array, 1920x1080, per encoding.

Each message is built with the real sensor_msgs types, serialised and deserialised with rclpy, so
``msg.data`` is what a subscription callback receives (an ``array.array('B')``). Prints median
and p95 milliseconds per conversion. DESIGN.md's target: rgb8 1920x1080 in < 5 ms.

    .venv/bin/python benchmarks/bench_image_conversion.py [--runs 50] [--width 1920 --height 1080]
"""

from __future__ import annotations

import argparse
import array
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_phi_ros.ros.image_conversion import (  # noqa: E402
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_compressed_msg,
    rgb_to_encoding,
)

ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422_yuy2")
TARGET_MS = {"rgb8": 5.0}


def _scene(height: int, width: int) -> np.ndarray:
    """A smooth gradient with noise: realistic for JPEG size, not all-zero."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                    (xx + yy) % 256], axis=-1).astype(np.int16)
    rgb += np.random.default_rng(0).integers(-8, 9, rgb.shape, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _as_received(msg, msg_type):
    """Round-trip a message through rclpy's serialisation, as a subscription delivers it."""
    from rclpy.serialization import deserialize_message, serialize_message

    return deserialize_message(serialize_message(msg), msg_type)


def _time(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median and p95 of fn()'s wall time in ms, after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(samples)), float(np.percentile(samples, 95))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    args = parser.parse_args(argv)

    from sensor_msgs.msg import CompressedImage, Image

    rgb = _scene(args.height, args.width)
    rows: list[tuple[str, str, float, float, str]] = []
    for encoding in ENCODINGS:
        data, step = rgb_to_encoding(rgb, encoding)
        msg = Image(height=args.height, width=args.width, encoding=encoding, step=step,
                    data=array.array("B", data))
        received = _as_received(msg, Image)
        image_msg_to_rgb(received)  # validates before timing
        med, p95 = _time(lambda m=received: image_msg_to_rgb(m), args.runs)
        target = TARGET_MS.get(encoding)
        verdict = "" if target is None else ("ok" if med < target else "MISSED") + f" (<{target})"
        rows.append((f"Image {encoding}", f"{len(received.data) / 1e6:.2f}", med, p95, verdict))
    for fmt in ("jpeg", "png"):
        cmsg = _as_received(rgb_to_compressed_msg(rgb, fmt=fmt), CompressedImage)
        med, p95 = _time(lambda m=cmsg: compressed_msg_to_rgb(m), args.runs)
        rows.append((f"CompressedImage {fmt}", f"{len(cmsg.data) / 1e6:.2f}", med, p95, ""))

    print(f"image conversion, {args.width}x{args.height}, {args.runs} runs, "
          f"numpy {np.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} ({os.cpu_count()} CPUs)")
    print(f"{'message':<28} {'MB':>6} {'median ms':>10} {'p95 ms':>8}  target")
    for name, mb, med, p95, verdict in rows:
        print(f"{name:<28} {mb:>6} {med:>10.2f} {p95:>8.2f}  {verdict}")
    return 1 if any("MISSED" in r[4] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
