"""Test doubles of the model, handed to the core's or the node's model loader.

They wrap a real VisionLanguageModel, so answers stay real; they only make it slow (to hold the
worker for BUSY / TIMEOUT / CANCELLED / shutdown cases) or make its backend fail mid-decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class SharedModel:
    """A model several cores use in turn (a module fixture): close() only counts, so one core's
    unload does not free the model the next test's core is given."""

    def __init__(self, model: Any):
        self._model = model
        self.closed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        self.closed += 1


class SlowModel:
    """Each generated token and each scored choice takes token_delay_s longer; a cancel (or
    timeout, or shutdown) that should_cancel() reports ends the wait within ~5 ms."""

    def __init__(self, model: Any, token_delay_s: float = 0.05):
        self._model = model
        self.token_delay_s = token_delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def ask(self, image: Any, question: str, history: Any = (), *,
            on_text: Callable[[str, int], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, **kwargs: Any) -> Any:
        def slow_on_text(text: str, n_tokens: int) -> None:
            if on_text is not None:
                on_text(text, n_tokens)
            self._wait(should_cancel)

        def slow_should_cancel() -> bool:  # also checked before each scored choice
            if kwargs.get("choices"):
                self._wait(should_cancel)
            return should_cancel() if should_cancel is not None else False

        return self._model.ask(image, question, history, on_text=slow_on_text,
                               should_cancel=slow_should_cancel, **kwargs)

    def _wait(self, should_cancel: Callable[[], bool] | None) -> None:
        end = time.monotonic() + self.token_delay_s
        while time.monotonic() < end:
            if should_cancel is not None and should_cancel():
                return
            time.sleep(min(0.005, max(0.0, end - time.monotonic())))


def fail_decode_after(model: Any, n_steps: int) -> Any:
    """Make the model's backend raise in its (n_steps + 1)-th decode_step of every answer whose
    question contains 'explode' (a device failure mid-decode); returns the model."""
    backend = model.backend
    real_decode, real_ask = backend.decode_step, model.ask
    state = {"armed": False, "steps": 0}

    def decode_step(token_id: int, pos: int) -> Any:
        if state["armed"]:
            state["steps"] += 1
            if state["steps"] > n_steps:
                raise RuntimeError("simulated device failure in decode_step")
        return real_decode(token_id, pos)

    def ask(image: Any, question: str, *args: Any, **kwargs: Any) -> Any:
        state["armed"], state["steps"] = "explode" in question, 0
        try:
            return real_ask(image, question, *args, **kwargs)
        finally:
            state["armed"] = False

    backend.decode_step = decode_step
    model.ask = ask
    return model
