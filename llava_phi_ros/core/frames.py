"""Camera frames and the per-camera buffers that keep the recent ones.

A `Frame` is one RGB image with its grounding (camera, ROS stamp, frame_id, the original
header). Camera frames arrive undecoded (the JPEG/PNG bytes or the raw buffer, checked from
their headers by the ROS layer) and are decoded only when read: by the worker, for the frame a
request selects and, with `preencode_latest`, each camera's newest. The rest of the core reads
pixels only through `Frame.image`, checks them through `Frame.problem()` and counts memory
through `Frame.nbytes` (the bytes held now), so the buffers' memory bound holds either way.

Locking: a `Frame` has a leaf lock that makes its one decode happen once (the reader that
decodes holds it; a concurrent reader waits). Each `FrameBuffer` has its own lock, which
guards its frame list, arrival history, bounds and `refused_future` counter. It is held only
for list bookkeeping (a frame's `nbytes` is a plain read); nothing is called out of it, and no
other lock is taken while it is held (a leaf lock: callers may hold the core's lock when they
read a buffer). `Cameras` is immutable after construction (the camera set
changes only with a reload), so it needs no lock of its own.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

MIB = 1024 * 1024


class FrameRefused(ValueError):
    """A camera frame `AssistantCore.add_frame` does not buffer (the message says why)."""


class FrameDecodeError(ValueError):
    """A frame whose pixels could not be decoded when first used (its request gets BAD_IMAGE)."""


class Frame:
    """One RGB image with its grounding: camera, ROS stamp, frame_id and the original header.

    Either decoded (`image` given) or as it arrived (`decode` given: a function returning the
    (H, W, 3) uint8 RGB array, holding the message's compressed or raw bytes, `held_bytes` of
    them). A frame as it arrived is decoded on the first read of `image`, on that reader's
    thread (the worker's, never the executor's), once: the pixels are kept, the source bytes
    dropped, and a failure is remembered and raised again as FrameDecodeError.
    """

    def __init__(self, camera: str, stamp_ns: int, frame_id: str,
                 image: np.ndarray | None = None, header: Any = None, received_ns: int = 0, *,
                 decode: Callable[[], np.ndarray] | None = None, held_bytes: int = 0):
        if (image is None) == (decode is None):
            raise ValueError("a Frame takes an image or a decode function (one of them)")
        self.camera = camera  # "" for an image sent inside a request
        self.stamp_ns = stamp_ns  # ROS time of the image header
        self.frame_id = frame_id
        self.header = header  # opaque: the ROS layer's std_msgs/Header, returned in answers
        self.received_ns = received_ns  # node-clock time of arrival
        self._image = image
        self._decode = decode
        self._held_bytes = held_bytes
        self._error: str | None = None
        self._lock = threading.Lock()  # one decode at a time (a leaf lock)

    @property
    def image(self) -> np.ndarray:
        """The (H, W, 3) uint8 RGB pixels, decoded now if the frame came compressed or raw."""
        image = self._image
        if image is not None:
            return image
        with self._lock:
            if self._image is None:
                if self._error is None:
                    self._decode_locked()
                if self._error is not None:
                    raise FrameDecodeError(self._error)
            return self._image  # type: ignore[return-value]

    def _decode_locked(self) -> None:
        assert self._decode is not None
        try:
            image = self._decode()
            problem = image_problem(image)
        except ValueError as exc:  # ImageConversionError and the like: the data's fault
            problem, image = str(exc), None
        if problem is not None:
            where = f"camera {self.camera!r}" if self.camera else "the request's image"
            self._error = f"{where}, frame at {stamp_s(self.stamp_ns)} s: {problem}"
        else:
            self._image = image
        self._decode = None  # the source bytes go either way
        self._held_bytes = 0

    @property
    def decoded(self) -> bool:
        """Whether the pixels are here (the frame arrived decoded or has been read)."""
        return self._image is not None

    @property
    def nbytes(self) -> int:
        """Bytes the frame holds: its pixels once decoded, else the bytes it arrived as."""
        image = self._image
        return int(image.nbytes) if image is not None else self._held_bytes

    @property
    def key(self) -> tuple[str, int, str]:
        """The frame's identity for caching: (camera, stamp_ns, frame_id)."""
        return (self.camera, self.stamp_ns, self.frame_id)

    def problem(self) -> str | None:
        """Why this frame's image cannot be used, or None when it can (a frame not decoded yet
        was checked from its header at intake; its pixels are checked when decoded)."""
        return image_problem(self._image) if self._image is not None else None


def image_problem(image: Any) -> str | None:
    """Why an array is not a usable (H, W, 3) uint8 RGB image, or None when it is."""
    if not isinstance(image, np.ndarray):
        return f"the image is a {type(image).__name__}, not a numpy array"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"the image has shape {image.shape}; expected (H, W, 3)"
    if image.dtype != np.uint8:
        return f"the image has dtype {image.dtype}; expected uint8"
    if image.size == 0:
        return f"the image is empty (shape {image.shape})"
    return None


def stamp_s(stamp_ns: int) -> str:
    """A ROS stamp in seconds, for messages."""
    return f"{stamp_ns / 1e9:.3f}"


class FrameBuffer:
    """The recent frames of one camera, ordered by stamp; thread-safe, O(1) for in-order frames.

    Keeps frames within `duration_s` of the newest stamp and within `max_mb` MiB in total,
    dropping the oldest first; the newest frame is always kept.
    """

    def __init__(self, duration_s: float, max_mb: float):
        self._lock = threading.Lock()
        self._frames: list[Frame] = []  # ascending stamp_ns
        self._arrivals: deque[int] = deque(maxlen=10000)  # received_ns within the window
        self.refused_future = 0  # frames refused for a stamp ahead of the node clock
        self.set_bounds(duration_s, max_mb)

    def set_bounds(self, duration_s: float, max_mb: float) -> None:
        """New bounds (live parameters); they apply from the next frame on."""
        with self._lock:
            self._duration_ns = int(duration_s * 1e9)
            self._max_bytes = int(max_mb * MIB)

    def note_refused_future(self) -> None:
        """Count a frame refused because its stamp lay too far ahead of the node clock."""
        with self._lock:
            self.refused_future += 1

    def add(self, frame: Frame) -> None:
        """Insert a frame and trim the buffer to its bounds."""
        with self._lock:
            frames = self._frames
            if not frames or frame.stamp_ns >= frames[-1].stamp_ns:
                frames.append(frame)
            else:  # out of order (rare): keep the list sorted
                bisect.insort_right(frames, frame, key=lambda f: f.stamp_ns)
            # Summed afresh: a frame's bytes change when a request decodes it.
            total = sum(f.nbytes for f in frames)
            newest = frames[-1].stamp_ns
            drop = 0
            while len(frames) - drop > 1 and (
                    newest - frames[drop].stamp_ns > self._duration_ns
                    or total > self._max_bytes):
                total -= frames[drop].nbytes
                drop += 1
            if drop:
                del frames[:drop]
            arrivals = self._arrivals
            arrivals.append(frame.received_ns)
            while arrivals and arrivals[-1] - arrivals[0] > self._duration_ns:
                arrivals.popleft()

    def latest(self) -> Frame | None:
        """The frame with the newest stamp, or None."""
        with self._lock:
            return self._frames[-1] if self._frames else None

    def nearest(self, stamp_ns: int, tolerance_ns: int) -> Frame | None:
        """The frame whose stamp is closest to stamp_ns, if within tolerance_ns (ties: older)."""
        with self._lock:
            frames = self._frames
            i = bisect.bisect_left(frames, stamp_ns, key=lambda f: f.stamp_ns)
            candidates = frames[max(i - 1, 0):i + 1]
        if not candidates:
            return None
        best = min(candidates, key=lambda f: abs(f.stamp_ns - stamp_ns))
        return best if abs(best.stamp_ns - stamp_ns) <= tolerance_ns else None

    def stamp_range(self) -> tuple[int, int] | None:
        """(oldest, newest) stamp in nanoseconds, or None when empty."""
        with self._lock:
            return (self._frames[0].stamp_ns, self._frames[-1].stamp_ns) if self._frames else None

    def frames(self) -> list[Frame]:
        """A snapshot of the buffered frames, oldest first."""
        with self._lock:
            return list(self._frames)

    def clear(self) -> None:
        """Drop every frame and the arrival history."""
        with self._lock:
            self._frames.clear()
            self._arrivals.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffered frames (decoded pixels, or the bytes they arrived as)."""
        with self._lock:
            return sum(f.nbytes for f in self._frames)

    @property
    def rate_hz(self) -> float:
        """Arrival rate (node clock, received_ns) over the buffer window; 0 with < 2 frames."""
        with self._lock:
            n = len(self._arrivals)
            span = self._arrivals[-1] - self._arrivals[0] if n >= 2 else 0
        return (n - 1) / (span / 1e9) if span > 0 else 0.0

    @property
    def last_received_ns(self) -> int | None:
        """Node-clock arrival time of the most recently received frame."""
        with self._lock:
            return self._arrivals[-1] if self._arrivals else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)


class Cameras:
    """The frame buffers of the configured cameras, the default (first) one first."""

    def __init__(self, names: list[str], duration_s: float, max_mb: float):
        self._buffers = {name: FrameBuffer(duration_s, max_mb) for name in names}

    @property
    def names(self) -> list[str]:
        """The camera names, the default (first) one first."""
        return list(self._buffers)

    def get(self, camera: str) -> FrameBuffer | None:
        """The buffer of a configured camera, or None."""
        return self._buffers.get(camera)

    def __getitem__(self, camera: str) -> FrameBuffer:
        return self._buffers[camera]

    def __iter__(self) -> Iterator[tuple[str, FrameBuffer]]:
        return iter(self._buffers.items())

    def set_bounds(self, duration_s: float, max_mb: float) -> None:
        """New buffer bounds for every camera (from the next frame on)."""
        for buffer in self._buffers.values():
            buffer.set_bounds(duration_s, max_mb)

    def add(self, frame: Frame, now_ns: int, max_future_stamp_s: float) -> None:
        """Buffer a camera frame, or FrameRefused (unknown camera, unusable image, future stamp).

        A frame stamped more than max_future_stamp_s ahead of the node clock would be "latest"
        until real time caught up with it. A node clock at zero has not started (sim time before
        /clock): no check then.
        """
        buffer = self._buffers.get(frame.camera)
        if buffer is None:
            raise FrameRefused(f"camera {frame.camera!r} is not configured "
                               f"(cameras: {', '.join(self._buffers)})")
        problem = frame.problem()
        if problem is not None:
            raise FrameRefused(f"camera {frame.camera!r}: {problem}")
        ahead_s = (frame.stamp_ns - now_ns) / 1e9
        if now_ns > 0 and ahead_s > max_future_stamp_s:
            buffer.note_refused_future()
            raise FrameRefused(f"camera {frame.camera!r}: frame stamped {ahead_s:.3f} s ahead of "
                               f"the node clock (max_future_stamp_s is {max_future_stamp_s:g}); "
                               "dropped")
        buffer.add(frame)

    def latest_frames(self) -> list[Frame]:
        """Each camera's newest frame (cameras without one left out), in camera order."""
        return [f for f in (b.latest() for b in self._buffers.values()) if f is not None]

    def clear(self) -> None:
        """Drop every buffered frame."""
        for buffer in self._buffers.values():
            buffer.clear()
