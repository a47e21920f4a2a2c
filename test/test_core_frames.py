"""llava_phi_ros/core/frames.py on its own: Frame, image_problem, FrameBuffer and Cameras
(frame intake checks). No model, no ROS, no worker."""

from __future__ import annotations

import numpy as np
import pytest

from llava_phi_ros.core.frames import Cameras, Frame, FrameBuffer, FrameRefused, image_problem

from .core_helpers import T0_NS, frame


# ----- Frame and image_problem -------------------------------------------------------------------
def test_frame_identity_size_and_problem() -> None:
    f = frame(T0_NS, camera="front")
    assert f.key == ("front", T0_NS, "front_optical")
    assert f.nbytes == 32 * 40 * 3 and f.problem() is None
    assert Frame("front", 1, "x", np.zeros((2, 2), np.uint8)).problem().startswith(
        "the image has shape")
    assert f != frame(T0_NS, camera="front")  # frames compare by identity, not by content


@pytest.mark.parametrize("img, fragment", [
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((8, 8, 4), np.uint8), "shape"),
    (np.zeros((8, 8, 3), np.uint16), "dtype"),
    ([[1, 2, 3]], "not a numpy array"),
])
def test_image_problem_names_what_is_wrong(img: object, fragment: str) -> None:
    assert fragment in image_problem(img)


def test_image_problem_accepts_rgb_uint8() -> None:
    assert image_problem(np.zeros((1, 1, 3), np.uint8)) is None


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

