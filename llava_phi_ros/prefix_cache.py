"""KV prefixes kept for several frames: system prompt + image (+ a session's earlier turns).

The backend's working KV cache holds one sequence (the "live" one). When a request would
overwrite the live sequence's image, its KV is first copied into a snapshot kept here, keyed by
the image; a later question about that image restores it and prefills only its own tokens.
Snapshots live within a byte budget, least recently used evicted. An entry holds its image
weakly: once nobody else holds that EncodedImage (the node's feature cache evicted the frame, a
CLI call returned), no request can ever name it again, so its snapshot is dropped at the next
request instead of sitting in the budget as dead weight. Backend-agnostic: it only calls
`snapshot(n)` / `restore(snapshot, n)`. Not thread-safe: one model, one worker thread.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend, KVSnapshot
from .model.generation import expanded_length
from .model.prompt import IMAGE_TOKEN_INDEX

_MIB = 1024 * 1024


@dataclass
class _Entry:
    ids: list[int]  # the ids whose KV the snapshot holds (image placeholder included)
    image: weakref.ref  # the EncodedImage spliced in at the placeholder (identity matters)
    snapshot: KVSnapshot


def reusable_ids(cached_ids: Sequence[int], cached_image: Any, ids: Sequence[int],
                 image: Any) -> int:
    """How many leading ids a cached sequence shares with ids (at least one id is left to
    prefill, so there are logits to start from); past the image placeholder only when the
    cached image is this very image."""
    keep = 0
    while keep < min(len(cached_ids), len(ids) - 1) and cached_ids[keep] == ids[keep]:
        if ids[keep] == IMAGE_TOKEN_INDEX and image is not cached_image:
            break
        keep += 1
    return keep


class PrefixCache:
    """The live sequence plus image-keyed snapshots within `budget_bytes` (0: live only)."""

    def __init__(self, num_image_tokens: int, budget_bytes: int = 0):
        self.num_image_tokens = num_image_tokens
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(image) -> entry, LRU first
        self._live_ids: list[int] = []
        self._live_image: Any = None
        # Counters other threads may read (stats) while the worker changes the entries.
        self.nbytes = 0  # what the snapshots hold
        self.restores = 0  # snapshots put back

    def prepare(self, backend: Backend, ids: Sequence[int], image: Any) -> int:
        """Make the backend's KV cache hold the longest reusable prefix of ids; returns how many
        ids it covers. Until `finished()` the live sequence counts as lost."""
        # Entries whose image died are dropped first, so an entry found by id(image) is this
        # image's: a live object's id is never another live object's.
        self._drop_unreachable()
        keep = reusable_ids(self._live_ids, self._live_image, ids, image)
        entry = self._entries.get(id(image))
        from_entry = 0 if entry is None else reusable_ids(entry.ids, image, ids, image)
        restoring = entry is not None and from_entry > keep
        if self._image_would_be_lost(0 if restoring else keep) and not (
                restoring and self._live_image is image):  # same image: its entry covers it
            self._save_live(backend)
        if restoring:
            backend.restore(entry.snapshot, expanded_length(ids[:from_entry],
                                                            self.num_image_tokens))
            self._entries.move_to_end(id(image))
            self.restores += 1
            keep = from_entry
        self._live_ids, self._live_image = [], None
        return keep

    def finished(self, ids: Sequence[int], image: Any) -> None:
        """The KV cache now holds ids (the image spliced at its placeholder)."""
        self._live_ids, self._live_image = list(ids), image
        self._drop_unreachable()  # the previous live image may have had no other holder

    def _image_would_be_lost(self, keep: int) -> bool:
        """Whether prefilling from `keep` overwrites the live sequence's image."""
        if self._live_image is None or IMAGE_TOKEN_INDEX not in self._live_ids:
            return False
        return keep <= self._live_ids.index(IMAGE_TOKEN_INDEX)

    def _save_live(self, backend: Backend) -> None:
        """Snapshot the live sequence under its image (replacing that image's older entry)."""
        n = expanded_length(self._live_ids, self.num_image_tokens)
        key = id(self._live_image)
        old = self._entries.get(key)
        if old is not None and old.ids[:len(self._live_ids)] == self._live_ids:
            self._entries.move_to_end(key)  # it already holds all of this
            return
        self._drop(key)
        if self.budget_bytes <= 0:
            return
        snapshot = backend.snapshot(n)
        if snapshot.nbytes > self.budget_bytes:
            return  # one frame's prefix alone exceeds the budget
        self._entries[key] = _Entry(self._live_ids, weakref.ref(self._live_image), snapshot)
        self.nbytes += snapshot.nbytes
        self._evict()

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.snapshot.nbytes

    def _drop_unreachable(self) -> None:
        """Drop the entries whose image nobody holds any more (no request can name it)."""
        for key in [key for key, entry in self._entries.items() if entry.image() is None]:
            self._drop(key)

    def set_budget(self, budget_bytes: int) -> None:
        """A new byte budget (live: evicts at once)."""
        self.budget_bytes = budget_bytes
        self._evict()

    def _evict(self) -> None:
        while self._entries and self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget everything, the live sequence included (the next request prefills it all)."""
        self._entries.clear()
        self.nbytes = 0
        self._live_ids, self._live_image = [], None

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, float | int]:
        """Entries, megabytes held, the budget and how many restores there were."""
        return {"entries": len(self), "mb": self.nbytes / _MIB,
                "budget_mb": self.budget_bytes / _MIB, "restores": self.restores}


def mib(megabytes: float) -> int:
    """A budget in MiB as bytes."""
    return int(megabytes * _MIB)
