"""llava_phi_ros/core/frames.py on its own: Frame, image_problem, FrameBuffer and Cameras
(frame intake checks). No model, no ROS, no worker."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from llava_phi_ros.core.frames import Cameras, Frame, FrameBuffer, FrameRefused, image_problem

from .core_helpers import BAD_IMAGES, T0_NS, WAIT, frame, image


# ----- Frame and image_problem -------------------------------------------------------------------
def test_frame_identity_size_and_problem() -> None:
    f = frame(T0_NS, camera="front")
    assert f.key == ("front", T0_NS, "front_optical")
    assert f.nbytes == 32 * 40 * 3 and f.problem() is None
    assert Frame("front", 1, "x", np.zeros((2, 2), np.uint8)).problem().startswith(
        "the image has shape")
    assert f != frame(T0_NS, camera="front")  # frames compare by identity, not by content


@pytest.mark.parametrize("img, fragment", BAD_IMAGES)
def test_image_problem_names_what_is_wrong(img: object, fragment: str) -> None:
    assert fragment in image_problem(img)


def test_image_problem_accepts_rgb_uint8() -> None:
    assert image_problem(np.zeros((1, 1, 3), np.uint8)) is None


# ----- frame buffer ----------------------------------------------------------------------------
def test_frame_buffer_keeps_its_duration_and_always_the_newest() -> None:
    buf = FrameBuffer(duration_s=5.0, max_mb=100.0)
    for i in range(11):
        buf.add(frame(T0_NS + i * 10**9))
    assert [f.stamp_ns for f in buf.frames()] == [T0_NS + i * 10**9 for i in range(5, 11)]
    assert buf.latest().stamp_ns == T0_NS + 10 * 10**9
    assert buf.stamp_range() == (T0_NS + 5 * 10**9, T0_NS + 10 * 10**9)
    buf.clear()
    assert len(buf) == 0 and buf.latest() is None and buf.stamp_range() is None
    assert buf.nbytes == 0 and buf.rate_hz == 0.0


def test_frame_buffer_keeps_its_size_bound() -> None:
    one_mib = np.zeros((512, 683, 3), np.uint8)  # ~1 MiB (1,049,088 bytes)
    buf = FrameBuffer(duration_s=100.0, max_mb=2.5)
    for i in range(6):
        buf.add(frame(T0_NS + i, img=one_mib))
    assert len(buf) == 2 and buf.nbytes == 2 * one_mib.nbytes == 2 * buf.latest().nbytes
    assert [f.stamp_ns for f in buf.frames()] == [T0_NS + 4, T0_NS + 5]
    huge = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB: over the bound, yet the newest is kept
    buf.add(frame(T0_NS + 6, img=huge))
    assert len(buf) == 1 and buf.latest().image is huge


def test_frame_buffer_nearest_stamp_and_out_of_order_frames() -> None:
    buf = FrameBuffer(duration_s=5.0, max_mb=100.0)
    ms = 10**6
    for t in (0, 100, 300, 200):  # the 200 ms frame arrives late
        buf.add(frame(T0_NS + t * ms, seed=t))
    assert [f.stamp_ns - T0_NS for f in buf.frames()] == [0, 100 * ms, 200 * ms, 300 * ms]
    assert buf.latest().stamp_ns == T0_NS + 300 * ms
    assert buf.nearest(T0_NS + 140 * ms, 50 * ms).stamp_ns == T0_NS + 100 * ms
    assert buf.nearest(T0_NS + 160 * ms, 50 * ms).stamp_ns == T0_NS + 200 * ms
    assert buf.nearest(T0_NS + 150 * ms, 50 * ms).stamp_ns == T0_NS + 100 * ms  # tie: older
    assert buf.nearest(T0_NS + 300 * ms, 0).stamp_ns == T0_NS + 300 * ms
    assert buf.nearest(T0_NS + 360 * ms, 50 * ms) is None
    assert buf.nearest(T0_NS - 60 * ms, 50 * ms) is None
    assert buf.nearest(T0_NS - 40 * ms, 50 * ms).stamp_ns == T0_NS


def test_frame_buffer_rate_uses_arrival_times() -> None:
    buf = FrameBuffer(duration_s=2.0, max_mb=100.0)
    for i in range(41):  # 10 Hz arrivals for 4 s; stamps all equal (a stuck camera clock)
        buf.add(frame(T0_NS, received_ns=T0_NS + i * 10**8))
    assert buf.rate_hz == pytest.approx(10.0)
    buf.add(frame(T0_NS, received_ns=T0_NS + 41 * 10**8))
    assert buf.rate_hz == pytest.approx(10.0)


def test_frame_buffer_is_thread_safe() -> None:
    buf = FrameBuffer(duration_s=0.5, max_mb=1.0)
    errors: list[BaseException] = []
    stop = threading.Event()
    img = image(1)

    def writer(k: int) -> None:
        try:
            for i in range(400):
                buf.add(frame(T0_NS + (i * 4 + k) * 10**6, img=img))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                buf.latest(), buf.nearest(T0_NS + 10**9, 10**7), buf.rate_hz, len(buf)
                stamps = [f.stamp_ns for f in buf.frames()]
                assert stamps == sorted(stamps)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(WAIT)
    stop.set()
    for t in readers:
        t.join(WAIT)
    assert not errors, errors
    stamps = [f.stamp_ns for f in buf.frames()]
    assert stamps == sorted(stamps) and stamps[-1] == T0_NS + 1599 * 10**6
    assert stamps[-1] - stamps[0] <= 0.5e9
    assert buf.nbytes == sum(f.nbytes for f in buf.frames()) <= 1024 * 1024


def test_frame_buffer_new_bounds_apply_from_the_next_frame() -> None:
    buf = FrameBuffer(duration_s=10.0, max_mb=100.0)
    for i in range(5):
        buf.add(frame(T0_NS + i * 10**9))
    buf.set_bounds(duration_s=1.5, max_mb=100.0)
    assert len(buf) == 5  # not trimmed yet
    buf.add(frame(T0_NS + 5 * 10**9))
    assert [f.stamp_ns for f in buf.frames()] == [T0_NS + 4 * 10**9, T0_NS + 5 * 10**9]
    assert buf.last_received_ns == T0_NS + 5 * 10**9


# ----- Cameras: the intake checks ----------------------------------------------------------------
def test_cameras_buffer_each_camera_apart() -> None:
    cams = Cameras(["front", "rear"], duration_s=5.0, max_mb=10.0)
    assert cams.names == ["front", "rear"] and cams.get("side") is None
    front, rear = frame(T0_NS, camera="front"), frame(T0_NS + 1, camera="rear")
    cams.add(front, now_ns=T0_NS, max_future_stamp_s=1.0)
    assert cams.latest_frames() == [front]
    cams.add(rear, now_ns=T0_NS, max_future_stamp_s=1.0)
    assert cams.latest_frames() == [front, rear] and cams["rear"].latest() is rear
    assert [name for name, _ in cams] == ["front", "rear"]
    cams.set_bounds(duration_s=5.0, max_mb=0.001)  # ~1 KiB: only the newest frame stays
    cams.add(frame(T0_NS + 2, camera="front"), now_ns=T0_NS, max_future_stamp_s=1.0)
    assert len(cams["front"]) == 1
    cams.clear()
    assert cams.latest_frames() == [] and len(cams["rear"]) == 0


def test_cameras_refuse_unknown_cameras_and_bad_images() -> None:
    cams = Cameras(["front"], duration_s=5.0, max_mb=10.0)
    with pytest.raises(FrameRefused, match=r"camera 'rear' is not configured \(cameras: front\)"):
        cams.add(frame(T0_NS, camera="rear"), T0_NS, 1.0)
    with pytest.raises(FrameRefused, match="camera 'front': the image has dtype float32"):
        cams.add(frame(T0_NS, camera="front", img=np.zeros((4, 4, 3), np.float32)), T0_NS, 1.0)
    assert isinstance(FrameRefused("x"), ValueError)
    assert len(cams["front"]) == 0


def test_cameras_refuse_and_count_frames_stamped_in_the_future() -> None:
    cams = Cameras(["front"], duration_s=5.0, max_mb=10.0)
    with pytest.raises(FrameRefused, match=r"2\.000 s ahead .*is 0\.5\); dropped"):
        cams.add(frame(T0_NS + 2 * 10**9, camera="front"), T0_NS, 0.5)
    cams.add(frame(T0_NS + 4 * 10**8, camera="front"), T0_NS, 0.5)  # within the tolerance
    assert cams["front"].refused_future == 1 and len(cams["front"]) == 1
    cams.add(frame(T0_NS + 10**9, camera="front"), 0, 0.5)  # clock not started: no check
    assert cams["front"].refused_future == 1 and len(cams["front"]) == 2



# ----- frames that arrive undecoded -------------------------------------------------------------
def undecoded(rgb: np.ndarray, calls: list, fail: str = "", held: int = 100) -> Frame:
    def decode() -> np.ndarray:
        calls.append(1)
        if fail:
            raise ValueError(fail)
        return rgb

    return Frame("front", T0_NS, "cam", decode=decode, held_bytes=held)


def test_an_undecoded_frame_decodes_once_on_first_read_and_then_holds_pixels() -> None:
    rgb, calls = image(3), []
    f = undecoded(rgb, calls)
    assert not f.decoded and f.nbytes == 100 and f.problem() is None and calls == []
    readers = [threading.Thread(target=lambda: f.image) for _ in range(8)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(WAIT)
    assert calls == [1] and f.decoded and f.image is rgb and f.nbytes == rgb.nbytes


def test_a_frame_that_fails_to_decode_says_why_every_time_without_retrying() -> None:
    from llava_phi_ros.core.frames import FrameDecodeError

    calls: list = []
    f = undecoded(image(0), calls, fail="corrupt jpeg data: truncated")
    for _ in range(2):
        with pytest.raises(FrameDecodeError, match="camera 'front', frame at .* truncated"):
            _ = f.image
    assert calls == [1] and f.nbytes == 0  # the source bytes are dropped either way
    bad = Frame("front", T0_NS, "cam", decode=lambda: np.zeros((4, 4), np.uint8))
    with pytest.raises(FrameDecodeError, match="shape"):
        _ = bad.image
    with pytest.raises(ValueError, match="one of them"):
        Frame("front", T0_NS, "cam")


def test_the_buffer_bound_counts_frames_decoded_after_they_were_buffered() -> None:
    """A decoded frame holds its pixels, not its compressed bytes: the next add trims by that."""
    rgb = image(1)  # 32 x 40 x 3 = 3840 bytes
    buffer = FrameBuffer(duration_s=60.0, max_mb=3 * rgb.nbytes / 2**20)
    frames = [Frame("front", T0_NS + i, "cam", decode=lambda: rgb, held_bytes=100)
              for i in range(10)]
    for f in frames:
        buffer.add(f)
    assert len(buffer) == 10 and buffer.nbytes == 1000  # compressed: all fit
    for f in frames[5:]:
        _ = f.image  # five requests decoded these: 5 x 3840 bytes now
    buffer.add(Frame("front", T0_NS + 10, "cam", decode=lambda: rgb, held_bytes=100))
    assert buffer.nbytes <= 3 * rgb.nbytes and len(buffer) < 11
    assert buffer.latest().stamp_ns == T0_NS + 10
