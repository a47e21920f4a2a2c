"""Timing and outcome statistics of the service core, and the per-camera health for diagnostics.

`Stats` counts answers and each error code (refusals at submit and failed or stopped jobs
alike) and keeps the last LATENCY_WINDOW answers' total_ms, queue_ms and decode rate;
`latency_stats` summarises them, `camera_stats` reports each camera's buffer, rate, age and
what is wrong with it. The keys here are those /diagnostics shows (ros/assistant_node.py).

Locking: `Stats` has its own lock, which guards its counters and latency window. It is a leaf
lock (nothing is called out of it, no other lock is taken while it is held), so it may be taken
with the core's lock held. `camera_stats` only reads the frame buffers (their own locks).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from .frames import MIB, Cameras
from .requests import ERROR_CODES, AnswerRecord
from .settings import AssistantSettings

LATENCY_WINDOW = 100  # answers kept for the latency statistics


class Stats:
    """Answers, errors by code, and the latency of recent answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: deque[tuple[float, float, float]] = deque(maxlen=LATENCY_WINDOW)
        self._errors = dict.fromkeys(ERROR_CODES, 0)
        self._answers = 0

    def count_error(self, code: str) -> None:
        """Count one refusal or failed/stopped job with this error code."""
        with self._lock:
            self._errors[code] += 1

    def count_answer(self, answer: AnswerRecord) -> None:
        """Count one successful answer and keep its timing."""
        with self._lock:
            self._answers += 1
            self._latency.append((answer.total_ms, answer.queue_ms, answer.decode_tokens_per_s))

    def snapshot(self) -> tuple[int, dict[str, int], list[tuple[float, float, float]]]:
        """(answers, errors by code, latency samples for `latency_stats`), copied."""
        with self._lock:
            return self._answers, dict(self._errors), list(self._latency)


def latency_stats(samples: list[tuple[float, float, float]]) -> dict[str, float | int]:
    """count, total_ms mean/p50/p95/max, queue_ms mean, decode tokens/s mean over samples."""
    if not samples:
        return {"count": 0, "total_ms_mean": 0.0, "total_ms_p50": 0.0, "total_ms_p95": 0.0,
                "total_ms_max": 0.0, "queue_ms_mean": 0.0, "decode_tokens_per_s_mean": 0.0}
    arr = np.asarray(samples, dtype=np.float64)  # (N, 3): total_ms, queue_ms, tokens/s
    total = arr[:, 0]
    return {"count": len(samples), "total_ms_mean": float(total.mean()),
            "total_ms_p50": float(np.percentile(total, 50)),
            "total_ms_p95": float(np.percentile(total, 95)), "total_ms_max": float(total.max()),
            "queue_ms_mean": float(arr[:, 1].mean()),
            "decode_tokens_per_s_mean": float(arr[:, 2].mean())}


def camera_stats(cameras: Cameras, now_ns: int,
                 settings: AssistantSettings) -> dict[str, dict[str, Any]]:
    """Per camera: frames, rate_hz (0 when silent), age_s, buffer_mb, refused_future, problem
    ('' = receiving fresh frames)."""
    out = {}
    for name, buffer in cameras:
        latest = buffer.latest()
        last_rx = buffer.last_received_ns
        silent_s = None if last_rx is None else (now_ns - last_rx) / 1e9
        silent = silent_s is None or silent_s > settings.frame_buffer_s
        age_s = None if latest is None else (now_ns - latest.stamp_ns) / 1e9
        if latest is None:
            problem = "no frames yet"
        elif settings.max_image_age_s > 0 and age_s > settings.max_image_age_s:
            problem = (f"stale: the newest frame is {age_s:.1f} s old (max_image_age_s "
                       f"{settings.max_image_age_s:g}); queries get STALE_IMAGE")
        elif silent:
            problem = f"silent: nothing received for {silent_s:.1f} s"
        else:
            problem = ""
        out[name] = {
            "frames": len(buffer),
            "rate_hz": 0.0 if silent else buffer.rate_hz,
            "age_s": age_s,
            "buffer_mb": buffer.nbytes / MIB,
            "refused_future": buffer.refused_future,
            "problem": problem,  # '' = receiving fresh frames
        }
    return out
