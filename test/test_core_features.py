"""llava_phi_ros/core/features.py on its own: the image feature cache (identity, LRU, failed
pre-encodes). No model: encodings are stand-ins."""

from __future__ import annotations

from llava_phi_ros.core.features import FeatureCache
from llava_phi_ros.pipeline import EncodedImage

from .core_helpers import T0_NS, frame


def encoded(tag: str) -> EncodedImage:
    return EncodedImage(features=tag, vision_ms=1.0)


def test_the_cache_hits_only_the_very_same_frame() -> None:
    cache = FeatureCache(capacity=4)
    f = frame(T0_NS)
    assert cache.get(f) is None
    e = encoded("f")
    cache.put(f, e)
    assert cache.get(f) is e and len(cache) == 1
    assert cache.get(frame(T0_NS)) is None  # same header, another image object
    cache.clear()
    assert cache.get(f) is None and len(cache) == 0


def test_the_cache_evicts_the_least_recently_used() -> None:
    cache = FeatureCache(capacity=2)
    a, b, c = (frame(T0_NS + i, seed=i) for i in range(3))
    cache.put(a, encoded("a"))
    cache.put(b, encoded("b"))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, encoded("c"))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None


def test_next_to_encode_skips_cached_and_failed_frames() -> None:
    cache = FeatureCache(capacity=8)
    front, rear = frame(T0_NS, camera="front"), frame(T0_NS, camera="rear")
    assert cache.next_to_encode([front, rear]) is front
    cache.put(front, encoded("front"))
    assert cache.next_to_encode([front, rear]) is rear
    cache.mark_failed(rear)
    assert cache.next_to_encode([front, rear]) is None  # not retried in a loop
    newer = frame(T0_NS + 1, camera="rear")
    assert cache.next_to_encode([front, newer]) is newer  # a new frame of that camera is tried
    cache.clear()  # forgets the failure too
    assert cache.next_to_encode([rear]) is rear
