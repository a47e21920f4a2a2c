"""Hostile requests: thousands of generated queries (any unicode, the prompt's special tokens,
huge or negative max_new_tokens, NaN/inf/negative temperature and top_p, huge choice lists and
choices, unknown cameras, sessions and stamps) sent to the service core with the real
builtin:random-tiny model. Each one is refused at once with a specific error code and message,
or accepted and answered (an answer or a code): never an exception out of submit, never an
unanswered request, and the core keeps serving."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llava_phi_ros.assistant import (
    ERROR_CODES,
    AssistantCore,
    AssistantSettings,
    Frame,
    QueryRefused,
    QueryRequest,
)
from llava_phi_ros.model.prompt import IMAGE_TOKEN, STOP_STRING
from llava_phi_ros.pipeline import VisionLanguageModel

WAIT_S = 60.0
SPECIAL = [STOP_STRING, IMAGE_TOKEN, "<image>", "\x00", "\u202e", "\ud7ff", "😀" * 50]


@pytest.fixture(scope="module")
def core() -> Iterator[AssistantCore]:
    settings_ = AssistantSettings(cameras=["front"], max_new_tokens=3, max_image_age_s=0.0,
                                  max_pending_queries=4, query_timeout_s=20.0)
    core = AssistantCore(settings_, time.time_ns, time.monotonic)
    model = VisionLanguageModel.load("builtin:random-tiny")
    core.load_model(lambda: model)
    core.set_active(True)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    core.add_frame(Frame("front", time.time_ns(), "cam", rgb, received_ns=time.time_ns()))
    yield core
    core.shutdown()


texts = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL),
                  st.builds(lambda a, s, b: a + s + b, st.text(max_size=8),
                            st.sampled_from(SPECIAL), st.text(max_size=8)),
                  st.just("x" * 5000))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5]))


HOSTILE = {  # field -> what a hostile client may put there
    "question": st.one_of(texts, st.just("What is there?")),
    "request_id": st.text(max_size=20),
    "camera": st.sampled_from(["", "front", "rear", "../../etc/passwd", "\x00", "front "]),
    "stamp_ns": st.integers(-2**63, 2**64),
    "choices": st.one_of(st.lists(texts, max_size=6),
                         st.lists(st.just("red"), min_size=200, max_size=200),
                         st.lists(st.just("word " * 400), min_size=1, max_size=2)),
    "max_new_tokens": st.one_of(st.integers(-2**31, 2**40), st.sampled_from([True, 1.5])),
    "temperature": numbers,
    "top_p": numbers,
    "session_id": st.text(max_size=12),
}
VALID = {"question": "What is there?", "max_new_tokens": 2}


@st.composite
def requests(draw):
    """A valid request with one to three of its fields made hostile."""
    fields = draw(st.lists(st.sampled_from(sorted(HOSTILE)), min_size=1, max_size=3,
                           unique=True))
    return QueryRequest(**{**VALID, **{f: draw(HOSTILE[f]) for f in fields}})


@settings(max_examples=1000)
@given(requests())
def test_every_request_is_refused_specifically_or_answered(core, request):
    try:
        job = core.submit(request)
    except QueryRefused as refused:
        event(f"refused {refused.code}")
        assert refused.code in ERROR_CODES and refused.message
        return
    outcome = job.result(timeout=WAIT_S)
    assert outcome is not None, "an accepted request went unanswered"
    event("answered" if outcome.success else f"failed {outcome.error_code}")
    if not outcome.success:
        assert outcome.error_code in ERROR_CODES and outcome.message
    assert outcome.error_code != "MODEL_ERROR", outcome.message  # input errors are not faults


def test_still_serving_afterwards(core):
    outcome = core.submit(QueryRequest("What is there?", max_new_tokens=2)).result(WAIT_S)
    assert outcome.success, outcome


_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event_name: str, args: tuple) -> None:
    if _RECORDING[0] and event_name == "open" and args and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


def test_no_request_field_makes_the_node_open_a_file(core, tmp_path):
    """Every field that a path could hide in, set to a real file's path: the core opens nothing
    under it while refusing or answering (Python's audit hook sees every open)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    path = str(secret)
    sys.addaudithook(_audit)  # cannot be removed: it records only while _RECORDING
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        secret.read_text()  # the control: the hook does see an open
        assert _OPENED == [path], _OPENED
        _OPENED.clear()
        for fields in ({"question": path}, {"question": f"file://{path}"}, {"camera": path},
                       {"request_id": path}, {"session_id": path}, {"choices": [path, "red"]}):
            request = QueryRequest(**{**VALID, **fields})
            try:
                core.submit(request).result(timeout=WAIT_S)
            except QueryRefused:
                pass
    finally:
        _RECORDING[0] = False
    assert not [p for p in _OPENED if str(tmp_path) in p], _OPENED
