"""The ROS-free service core of the assistant node: frames in, grounded answers out.

It holds per-camera frame buffers, validates requests (accepted or refused at once, with the
error codes of srv/Query.srv), runs the model on ONE worker thread with a bounded FIFO of
waiting jobs, and handles cancellation, timeouts, sessions, per-frame image-prefix caching and
timing statistics. The ROS layer (`llava_phi_ros/ros/`) converts messages to `Frame` /
`QueryRequest`, calls `submit()`, and turns the returned `Job`'s future into a response.

Threading contract (what the ROS node relies on):
- `add_frame()` only takes short locks (never one held while the model runs): image intake never
  waits for inference.
- `submit()` returns at once: it validates, selects the frame and enqueues; it never runs the
  model, and raises nothing but QueryRefused (an unexpected failure while checking is refused
  MODEL_ERROR). The model only ever runs on the worker thread; `start_loading()` loads it on a
  loader thread while queries get NOT_READY.
- Errors: RequestError (the caller's input) is BAD_REQUEST, ContextOverflowError
  CONTEXT_OVERFLOW; any other exception on the model path is MODEL_ERROR.
- A `Job`'s future is resolved on the worker thread (or on the thread that calls `cancel()`,
  `set_active(False)`, `unload_model()` or `shutdown()` for jobs that never started). Done
  callbacks and `on_text` run on that thread: keep them short (hand over to the executor).
- Every accepted job resolves exactly once with a QueryOutcome, never with an exception:
  unexpected inference failures become MODEL_ERROR. Deactivating, unloading and shutting down
  resolve waiting and running jobs NOT_READY (not CANCELLED: the client did not cancel, so an
  action goal ends ABORTED), a running one with its partial answer.

Clocks: `now_ns` is the node clock (ROS time: frame ages and stamps follow `use_sim_time`);
`monotonic` is a steady clock in seconds (timeouts, queue_ms, total_ms, session TTLs).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from . import parameters
from .model.generation import ContextOverflowError, GenerationConfig, expanded_length
from .model.prompt import (
    IMAGE_TOKEN,
    MAX_QUESTION_CHARS,
    STOP_STRING,
    RequestError,
    clean_choices,
    strip_image_token,
)
from .pipeline import AnsweringModel, EncodedImage

log = logging.getLogger(__name__)

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

LATENCY_WINDOW = 100  # answers kept for the latency statistics
LOADER_THREAD = "llava_phi_loader"  # the name of start_loading()'s thread
ENDED_SESSIONS_REMEMBERED = 1024  # expired/evicted session ids that still get UNKNOWN_SESSION
_MIB = 1024 * 1024


# ----- settings --------------------------------------------------------------------------------
_D = parameters.DEFAULTS


@dataclass
class AssistantSettings:
    """The node parameters the core uses; defaults, types and ranges come from the schema
    (llava_phi_ros/parameters.py). Model-loading parameters stay with the node."""

    cameras: list[str] = field(default_factory=lambda: list(_D["cameras"]))
    max_new_tokens: int = _D["max_new_tokens"]
    temperature: float = _D["temperature"]
    top_p: float = _D["top_p"]
    system_prompt: str = _D["system_prompt"]  # "" = the model's default system prompt
    max_image_age_s: float = _D["max_image_age_s"]  # 0 = no limit
    frame_buffer_s: float = _D["frame_buffer_s"]
    frame_buffer_max_mb: float = _D["frame_buffer_max_mb"]  # MiB per camera
    stamp_tolerance_s: float = _D["stamp_tolerance_s"]
    max_future_stamp_s: float = _D["max_future_stamp_s"]
    query_timeout_s: float = _D["query_timeout_s"]
    max_pending_queries: int = _D["max_pending_queries"]  # how many may WAIT while one runs
    session_ttl_s: float = _D["session_ttl_s"]
    max_sessions: int = _D["max_sessions"]
    max_session_turns: int = _D["max_session_turns"]
    preencode_latest: bool = _D["preencode_latest"]
    prefix_cache_mb: float = _D["prefix_cache_mb"]  # applied by the worker before each job

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AssistantSettings:
        """The core's settings out of a mapping of (checked) parameter values."""
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})

    @property
    def model_system_prompt(self) -> str | None:
        """The system prompt for the model (None = its default)."""
        return self.system_prompt or None

    def validate(self) -> AssistantSettings:
        """Check (and coerce) every field against the schema; ParameterError naming it."""
        for name in self.__dataclass_fields__:
            setattr(self, name, parameters.check(name, getattr(self, name)))
        return self


# ----- frames ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Frame:
    """One RGB image with its grounding: camera, ROS stamp, frame_id and the original header."""

    camera: str  # "" for an image sent inside a request
    stamp_ns: int  # ROS time of the image header
    frame_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    header: Any = None  # opaque: the ROS layer's original std_msgs/Header, returned in answers
    received_ns: int = 0  # node-clock time of arrival

    @property
    def nbytes(self) -> int:
        """Bytes held by the image array."""
        return int(self.image.nbytes)

    @property
    def key(self) -> tuple[str, int, str]:
        """The frame's identity for caching: (camera, stamp_ns, frame_id)."""
        return (self.camera, self.stamp_ns, self.frame_id)


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


def _stamp_s(stamp_ns: int) -> str:
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
        self._bytes = 0
        self._arrivals: deque[int] = deque(maxlen=10000)  # received_ns within the window
        self.refused_future = 0  # frames refused for a stamp ahead of the node clock
        self.set_bounds(duration_s, max_mb)

    def set_bounds(self, duration_s: float, max_mb: float) -> None:
        """New bounds (live parameters); they apply from the next frame on."""
        with self._lock:
            self._duration_ns = int(duration_s * 1e9)
            self._max_bytes = int(max_mb * _MIB)

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
            self._bytes += frame.nbytes
            newest = frames[-1].stamp_ns
            drop = 0
            while len(frames) - drop > 1 and (
                    newest - frames[drop].stamp_ns > self._duration_ns
                    or self._bytes > self._max_bytes):
                self._bytes -= frames[drop].nbytes
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
            self._bytes = 0
            self._arrivals.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffered images."""
        with self._lock:
            return self._bytes

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


# ----- requests and answers --------------------------------------------------------------------
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


class FrameRefused(ValueError):
    """A camera frame `AssistantCore.add_frame` does not buffer (the message says why)."""


class QueryRefused(Exception):
    """A request refused at once by `AssistantCore.submit`."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_QUEUED, _RUNNING, _DONE = "queued", "running", "done"
_STOPPED = (CANCELLED, TIMEOUT, NOT_READY)  # codes of answers stopped, not failed


@dataclass(eq=False)
class _Session:
    """One conversation: bound to the frame of its first turn."""

    session_id: str
    frame: Frame
    history: list[tuple[str, str]] = field(default_factory=list)
    last_used: float = 0.0  # steady clock
    in_flight: int = 0  # accepted turns not finished yet (the session is not idle meanwhile)


class Job:
    """An accepted request: its fixed frame and a future resolved with a QueryOutcome."""

    def __init__(self, core: AssistantCore, request: QueryRequest, request_id: str, frame: Frame,
                 generation: GenerationConfig, accepted: float,
                 on_text: Callable[[str, int], None] | None, session: _Session | None):
        self.request = request
        self.request_id = request_id
        self.frame = frame
        self.accepted = accepted  # steady clock, seconds
        self.deadline = accepted + core.settings.query_timeout_s
        self.started: float | None = None  # steady clock, when the worker took it
        self.generation = generation
        self.future: Future[QueryOutcome] = Future()
        # RUNNING from the start, so Future.cancel() cannot bypass the core; use Job.cancel().
        self.future.set_running_or_notify_cancel()
        self._core = core
        self._on_text = on_text
        self._session = session
        self._state = _QUEUED  # guarded by the core's lock
        self._cancel_requested = False
        self._abort: tuple[str, str] | None = None  # (code, message) when the core stops it
        self._stop_reason: tuple[str, str] | None = None

    @property
    def session_id(self) -> str:
        """The request's session id ('' when none)."""
        return self.request.session_id

    def cancel(self) -> bool:
        """Cancel: a waiting job resolves CANCELLED at once, a running one between tokens.

        Returns False when the job had already finished.
        """
        return self._core._cancel(self)

    def done(self) -> bool:
        """Whether the outcome is known."""
        return self.future.done()

    def result(self, timeout: float | None = None) -> QueryOutcome:
        """Wait for the outcome (concurrent.futures.TimeoutError after timeout seconds)."""
        return self.future.result(timeout)

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call fn(job) once resolved (on the resolving thread, or now if already done)."""
        self.future.add_done_callback(lambda _future: fn(self))

    def _resolve(self, outcome: QueryOutcome) -> None:
        """Set the outcome; never called with a core lock held (callbacks run here)."""
        try:
            self.future.set_result(outcome)
        except InvalidStateError:
            log.error("job %s was resolved twice; kept the first outcome, dropped %s",
                      self.request_id, outcome.error_code or "success")


# ----- the core --------------------------------------------------------------------------------
class AssistantCore:
    """Frame buffers, request validation, one inference worker, sessions, caching, statistics."""

    def __init__(self, settings: AssistantSettings, now_ns: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings.validate()
        self._now_ns = now_ns
        self._monotonic = monotonic
        self._buffers = {name: FrameBuffer(settings.frame_buffer_s, settings.frame_buffer_max_mb)
                         for name in settings.cameras}
        # _lock guards the model/active state, queue, running job, sessions and statistics. It
        # is only ever held for short bookkeeping, never while the model runs or a future
        # resolves (done callbacks run synchronously inside set_result).
        self._lock = threading.Condition()
        self._submit_lock = threading.Lock()  # serialises submit(): session table consistency
        self._model: AnsweringModel | None = None
        self._loading_since: float | None = None  # steady clock, while start_loading() runs
        self._load_token: object | None = None  # identifies the current background load
        self._loader: threading.Thread | None = None
        self._active = False
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._preencoding = False
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, str], tuple[Frame, EncodedImage]] = OrderedDict()
        self._cache_capacity = 2 * len(settings.cameras) + 2
        # camera -> key of its newest frame whose pre-encoding failed (not retried)
        self._preencode_failed: dict[str, tuple[str, int, str]] = {}
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._ended_sessions: OrderedDict[str, str] = OrderedDict()  # id -> why it ended
        self._latency: deque[tuple[float, float, float]] = deque(maxlen=LATENCY_WINDOW)
        self._error_counts = dict.fromkeys(ERROR_CODES, 0)
        self._answers = 0

    # ----- model lifecycle ---------------------------------------------------------------------
    def load_model(self, loader: Callable[[], AnsweringModel]) -> None:
        """Load a model (on the calling thread; exceptions propagate) and start the worker."""
        with self._lock:
            self._check_no_model_locked()
        model = loader()
        with self._lock:
            self._install_locked(model)

    def start_loading(self, loader: Callable[[], AnsweringModel],
                      on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Load on a background thread; meanwhile queries get NOT_READY ("loading").

        on_done(None) or on_done(the exception) runs on that thread once the load ends, unless
        unload_model() abandoned it first (a model that arrives after that is dropped).
        """
        token = object()
        with self._lock:
            self._check_no_model_locked()
            self._loading_since, self._load_token = self._monotonic(), token

        def run() -> None:
            model, error = None, None
            try:
                model = loader()
            except Exception as exc:  # noqa: BLE001 - any load failure goes to on_done
                error = exc
            with self._lock:
                current = self._load_token is token
                if current:
                    self._loading_since = self._load_token = None
                    if model is not None:
                        self._install_locked(model)
            if not current and model is not None:
                _close(model)  # abandoned: nobody will use it
            if current and on_done is not None:
                on_done(error)

        self._loader = threading.Thread(target=run, name=LOADER_THREAD, daemon=True)
        self._loader.start()

    def _check_no_model_locked(self) -> None:
        """RuntimeError while a model is loaded or loading (caller holds _lock)."""
        if self._model is not None or self._loading_since is not None:
            raise RuntimeError("a model is already loaded or loading; unload it first")

    def _install_locked(self, model: AnsweringModel) -> None:
        """Adopt a loaded model and start its worker (caller holds _lock)."""
        self._model = model
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._worker_loop, args=(model, self._worker_stop),
                                        name="llava_phi_worker", daemon=True)
        self._worker.start()
        self._lock.notify_all()

    def unload_model(self, join_timeout_s: float | None = None) -> None:
        """Stop the worker (waiting/running jobs resolve NOT_READY), close the model (its device
        memory is freed) and clear the caches; abandon a load in progress. Sessions end too
        (their history came from the model)."""
        with self._lock:  # first: from here no load can install and no request is accepted
            model, self._model = self._model, None
            self._loading_since = self._load_token = None
        self._abort_jobs("the model was unloaded", stop_worker=True, join_timeout_s=join_timeout_s)
        with self._lock:
            for sid in list(self._sessions):
                self._end_session(sid, "the model was unloaded")
        self._clear_cache()
        if model is not None:
            _close(model)

    def shutdown(self, why: str = "the node is shutting down",
                 join_timeout_s: float | None = None) -> None:
        """Stop serving: waiting and running jobs resolve NOT_READY (`why`); unloads the model.

        join_timeout_s bounds the wait for the worker to leave its current step (None: wait).
        """
        with self._lock:
            self._active = False
        self._abort_jobs(why, stop_worker=False)
        self.unload_model(join_timeout_s)
        loader = self._loader
        if loader is not None and loader is not threading.current_thread():
            loader.join(join_timeout_s)  # an abandoned load: its model is dropped when it ends

    def update_settings(self, settings: AssistantSettings) -> None:
        """Apply new live settings at once; the cameras cannot change here (they need a reload).

        A lower max_pending_queries refuses new requests; those already waiting stay.
        """
        settings.validate()
        if settings.cameras != self.settings.cameras:
            raise parameters.ParameterError("cameras need a reload: clean up, set, configure")
        for buffer in self._buffers.values():
            buffer.set_bounds(settings.frame_buffer_s, settings.frame_buffer_max_mb)
        with self._lock:
            self.settings = settings
            while len(self._sessions) > settings.max_sessions:
                self._end_session(next(iter(self._sessions)), f"evicted: more than max_sessions "
                                                              f"= {settings.max_sessions} sessions")
            self._lock.notify_all()  # preencode_latest may have been switched on

    def set_active(self, active: bool) -> None:
        """Accept queries or not; deactivating resolves waiting and running jobs NOT_READY."""
        with self._lock:
            self._active = bool(active)
            self._lock.notify_all()
        if not active:
            self._abort_jobs("the node was deactivated", stop_worker=False)

    @property
    def model_loaded(self) -> bool:
        """Whether a model is loaded."""
        return self._model is not None

    @property
    def loading(self) -> bool:
        """Whether start_loading() is still loading a model."""
        return self._loading_since is not None

    @property
    def active(self) -> bool:
        """Whether queries are accepted (given a loaded model)."""
        return self._active

    @property
    def model_id(self) -> str:
        """The loaded model's id ('' when none)."""
        model = self._model
        return model.description if model is not None else ""

    @property
    def cameras(self) -> list[str]:
        """The configured camera names, the default (first) one first."""
        return list(self.settings.cameras)

    # ----- frames ------------------------------------------------------------------------------
    def add_frame(self, frame: Frame) -> None:
        """Buffer a camera frame; never waits for inference.

        FrameRefused for an unknown camera, an unusable image, or a stamp further ahead of the
        node clock than max_future_stamp_s (such a frame would be "latest" until real time caught
        up with it). A node clock at zero has not started (sim time before /clock): no check.
        """
        buffer = self._buffers.get(frame.camera)
        if buffer is None:
            raise FrameRefused(f"camera {frame.camera!r} is not configured "
                               f"(cameras: {', '.join(self.settings.cameras)})")
        problem = image_problem(frame.image)
        if problem is not None:
            raise FrameRefused(f"camera {frame.camera!r}: {problem}")
        now_ns = self._now_ns()
        ahead_s = (frame.stamp_ns - now_ns) / 1e9
        limit_s = self.settings.max_future_stamp_s
        if now_ns > 0 and ahead_s > limit_s:
            buffer.note_refused_future()
            raise FrameRefused(f"camera {frame.camera!r}: frame stamped {ahead_s:.3f} s ahead of "
                               f"the node clock (max_future_stamp_s is {limit_s:g}); dropped")
        buffer.add(frame)
        if self.settings.preencode_latest:
            with self._lock:  # short: only wakes an idle worker
                self._lock.notify_all()

    def frame_buffer(self, camera: str) -> FrameBuffer:
        """The buffer of one configured camera (KeyError otherwise)."""
        return self._buffers[camera]

    def clear_frames(self) -> None:
        """Drop every buffered frame."""
        for buffer in self._buffers.values():
            buffer.clear()

    def on_time_jump_back(self) -> None:
        """ROS time went backwards (rosbag loop, sim reset): drop frames and per-frame caches."""
        self.clear_frames()
        self._clear_cache()

    # ----- requests ----------------------------------------------------------------------------
    def submit(self, request: QueryRequest,
               on_text: Callable[[str, int], None] | None = None) -> Job:
        """Accept a request (a Job) or refuse it at once (QueryRefused with the error code).

        on_text(text_so_far, tokens_generated) is called on the worker thread after each token.
        """
        with self._submit_lock:
            try:
                return self._submit(request, on_text)
            except QueryRefused:
                raise
            except Exception as exc:  # noqa: BLE001 - a request must end in a code, never a crash
                log.exception("checking a request failed")
                self._refuse(MODEL_ERROR, f"checking the request failed: "
                                          f"{type(exc).__name__}: {exc}")

    def _submit(self, request: QueryRequest,
                on_text: Callable[[str, int], None] | None) -> Job:
        """submit() under the submit lock: the checks in the documented order, then enqueue."""
        with self._lock:
            model, active, loading_since = self._model, self._active, self._loading_since
        if model is None and loading_since is not None:
            self._refuse(NOT_READY, f"the model is still loading "
                                    f"({self._monotonic() - loading_since:.1f} s so far)")
        if model is None:
            self._refuse(NOT_READY, "no model is loaded")
        if not active:
            self._refuse(NOT_READY, "the node is not active")
        gen = self._check_request(request, model)
        session, is_new_session = self._session_for(request)
        frame = session.frame if session is not None else self._select_frame(request)
        history = self._history(session) if session is not None else []
        try:
            ids = model.prompt_ids(request.question, history, self.settings.model_system_prompt)
        except RequestError as exc:
            self._refuse(BAD_REQUEST, str(exc))
        n_positions = expanded_length(ids, model.num_image_tokens)
        if n_positions >= model.max_context:
            hint = " (start a new session: the history is too long)" if history else ""
            self._refuse(CONTEXT_OVERFLOW, f"the prompt needs {n_positions} positions "
                                           f"(image and {len(history)} earlier turns included); "
                                           f"the model's context has "
                                           f"{model.max_context}{hint}")
        request_id = request.request_id or str(uuid.uuid4())
        with self._lock:
            if self._model is not model or not self._active:
                self._error_counts[NOT_READY] += 1
                raise QueryRefused(NOT_READY, "the node stopped serving")
            in_system = len(self._queue) + (1 if self._running is not None else 0)
            if in_system >= self.settings.max_pending_queries + 1:
                self._error_counts[BUSY] += 1
                raise QueryRefused(BUSY, f"{len(self._queue)} queries are waiting (the limit, "
                                         f"max_pending_queries, is "
                                         f"{self.settings.max_pending_queries}); try later")
            now = self._monotonic()
            if session is not None:
                session.last_used = now
                session.in_flight += 1
                if is_new_session:
                    self._add_session(session)
                else:
                    self._sessions.move_to_end(session.session_id)
            job = Job(self, request, request_id, frame, gen, now, on_text, session)
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def _refuse(self, code: str, message: str) -> NoReturn:
        """Count and raise a refusal."""
        with self._lock:
            self._error_counts[code] += 1
        raise QueryRefused(code, message)

    def _check_request(self, request: QueryRequest, model: AnsweringModel
                       ) -> GenerationConfig:
        """BAD_REQUEST checks; the generation settings with the node's defaults filled in."""
        q = request.question
        if not isinstance(q, str) or not q.strip():
            self._refuse(BAD_REQUEST, "the question is empty")
        if len(q.strip()) > MAX_QUESTION_CHARS:
            self._refuse(BAD_REQUEST, f"the question has {len(q.strip())} characters; the limit "
                                      f"is {MAX_QUESTION_CHARS}")
        if STOP_STRING in q:
            self._refuse(BAD_REQUEST, f"the question contains the stop token {STOP_STRING!r}")
        if IMAGE_TOKEN in q:
            self._refuse(BAD_REQUEST, f"the question contains {IMAGE_TOKEN!r}; the image is "
                                      "placed by the prompt template")
        if request.image is not None and request.camera:
            self._refuse(BAD_REQUEST, f"camera ({request.camera!r}) and image are both set; "
                                      "send one of them")
        if not isinstance(request.stamp_ns, int) or request.stamp_ns < 0:
            self._refuse(BAD_REQUEST, f"stamp must be >= 0, got {request.stamp_ns!r}")
        choices = request.choices
        if isinstance(choices, str):
            self._refuse(BAD_REQUEST, "choices must be a list of strings, not one string")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str):
                self._refuse(BAD_REQUEST, f"choice {i} is a {type(choice).__name__}, not a string")
        try:
            clean_choices(choices)  # the template's rules: none empty, no special tokens
        except RequestError as exc:
            self._refuse(BAD_REQUEST, str(exc))
        context = model.max_context
        max_new = request.max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
            self._refuse(BAD_REQUEST, f"max_new_tokens must be an integer >= 0, got {max_new!r}")
        if max_new >= context:
            self._refuse(BAD_REQUEST, f"max_new_tokens {max_new} does not fit the model's "
                                      f"context of {context} positions")
        temperature = self._sampling_value("temperature", request.temperature,
                                           self.settings.temperature)
        if not math.isfinite(temperature):
            self._refuse(BAD_REQUEST, f"temperature must be finite, got {temperature}")
        top_p = self._sampling_value("top_p", request.top_p, self.settings.top_p)
        if not 0.0 < top_p <= 1.0:
            self._refuse(BAD_REQUEST, f"top_p must be in (0, 1] (or < 0 for the default), "
                                      f"got {top_p}")
        return GenerationConfig(max_new_tokens=max_new or self.settings.max_new_tokens,
                                temperature=temperature, top_p=top_p)

    def _sampling_value(self, name: str, value: Any, default: float) -> float:
        """A request's temperature/top_p: < 0 = the default; NaN and non-numbers refused."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._refuse(BAD_REQUEST, f"{name} must be a number, got {value!r}")
        if math.isnan(value):
            self._refuse(BAD_REQUEST, f"{name} is NaN")
        return float(default) if value < 0 else float(value)

    def _select_frame(self, request: QueryRequest) -> Frame:
        """The inline image, the latest frame or the one nearest the stamp; refusals otherwise."""
        if request.image is not None:
            problem = image_problem(request.image.image)
            if problem is not None:
                self._refuse(BAD_IMAGE, problem)
            return request.image
        camera = request.camera or self.settings.cameras[0]
        buffer = self._buffers.get(camera)
        if buffer is None:
            self._refuse(UNKNOWN_CAMERA, f"camera {camera!r} is not configured (cameras: "
                                         f"{', '.join(self.settings.cameras)})")
        latest = buffer.latest()
        if latest is None:
            self._refuse(NO_IMAGE, f"no frame from camera {camera!r} yet")
        if request.stamp_ns:
            tolerance_ns = int(self.settings.stamp_tolerance_s * 1e9)
            frame = buffer.nearest(request.stamp_ns, tolerance_ns)
            if frame is None:
                span = buffer.stamp_range()
                held = (f"the buffer holds stamps {_stamp_s(span[0])} .. {_stamp_s(span[1])} s"
                        if span else "the buffer is empty")
                self._refuse(STAMP_OUT_OF_RANGE, f"no frame from camera {camera!r} within "
                                                 f"{self.settings.stamp_tolerance_s:g} s of stamp "
                                                 f"{_stamp_s(request.stamp_ns)} s; {held}")
            return frame
        max_age = self.settings.max_image_age_s
        age_s = (self._now_ns() - latest.stamp_ns) / 1e9
        if max_age > 0 and age_s > max_age:
            self._refuse(STALE_IMAGE, f"the latest frame from camera {camera!r} is {age_s:.3f} s "
                                      f"old (max_image_age_s is {max_age:g})")
        return latest

    # ----- sessions ----------------------------------------------------------------------------
    def _session_for(self, request: QueryRequest) -> tuple[_Session | None, bool]:
        """(session, is_new); a new one gets its frame later. Refusals for ended/misused ids."""
        sid = request.session_id
        if not sid:
            return None, False
        if not isinstance(sid, str):
            self._refuse(BAD_REQUEST, f"session_id must be a string, got {sid!r}")
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(sid)
            ended = self._ended_sessions.get(sid)
        if session is not None:
            if request.image is not None:
                self._refuse(BAD_REQUEST, f"session {sid!r} is bound to the frame of its first "
                                          "turn; a later turn cannot send an image")
            if request.camera and request.camera != session.frame.camera:
                self._refuse(BAD_REQUEST, f"session {sid!r} is bound to the frame of its first "
                                          f"turn (camera {session.frame.camera!r}); it cannot "
                                          f"switch to camera {request.camera!r}")
            return session, False
        if ended is not None:
            self._refuse(UNKNOWN_SESSION, f"session {sid!r} has ended ({ended}); its history is "
                                          "gone: use a new session_id")
        return _Session(sid, self._select_frame(request)), True

    def _history(self, session: _Session) -> list[tuple[str, str]]:
        """A snapshot of a session's finished turns (the last max_session_turns of them)."""
        with self._lock:
            return list(session.history[-self.settings.max_session_turns:])

    def _expire_sessions(self) -> None:
        """End sessions idle longer than session_ttl_s (caller holds _lock)."""
        now = self._monotonic()
        ttl = self.settings.session_ttl_s
        for sid in [s for s, sess in self._sessions.items()
                    if not sess.in_flight and now - sess.last_used > ttl]:
            self._end_session(sid, f"idle for more than session_ttl_s = {ttl:g} s")

    def _add_session(self, session: _Session) -> None:
        """Insert a new session, evicting the least recently used beyond max_sessions."""
        self._sessions[session.session_id] = session
        self._ended_sessions.pop(session.session_id, None)
        while len(self._sessions) > self.settings.max_sessions:
            oldest = next(iter(self._sessions))
            self._end_session(oldest, f"evicted: more than max_sessions = "
                                      f"{self.settings.max_sessions} sessions")

    def _end_session(self, sid: str, why: str) -> None:
        """Forget a session but remember that it ended (bounded)."""
        self._sessions.pop(sid, None)
        self._ended_sessions[sid] = why
        self._ended_sessions.move_to_end(sid)
        while len(self._ended_sessions) > ENDED_SESSIONS_REMEMBERED:
            self._ended_sessions.popitem(last=False)

    # ----- cancellation and aborts -------------------------------------------------------------
    def _cancel(self, job: Job) -> bool:
        """Job.cancel()."""
        with self._lock:
            if job._state == _DONE:
                return False
            if job._state == _RUNNING:
                job._cancel_requested = True
                return True
            self._queue.remove(job)
            outcome = self._finish_locked(job, CANCELLED, "cancelled while waiting",
                                          self._empty_answer(job))
            self._lock.notify_all()
        job._resolve(outcome)
        return True

    def _abort_jobs(self, why: str, stop_worker: bool,
                    join_timeout_s: float | None = None) -> None:
        """Resolve waiting jobs NOT_READY, stop the running one; optionally stop the worker."""
        with self._lock:
            waiting = list(self._queue)
            self._queue.clear()
            outcomes = [self._finish_locked(job, NOT_READY, why, self._empty_answer(job))
                        for job in waiting]
            running = self._running
            if running is not None and running._abort is None:  # the first reason stands
                running._abort = (NOT_READY, why)
            worker = None
            if stop_worker:
                self._worker_stop.set()
                worker, self._worker = self._worker, None
            self._lock.notify_all()
        for job, outcome in zip(waiting, outcomes, strict=True):
            job._resolve(outcome)
        if worker is not None and worker is not threading.current_thread():
            worker.join(join_timeout_s)
            if worker.is_alive():
                log.warning("the worker did not leave its step within %.1f s; not waiting",
                            join_timeout_s)

    def _timeout_message(self) -> str:
        """The TIMEOUT message."""
        return f"no answer within query_timeout_s = {self.settings.query_timeout_s:g} s"

    # ----- the worker --------------------------------------------------------------------------
    def _worker_loop(self, model: AnsweringModel, stop: threading.Event) -> None:
        """Run jobs in FIFO order; when idle, pre-encode each camera's newest frame."""
        while True:
            job: Job | None = None
            target: Frame | None = None
            with self._lock:
                while not stop.is_set():
                    if self._queue:
                        job = self._queue.popleft()
                        job._state = _RUNNING
                        self._running = job
                        break
                    target = self._preencode_target()
                    if target is not None:
                        self._preencoding = True
                        break
                    self._lock.notify_all()  # idle: wakes wait_idle()
                    self._lock.wait()
                if stop.is_set():
                    self._lock.notify_all()
                    return
            if job is not None:
                model.set_prefix_cache_mb(self.settings.prefix_cache_mb)  # the worker owns it
                self._run_job(job, model)
            elif target is not None:
                self._preencode(target, model)

    def _run_job(self, job: Job, model: AnsweringModel) -> None:
        """Run one job and resolve it; unexpected exceptions become MODEL_ERROR."""
        try:
            code, message, answer = self._infer(job, model)
        except Exception as exc:  # noqa: BLE001 - any inference failure must become an answer
            log.exception("inference failed for request %s", job.request_id)
            code, message, answer = MODEL_ERROR, f"{type(exc).__name__}: {exc}", None
        if answer is None:
            answer = self._empty_answer(job)
        with self._lock:
            if code == "" and job._session is not None:
                self._record_turn(job._session, job.request.question, answer.text)
            if self._running is job:  # a worker abandoned at unload must not clear its successor's
                self._running = None
            outcome = self._finish_locked(job, code, message, answer)
            self._lock.notify_all()
        job._resolve(outcome)

    def _infer(self, job: Job, model: AnsweringModel
               ) -> tuple[str, str, AnswerRecord | None]:
        """(error code or '', message, answer) for one job, on the worker thread."""
        start = job.started = self._monotonic()
        queue_ms = (start - job.accepted) * 1000.0
        if job._abort is not None:
            return job._abort[0], job._abort[1], None
        # Waiting jobs are timed out here, when taken. That is prompt: the queue is FIFO with one
        # timeout for all, so the job running ahead of this one passed its (earlier) deadline
        # first and stopped within a token.
        if start >= job.deadline:
            return TIMEOUT, self._timeout_message() + " (still waiting)", None
        # Camera frames are cached; an inline image only when a session will ask about it again.
        cacheable = job.request.image is None or job._session is not None
        encoded = self._cached(job.frame)
        vision_ms = 0.0
        if encoded is None:
            encoded = model.encode_image(job.frame.image)
            vision_ms = encoded.vision_ms
            if cacheable:
                self._store(job.frame, encoded)
        request = job.request
        history = self._history(job._session) if job._session is not None else []

        def on_text(text: str, n_tokens: int) -> None:
            if job._on_text is not None:
                try:
                    job._on_text(text, n_tokens)
                except Exception:  # noqa: BLE001 - a feedback failure must not end the answer
                    log.exception("on_text callback failed for request %s", job.request_id)

        def should_cancel() -> bool:
            if job._abort is not None:
                job._stop_reason = job._abort
            elif job._cancel_requested:
                job._stop_reason = (CANCELLED, "cancelled while generating")
            elif self._monotonic() >= job.deadline:
                job._stop_reason = (TIMEOUT, self._timeout_message() + " (while generating)")
            return job._stop_reason is not None

        try:
            result = model.ask(encoded, request.question, history,
                               generation=job.generation,
                               choices=tuple(request.choices), on_text=on_text,
                               should_cancel=should_cancel,
                               system_prompt=self.settings.model_system_prompt)
        except ContextOverflowError as exc:
            return CONTEXT_OVERFLOW, str(exc), None
        except RequestError as exc:  # the pipeline's input checks; anything else is MODEL_ERROR
            return BAD_REQUEST, str(exc), None
        end = self._monotonic()
        ttft = result.time_to_first_token_ms
        answer = self._empty_answer(job)
        answer.text = result.text
        answer.finish_reason = result.finish_reason
        answer.choices = list(result.choices)
        answer.choice_logprobs = list(result.choice_logprobs)
        answer.choice_probs = list(result.choice_probs)
        answer.choice_index = result.choice_index
        answer.tokens_generated = len(result.token_ids)
        answer.queue_ms = queue_ms
        answer.vision_ms = vision_ms
        answer.prefill_ms = result.prefill_ms
        answer.time_to_first_token_ms = ttft + vision_ms if ttft > 0 else 0.0
        answer.decode_tokens_per_s = result.decode_tokens_per_s
        answer.total_ms = (end - job.accepted) * 1000.0
        answer.prompt_tokens = result.prompt_tokens
        answer.reused_prefix_tokens = result.reused_prefix_tokens
        if result.finish_reason == "cancelled":
            code, message = job._stop_reason or (CANCELLED, "cancelled")
            return code, message, answer
        return "", "", answer

    def _empty_answer(self, job: Job) -> AnswerRecord:
        """An answer grounded on the job's frame with no text yet."""
        frame = job.frame
        answer = AnswerRecord(header=frame.header, stamp_ns=frame.stamp_ns,
                              frame_id=frame.frame_id, request_id=job.request_id,
                              camera=frame.camera, question=job.request.question,
                              model_id=self.model_id, session_id=job.session_id, frame=frame)
        now = self._monotonic()
        answer.queue_ms = ((job.started if job.started is not None else now)
                           - job.accepted) * 1000.0
        answer.total_ms = (now - job.accepted) * 1000.0
        return answer

    def _finish_locked(self, job: Job, code: str, message: str,
                       answer: AnswerRecord) -> QueryOutcome:
        """Mark a job done and count it (caller holds _lock and resolves it after release)."""
        job._state = _DONE
        if job._session is not None:
            job._session.in_flight -= 1
        if code:
            self._error_counts[code] += 1
            # Not a finished answer: stopped (by the client, a timeout or the node) or failed.
            answer.finish_reason = "cancelled" if code in _STOPPED else "error"
        else:
            self._answers += 1
            self._latency.append((answer.total_ms, answer.queue_ms, answer.decode_tokens_per_s))
        return QueryOutcome(success=not code, error_code=code, message=message, answer=answer)

    def _record_turn(self, session: _Session, question: str, answer: str) -> None:
        """Append a finished turn (caller holds _lock); an empty answer is not carried."""
        session.last_used = self._monotonic()
        answer = strip_image_token(answer.replace(STOP_STRING, ""))
        if not answer:
            log.debug("session %s: empty answer not added to the history", session.session_id)
            return
        session.history.append((question.strip(), answer))
        del session.history[:-self.settings.max_session_turns]

    # ----- image-prefix cache ------------------------------------------------------------------
    def _cached(self, frame: Frame) -> EncodedImage | None:
        """The cached encoding of this very frame (same identity and object), or None."""
        with self._cache_lock:
            entry = self._cache.get(frame.key)
            if entry is None or entry[0] is not frame:
                return None
            self._cache.move_to_end(frame.key)
            return entry[1]

    def _store(self, frame: Frame, encoded: EncodedImage) -> None:
        """Cache a frame's encoding (LRU)."""
        with self._cache_lock:
            self._cache[frame.key] = (frame, encoded)
            self._cache.move_to_end(frame.key)
            while len(self._cache) > self._cache_capacity:
                self._cache.popitem(last=False)

    def _clear_cache(self) -> None:
        """Drop every cached encoding."""
        with self._cache_lock:
            self._cache.clear()
            self._preencode_failed.clear()

    def is_cached(self, frame: Frame) -> bool:
        """Whether this frame's encoding is cached (its next question skips the vision tower)."""
        return self._cached(frame) is not None

    def _preencode_target(self) -> Frame | None:
        """A camera's newest frame that is not cached yet, when pre-encoding is on."""
        if not (self.settings.preencode_latest and self._active and self._model is not None):
            return None
        for buffer in self._buffers.values():
            frame = buffer.latest()
            if frame is None or self.is_cached(frame):
                continue
            with self._cache_lock:
                failed = self._preencode_failed.get(frame.camera) == frame.key
            if not failed:
                return frame
        return None

    def _preencode(self, frame: Frame, model: AnsweringModel) -> None:
        """Encode one frame into the cache (worker thread, between jobs)."""
        try:
            self._store(frame, model.encode_image(frame.image))
        except Exception:  # noqa: BLE001 - a background encode must not kill the worker
            log.exception("pre-encoding a frame of camera %r failed", frame.camera)
            with self._cache_lock:
                self._preencode_failed[frame.camera] = frame.key
        finally:
            with self._lock:
                self._preencoding = False
                self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job waits or runs and no pre-encoding is left; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: (not self._queue and self._running is None and not self._preencoding
                         and (self._worker is None or self._preencode_target() is None)),
                timeout)

    # ----- diagnostics -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot for /diagnostics: model, queue, cameras, latency, sessions, cache, errors."""
        now_ns = self._now_ns()
        settings = self.settings
        cameras = {}
        for name, buffer in self._buffers.items():
            latest = buffer.latest()
            last_rx = buffer.last_received_ns
            silent_s = None if last_rx is None else (now_ns - last_rx) / 1e9
            silent = silent_s is None or silent_s > settings.frame_buffer_s
            age_s = None if latest is None else (now_ns - latest.stamp_ns) / 1e9
            if latest is None:
                problem = "no frames yet"
            elif settings.max_image_age_s > 0 and age_s > settings.max_image_age_s:
                problem = (f"stale: the newest frame is {age_s:.1f} s old (max_image_age_s "
                           f"{settings.max_image_age_s:g}); queries get STALE_IMAGE")
            elif silent:
                problem = f"silent: nothing received for {silent_s:.1f} s"
            else:
                problem = ""
            cameras[name] = {
                "frames": len(buffer),
                "rate_hz": 0.0 if silent else buffer.rate_hz,
                "age_s": age_s,
                "buffer_mb": buffer.nbytes / _MIB,
                "refused_future": buffer.refused_future,
                "problem": problem,  # '' = receiving fresh frames
            }
        with self._cache_lock:
            cache_entries = len(self._cache)
        with self._lock:
            self._expire_sessions()
            model = self._model
            samples = list(self._latency)
            out: dict[str, Any] = {
                "model_loaded": model is not None,
                "loading": self._loading_since is not None,
                "active": self._active,
                "model_id": model.description if model is not None else "",
                "backend": model.backend_info() if model is not None else {},
                "builtin_toy": bool(model is not None and model.is_builtin_toy),
                "queue_depth": len(self._queue),
                "running": self._running is not None,
                "cameras": cameras,
                "sessions": len(self._sessions),
                "cache_entries": cache_entries,
                "prefix_cache": model.prefix_cache_stats() if model is not None else {},
                "answers": self._answers,
                "errors": dict(self._error_counts),
            }
        out["latency"] = _latency_stats(samples)
        return out


def _close(model: AnsweringModel) -> None:
    """Close a model that is no longer used; a failure is logged, never raised."""
    try:
        model.close()
    except Exception:  # noqa: BLE001 - freeing memory must not break an unload
        log.exception("closing the model %s failed", model.description)


def _latency_stats(samples: list[tuple[float, float, float]]) -> dict[str, float | int]:
    """count, total_ms mean/p50/p95/max, queue_ms mean, decode tokens/s mean over samples."""
    if not samples:
        return {"count": 0, "total_ms_mean": 0.0, "total_ms_p50": 0.0, "total_ms_p95": 0.0,
                "total_ms_max": 0.0, "queue_ms_mean": 0.0, "decode_tokens_per_s_mean": 0.0}
    arr = np.asarray(samples, dtype=np.float64)  # (N, 3): total_ms, queue_ms, tokens/s
    total = arr[:, 0]
    return {"count": len(samples), "total_ms_mean": float(total.mean()),
            "total_ms_p50": float(np.percentile(total, 50)),
            "total_ms_p95": float(np.percentile(total, 95)), "total_ms_max": float(total.max()),
            "queue_ms_mean": float(arr[:, 1].mean()),
            "decode_tokens_per_s_mean": float(arr[:, 2].mean())}


