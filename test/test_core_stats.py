"""llava_phi_ros/core/stats.py on its own: counters, latency summaries and per-camera health."""

from __future__ import annotations

import pytest

from llava_phi_ros.core.frames import Cameras
from llava_phi_ros.core.requests import BUSY, ERROR_CODES, MODEL_ERROR, AnswerRecord
from llava_phi_ros.core.settings import AssistantSettings
from llava_phi_ros.core.stats import LATENCY_WINDOW, Stats, camera_stats, latency_stats

from .core_helpers import T0_NS, frame


def answer(total_ms: float, queue_ms: float = 1.0, rate: float = 50.0) -> AnswerRecord:
    return AnswerRecord(header=None, stamp_ns=0, frame_id="f", request_id="r", camera="c",
                        question="q", total_ms=total_ms, queue_ms=queue_ms,
                        decode_tokens_per_s=rate)


# ----- Stats --------------------------------------------------------------------------------------
def test_stats_count_answers_and_every_error_code() -> None:
    stats = Stats()
    answers, errors, samples = stats.snapshot()
    assert (answers, samples) == (0, []) and errors == dict.fromkeys(ERROR_CODES, 0)
    stats.count_error(BUSY)
    stats.count_error(BUSY)
    stats.count_error(MODEL_ERROR)
    stats.count_answer(answer(10.0, 2.0, 40.0))
    answers, errors, samples = stats.snapshot()
    assert answers == 1 and samples == [(10.0, 2.0, 40.0)]
    assert errors[BUSY] == 2 and errors[MODEL_ERROR] == 1 and sum(errors.values()) == 3
    errors[BUSY] = 99  # a copy
    assert stats.snapshot()[1][BUSY] == 2
    with pytest.raises(KeyError):
        stats.count_error("NOT_A_CODE")


def test_stats_keep_the_last_latency_window() -> None:
    stats = Stats()
    for i in range(LATENCY_WINDOW + 20):
        stats.count_answer(answer(float(i)))
    answers, _, samples = stats.snapshot()
    assert answers == LATENCY_WINDOW + 20 and len(samples) == LATENCY_WINDOW
    assert samples[0][0] == 20.0


def test_latency_stats() -> None:
    assert latency_stats([]) == {"count": 0, "total_ms_mean": 0.0, "total_ms_p50": 0.0,
                                 "total_ms_p95": 0.0, "total_ms_max": 0.0, "queue_ms_mean": 0.0,
                                 "decode_tokens_per_s_mean": 0.0}
    out = latency_stats([(float(t), 2.0, 10.0 * t) for t in range(1, 101)])
    assert out["count"] == 100 and out["total_ms_mean"] == pytest.approx(50.5)
    assert out["total_ms_p50"] == pytest.approx(50.5)
    assert out["total_ms_p95"] == pytest.approx(95.05) and out["total_ms_max"] == 100.0
    assert out["queue_ms_mean"] == 2.0 and out["decode_tokens_per_s_mean"] == pytest.approx(505.0)


def test_camera_stats_say_what_is_wrong() -> None:
    settings = AssistantSettings(cameras=["front", "rear", "side"], max_image_age_s=1.0,
                                 frame_buffer_s=2.0)
    cams = Cameras(settings.cameras, settings.frame_buffer_s, settings.frame_buffer_max_mb)
    for i in range(5):  # front: 10 Hz, fresh
        cams.add(frame(T0_NS + i * 10**8, camera="front"), T0_NS, 1.0)
    cams.add(frame(T0_NS - 3 * 10**9, camera="rear", received_ns=T0_NS), T0_NS, 1.0)  # stale
    now = T0_NS + 4 * 10**8
    out = camera_stats(cams, now, settings)
    front = out["front"]
    assert front["frames"] == 5 and front["rate_hz"] == pytest.approx(10.0)
    assert front["age_s"] == pytest.approx(0.0) and front["problem"] == ""
    assert front["buffer_mb"] == pytest.approx(5 * 32 * 40 * 3 / 2**20)
    assert front["refused_future"] == 0
    assert out["rear"]["problem"] == ("stale: the newest frame is 3.4 s old (max_image_age_s "
                                      "1); queries get STALE_IMAGE")
    assert out["side"] == {"frames": 0, "rate_hz": 0.0, "age_s": None, "buffer_mb": 0.0,
                           "refused_future": 0, "problem": "no frames yet"}
    silent = camera_stats(cams, now + 3 * 10**9, AssistantSettings(
        cameras=settings.cameras, max_image_age_s=0.0, frame_buffer_s=2.0))["front"]
    assert silent["rate_hz"] == 0.0 and silent["problem"] == "silent: nothing received for 3.0 s"
