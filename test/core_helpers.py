"""Helpers of the service core's unit tests (test/test_core_*.py): clocks, images, frames and a
scripted model that needs no weights.

`ScriptedModel` implements the `AnsweringModel` protocol the worker uses. Its answers are
" t0 t1 ..." with one token per step; a test can hold it after its first token (`hold`), make
it fail, and see what it was asked. Tests synchronise on its events, never on sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llava_phi_ros.core.frames import Frame
from llava_phi_ros.pipeline import AskResult, EncodedImage

WAIT = 30.0  # generous bound on every wait: a hang fails, a slow machine does not
T0_NS = 1_700_000_000 * 10**9  # node-clock origin of the tests


class SteadyClock:
    """A fake steady clock (seconds) that only moves when the test moves it."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# Arrays that are not usable images, and a word of what image_problem says about each.
BAD_IMAGES = [
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((8, 8, 4), np.uint8), "shape"),
    (np.zeros((8, 8, 3), np.uint16), "dtype"),
    ([[1, 2, 3]], "not a numpy array"),
]


def image(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
    """A random (H, W, 3) uint8 RGB image."""
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def frame(stamp_ns: int, seed: int = 0, camera: str = "camera", received_ns: int | None = None,
          img: np.ndarray | None = None) -> Frame:
    """A camera frame whose opaque header names its stamp."""
    return Frame(camera=camera, stamp_ns=stamp_ns, frame_id=f"{camera}_optical",
                 image=image(seed) if img is None else img, header=("header", camera, stamp_ns),
                 received_ns=stamp_ns if received_ns is None else received_ns)


class ScriptedModel:
    """An AnsweringModel without weights: `tokens` tokens per answer, events to hold it."""

    description = "scripted/model"
    is_builtin_toy = False
    max_context = 64
    num_image_tokens = 4

    def __init__(self, tokens: int = 3):
        self.tokens = tokens
        self.asked: list[dict[str, Any]] = []  # one entry per ask(), in order
        self.encoded: list[np.ndarray] = []  # images given to encode_image, in order
        self.first_token = threading.Event()  # set after the first token of every answer
        self.hold: threading.Event | None = None  # when set: wait on it after the first token
        self.fail_encode: BaseException | None = None
        self.fail_ask: BaseException | None = None
        self.prefix_cache_mb: float | None = None
        self.closed = 0

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = (),
                   system_prompt: str | None = None) -> list[int]:
        return [1, -200] + [2] * len(question.split()) + [3] * 4 * len(history)

    def encode_image(self, img: Any) -> EncodedImage:
        if self.fail_encode is not None:
            raise self.fail_encode
        self.encoded.append(img)
        return EncodedImage(features=("features", len(self.encoded)), vision_ms=2.5)

    def ask(self, encoded: Any, question: str, history: Sequence[tuple[str, str]] = (), *,
            generation: Any = None, choices: Sequence[str] = (),
            on_text: Callable[[str, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            system_prompt: str | None = None) -> AskResult:
        self.asked.append({"encoded": encoded, "question": question, "history": list(history),
                           "choices": choices, "system_prompt": system_prompt,
                           "generation": generation})
        if self.fail_ask is not None:
            raise self.fail_ask
        ids: list[int] = []
        for i in range(self.tokens):
            if should_cancel is not None and should_cancel():
                return self._result(ids, "cancelled")
            ids.append(i)
            if on_text is not None:
                on_text(" ".join(f"t{k}" for k in ids), len(ids))
            if i == 0:
                self.first_token.set()
                if self.hold is not None:
                    assert self.hold.wait(WAIT), "the test never released the model"
        return self._result(ids, "length")

    @staticmethod
    def _result(ids: list[int], finish_reason: str) -> AskResult:
        return AskResult(text=" ".join(f"t{k}" for k in ids), finish_reason=finish_reason,
                         token_ids=list(ids), prompt_tokens=12, reused_prefix_tokens=0,
                         prefill_ms=1.5, time_to_first_token_ms=4.0 if ids else 0.0,
                         decode_tokens_per_s=100.0)

    def set_prefix_cache_mb(self, megabytes: float) -> None:
        self.prefix_cache_mb = megabytes

    def prefix_cache_stats(self) -> dict[str, float | int]:
        return {"entries": 0, "mb": 0.0, "budget_mb": self.prefix_cache_mb or 0.0,
                "restores": 0}

    def backend_info(self) -> dict[str, str]:
        return {"backend": "scripted"}

    def close(self) -> None:
        self.closed += 1


def wait_until(predicate: Callable[[], Any], timeout_s: float = WAIT) -> None:
    """Poll until predicate() is truthy (a hang fails after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
