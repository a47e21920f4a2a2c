"""Requests, answers and outcomes of the service core, and every check a request passes.

A request is accepted or refused at once. `AssistantCore.submit()` runs the checks here in this
order (the first failing one gives the refusal): node state (NOT_READY, in the core), the
request's own fields (`check_request`: BAD_REQUEST), its session id and turn
(`session_id_of`, `check_session_turn`: BAD_REQUEST, UNKNOWN_SESSION), the frame it is about
(`select_frame`: BAD_IMAGE, UNKNOWN_CAMERA, NO_IMAGE, STAMP_OUT_OF_RANGE, STALE_IMAGE), the
prompt's length (`check_prompt`: BAD_REQUEST, CONTEXT_OVERFLOW), then room in the queue (BUSY,
in jobs.py). Refusals are `QueryRefused` with one of the error codes of srv/Query.srv.

The text rules a question or choice must follow (no stop token, no `<image>`, a length limit)
are the prompt template's (model/prompt.py): the pipeline applies the same ones to its direct
callers, so they are written once. Everything here is pure: no locks, no threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..model.generation import GenerationConfig, expanded_length
from ..model.prompt import IMAGE_TOKEN, RequestError, check_question, clean_choices
from .frames import Cameras, Frame, stamp_s
from .settings import AssistantSettings

if TYPE_CHECKING:
    from ..pipeline import AnsweringModel

# Error codes: the values equal the names, as the constants of srv/Query.srv.
NO_IMAGE = "NO_IMAGE"
STALE_IMAGE = "STALE_IMAGE"
STAMP_OUT_OF_RANGE = "STAMP_OUT_OF_RANGE"
UNKNOWN_CAMERA = "UNKNOWN_CAMERA"
BAD_IMAGE = "BAD_IMAGE"
BAD_REQUEST = "BAD_REQUEST"
UNKNOWN_SESSION = "UNKNOWN_SESSION"
CONTEXT_OVERFLOW = "CONTEXT_OVERFLOW"
BUSY = "BUSY"
TIMEOUT = "TIMEOUT"
CANCELLED = "CANCELLED"
NOT_READY = "NOT_READY"
MODEL_ERROR = "MODEL_ERROR"
ERROR_CODES = (NO_IMAGE, STALE_IMAGE, STAMP_OUT_OF_RANGE, UNKNOWN_CAMERA, BAD_IMAGE, BAD_REQUEST,
               UNKNOWN_SESSION, CONTEXT_OVERFLOW, BUSY, TIMEOUT, CANCELLED, NOT_READY, MODEL_ERROR)
STOPPED = (CANCELLED, TIMEOUT, NOT_READY)  # codes of answers stopped, not failed


@dataclass
class QueryRequest:
    """Query.srv's request, ROS-free (an inline sensor_msgs/Image arrives as a Frame)."""

    question: str
    request_id: str = ""
    camera: str = ""  # "" = the first camera; must be "" when image is set
    stamp_ns: int = 0  # 0 = the latest frame; else the buffered frame nearest it
    image: Frame | None = None  # answer about this image instead of a camera frame
    choices: Sequence[str] = ()
    max_new_tokens: int = 0  # 0 = the default
    temperature: float = -1.0  # < 0 = the default; 0 = greedy
    top_p: float = -1.0  # < 0 = the default
    session_id: str = ""  # non-empty = continue (or start) that conversation


@dataclass
class AnswerRecord:
    """Everything Answer.msg carries, plus the Frame (for the debug image)."""

    header: Any
    stamp_ns: int
    frame_id: str
    request_id: str
    camera: str
    question: str
    text: str = ""
    finish_reason: str = "stop"  # "stop", "length", "cancelled" (stopped) or "error" (failed)
    choices: list[str] = field(default_factory=list)
    choice_logprobs: list[float] = field(default_factory=list)
    choice_probs: list[float] = field(default_factory=list)
    choice_index: int = -1
    model_id: str = ""
    tokens_generated: int = 0
    queue_ms: float = 0.0
    vision_ms: float = 0.0  # 0 on a cache hit
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # from inference start (vision included)
    decode_tokens_per_s: float = 0.0
    total_ms: float = 0.0  # from acceptance to the answer
    prompt_tokens: int = 0  # positions the prompt filled (history and image included)
    reused_prefix_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    session_id: str = ""
    frame: Frame | None = field(default=None, repr=False)


@dataclass
class QueryOutcome:
    """Query.srv's response: success, an error code ('' on success), a message, the answer."""

    success: bool
    error_code: str = ""
    message: str = ""
    answer: AnswerRecord | None = None


class QueryRefused(Exception):
    """A request refused at once by `AssistantCore.submit`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def outcome_of(code: str, message: str, answer: AnswerRecord) -> QueryOutcome:
    """A finished job's outcome; a code marks the answer stopped ("cancelled") or failed."""
    if code:
        answer.finish_reason = "cancelled" if code in STOPPED else "error"
    return QueryOutcome(success=not code, error_code=code, message=message, answer=answer)


def _bad(message: str) -> QueryRefused:
    return QueryRefused(BAD_REQUEST, message)


@dataclass(frozen=True)
class CheckedRequest:
    """What `check_request` makes of a request: generation settings and cleaned choices."""

    generation: GenerationConfig
    choices: tuple[str, ...]  # stripped of surrounding space


def check_request(request: QueryRequest, settings: AssistantSettings,
                  max_context: int) -> CheckedRequest:
    """BAD_REQUEST checks of the request's own fields; the node's defaults filled in."""
    q = request.question
    if not isinstance(q, str) or not q.strip():
        raise _bad("the question is empty")
    try:
        check_question(q)  # the template's rules: the length limit, no stop token
    except RequestError as exc:
        raise _bad(str(exc)) from None
    if IMAGE_TOKEN in q:
        raise _bad(f"the question contains {IMAGE_TOKEN!r}; the image is placed by the prompt "
                   "template")
    if request.image is not None and request.camera:
        raise _bad(f"camera ({request.camera!r}) and image are both set; send one of them")
    if not isinstance(request.stamp_ns, int) or request.stamp_ns < 0:
        raise _bad(f"stamp must be >= 0, got {request.stamp_ns!r}")
    choices = request.choices
    if isinstance(choices, str):
        raise _bad("choices must be a list of strings, not one string")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise _bad(f"choice {i} is a {type(choice).__name__}, not a string")
    try:
        cleaned = clean_choices(choices)  # the template's rules: none empty, no special token
    except RequestError as exc:
        raise _bad(str(exc)) from None
    max_new = request.max_new_tokens
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise _bad(f"max_new_tokens must be an integer >= 0, got {max_new!r}")
    if max_new >= max_context:
        raise _bad(f"max_new_tokens {max_new} does not fit the model's context of "
                   f"{max_context} positions")
    temperature = _sampling_value("temperature", request.temperature, settings.temperature)
    if not math.isfinite(temperature):
        raise _bad(f"temperature must be finite, got {temperature}")
    top_p = _sampling_value("top_p", request.top_p, settings.top_p)
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1] (or < 0 for the default), got {top_p}")
    generation = GenerationConfig(max_new_tokens=max_new or settings.max_new_tokens,
                                  temperature=temperature, top_p=top_p)
    return CheckedRequest(generation, tuple(cleaned))


def _sampling_value(name: str, value: Any, default: float) -> float:
    """A request's temperature/top_p: < 0 = the default; NaN and non-numbers refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise _bad(f"{name} is NaN")
    return float(default) if value < 0 else float(value)


def session_id_of(request: QueryRequest) -> str:
    """The request's session id ('' = none); BAD_REQUEST for one that is not a string."""
    sid = request.session_id
    if not sid:
        return ""
    if not isinstance(sid, str):
        raise _bad(f"session_id must be a string, got {sid!r}")
    return sid


def check_session_turn(request: QueryRequest, bound: Frame | None, ended: str | None) -> None:
    """A turn of session `request.session_id`, bound to frame `bound` (None: not live).

    BAD_REQUEST when a later turn sends an image or names another camera (a session stays on
    the frame of its first turn); UNKNOWN_SESSION when the id has ended (`ended` says why).
    """
    sid = request.session_id
    if bound is not None:
        if request.image is not None:
            raise _bad(f"session {sid!r} is bound to the frame of its first turn; a later turn "
                       "cannot send an image")
        if request.camera and request.camera != bound.camera:
            raise _bad(f"session {sid!r} is bound to the frame of its first turn (camera "
                       f"{bound.camera!r}); it cannot switch to camera {request.camera!r}")
    elif ended is not None:
        raise QueryRefused(UNKNOWN_SESSION, f"session {sid!r} has ended ({ended}); its history "
                                            "is gone: use a new session_id")


def select_frame(request: QueryRequest, cameras: Cameras, settings: AssistantSettings,
                 now_ns: int) -> Frame:
    """The inline image, the latest frame or the one nearest the stamp; refusals otherwise."""
    if request.image is not None:
        problem = request.image.problem()
        if problem is not None:
            raise QueryRefused(BAD_IMAGE, problem)
        return request.image
    camera = request.camera or cameras.names[0]
    buffer = cameras.get(camera)
    if buffer is None:
        raise QueryRefused(UNKNOWN_CAMERA, f"camera {camera!r} is not configured (cameras: "
                                           f"{', '.join(cameras.names)})")
    latest = buffer.latest()
    if latest is None:
        raise QueryRefused(NO_IMAGE, f"no frame from camera {camera!r} yet")
    if request.stamp_ns:
        tolerance_ns = int(settings.stamp_tolerance_s * 1e9)
        frame = buffer.nearest(request.stamp_ns, tolerance_ns)
        if frame is None:
            span = buffer.stamp_range()
            held = (f"the buffer holds stamps {stamp_s(span[0])} .. {stamp_s(span[1])} s"
                    if span else "the buffer is empty")
            raise QueryRefused(STAMP_OUT_OF_RANGE, f"no frame from camera {camera!r} within "
                                                   f"{settings.stamp_tolerance_s:g} s of stamp "
                                                   f"{stamp_s(request.stamp_ns)} s; {held}")
        return frame
    max_age = settings.max_image_age_s
    age_s = (now_ns - latest.stamp_ns) / 1e9
    if max_age > 0 and age_s > max_age:
        raise QueryRefused(STALE_IMAGE, f"the latest frame from camera {camera!r} is "
                                        f"{age_s:.3f} s old (max_image_age_s is {max_age:g})")
    return latest


def check_prompt(model: AnsweringModel, question: str, history: Sequence[tuple[str, str]],
                 system_prompt: str | None) -> int:
    """The positions the prompt needs; BAD_REQUEST if it cannot be built, CONTEXT_OVERFLOW if
    it leaves no room for an answer in the model's context."""
    try:
        ids = model.prompt_ids(question, history, system_prompt)
    except RequestError as exc:
        raise _bad(str(exc)) from None
    n_positions = expanded_length(ids, model.num_image_tokens)
    if n_positions >= model.max_context:
        hint = " (start a new session: the history is too long)" if history else ""
        raise QueryRefused(CONTEXT_OVERFLOW, f"the prompt needs {n_positions} positions (image "
                                             f"and {len(history)} earlier turns included); the "
                                             f"model's context has {model.max_context}{hint}")
    return n_positions
