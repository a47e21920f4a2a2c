"""The image feature cache: each recent frame's encoding (vision tower + projector output).

A question about a frame asked before reuses its encoding; because it is the same
`EncodedImage` object, the pipeline's prefix cache also recognises the frame and keeps its KV
prefix. Entries are looked up by the frame's identity (camera, stamp, frame_id) *and* object,
so a different image with the same header never hits. The cache holds a few frames per camera
(least recently used evicted) and remembers, per camera, the newest frame whose background
pre-encoding failed so that the worker does not retry it in a loop.

Locking: the cache has its own lock, which guards its entries and the failed marks. It is a
leaf lock: nothing is called out of it (encoding happens outside, on the worker thread) and no
other lock is taken while it is held, so the worker may call in with the core's lock held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .frames import Frame

if TYPE_CHECKING:
    from ..pipeline import EncodedImage


class FeatureCache:
    """Encodings of recent frames, least recently used first, up to `capacity` of them."""

    def __init__(self, capacity: int):
        self._lock = threading.Lock()
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, int, str], tuple[Frame, EncodedImage]] = \
            OrderedDict()
        self._failed: dict[str, tuple[str, int, str]] = {}  # camera -> key of a failed encode

    def get(self, frame: Frame) -> EncodedImage | None:
        """The cached encoding of this very frame (same identity and object), or None."""
        with self._lock:
            entry = self._entries.get(frame.key)
            if entry is None or entry[0] is not frame:
                return None
            self._entries.move_to_end(frame.key)
            return entry[1]

    def put(self, frame: Frame, encoded: EncodedImage) -> None:
        """Cache a frame's encoding (LRU)."""
        with self._lock:
            self._entries[frame.key] = (frame, encoded)
            self._entries.move_to_end(frame.key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def mark_failed(self, frame: Frame) -> None:
        """Remember that pre-encoding this frame failed (it is not tried again)."""
        with self._lock:
            self._failed[frame.camera] = frame.key

    def next_to_encode(self, frames: Iterable[Frame]) -> Frame | None:
        """The first of `frames` neither cached nor marked failed (what to pre-encode next)."""
        for frame in frames:
            if self.get(frame) is not None:
                continue
            with self._lock:
                failed = self._failed.get(frame.camera) == frame.key
            if not failed:
                return frame
        return None

    def clear(self) -> None:
        """Drop every cached encoding and failed mark."""
        with self._lock:
            self._entries.clear()
            self._failed.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
