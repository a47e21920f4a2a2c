"""The ROS-free service core of the assistant node: frames in, grounded answers out.

It holds per-camera frame buffers, validates requests (accepted or refused at once, with the
error codes of srv/Query.srv), runs the model on ONE worker thread with a bounded FIFO of
waiting jobs, and handles cancellation, timeouts, sessions, per-frame image-prefix caching and
timing statistics. Its parts move to `llava_phi_ros/core/` (so far: settings, frames, request
checks, statistics). The ROS layer (`llava_phi_ros/ros/`) converts messages to `Frame` /
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

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from . import parameters
from .core.frames import MIB, Cameras, Frame, FrameBuffer, FrameRefused, image_problem
from .core.requests import (
    BAD_IMAGE,
    BAD_REQUEST,
    BUSY,
    CANCELLED,
    CONTEXT_OVERFLOW,
    ERROR_CODES,
    MODEL_ERROR,
    NO_IMAGE,
    NOT_READY,
    STALE_IMAGE,
    STAMP_OUT_OF_RANGE,
    TIMEOUT,
    UNKNOWN_CAMERA,
    UNKNOWN_SESSION,
    AnswerRecord,
    QueryOutcome,
    QueryRefused,
    QueryRequest,
    check_prompt,
    check_request,
    check_session_turn,
    outcome_of,
    select_frame,
    session_id_of,
)
from .core.settings import AssistantSettings
from .core.stats import LATENCY_WINDOW, Stats, camera_stats, latency_stats
from .model.generation import ContextOverflowError, GenerationConfig
from .model.prompt import STOP_STRING, RequestError, strip_image_token
from .pipeline import AnsweringModel, EncodedImage

__all__ = [  # the names the node and tests use, defined in llava_phi_ros/core/ now
    "BAD_IMAGE", "BAD_REQUEST", "BUSY", "CANCELLED", "CONTEXT_OVERFLOW", "ERROR_CODES",
    "LATENCY_WINDOW", "LOADER_THREAD", "MIB", "MODEL_ERROR", "NOT_READY", "NO_IMAGE",
    "STALE_IMAGE", "STAMP_OUT_OF_RANGE", "TIMEOUT", "UNKNOWN_CAMERA", "UNKNOWN_SESSION",
    "AnswerRecord", "AssistantCore", "AssistantSettings", "Frame", "FrameBuffer", "FrameRefused",
    "Job", "QueryOutcome", "QueryRefused", "QueryRequest", "image_problem",
]

log = logging.getLogger(__name__)

LOADER_THREAD = "llava_phi_loader"  # the name of start_loading()'s thread
ENDED_SESSIONS_REMEMBERED = 1024  # expired/evicted session ids that still get UNKNOWN_SESSION


_QUEUED, _RUNNING, _DONE = "queued", "running", "done"


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
                 generation: GenerationConfig, choices: tuple[str, ...], accepted: float,
                 on_text: Callable[[str, int], None] | None, session: _Session | None):
        self.request = request
        self.request_id = request_id
        self.frame = frame
        self.accepted = accepted  # steady clock, seconds
        self.deadline = accepted + core.settings.query_timeout_s
        self.started: float | None = None  # steady clock, when the worker took it
        self.generation = generation
        self.choices = choices  # checked and stripped
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
        self._cameras = Cameras(settings.cameras, settings.frame_buffer_s,
                                settings.frame_buffer_max_mb)
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
        self._stats = Stats()

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
        self._cameras.set_bounds(settings.frame_buffer_s, settings.frame_buffer_max_mb)
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
        node clock than max_future_stamp_s (see Cameras.add).
        """
        self._cameras.add(frame, self._now_ns(), self.settings.max_future_stamp_s)
        if self.settings.preencode_latest:
            with self._lock:  # short: only wakes an idle worker
                self._lock.notify_all()

    def frame_buffer(self, camera: str) -> FrameBuffer:
        """The buffer of one configured camera (KeyError otherwise)."""
        return self._cameras[camera]

    def clear_frames(self) -> None:
        """Drop every buffered frame."""
        self._cameras.clear()

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
            except QueryRefused as refused:
                self._stats.count_error(refused.code)
                raise
            except Exception as exc:  # noqa: BLE001 - a request must end in a code, never a crash
                log.exception("checking a request failed")
                self._stats.count_error(MODEL_ERROR)
                raise QueryRefused(MODEL_ERROR, f"checking the request failed: "
                                                f"{type(exc).__name__}: {exc}") from exc

    def _submit(self, request: QueryRequest,
                on_text: Callable[[str, int], None] | None) -> Job:
        """submit() under the submit lock: the checks in the documented order, then enqueue."""
        with self._lock:
            model, active, loading_since = self._model, self._active, self._loading_since
        if model is None and loading_since is not None:
            raise QueryRefused(NOT_READY, f"the model is still loading "
                                          f"({self._monotonic() - loading_since:.1f} s so far)")
        if model is None:
            raise QueryRefused(NOT_READY, "no model is loaded")
        if not active:
            raise QueryRefused(NOT_READY, "the node is not active")
        checked = check_request(request, self.settings, model.max_context)
        session, is_new_session = self._session_for(request)
        frame = (session.frame if session is not None
                 else select_frame(request, self._cameras, self.settings, self._now_ns()))
        history = self._history(session) if session is not None else []
        check_prompt(model, request.question, history, self.settings.model_system_prompt)
        request_id = request.request_id or str(uuid.uuid4())
        with self._lock:
            if self._model is not model or not self._active:
                raise QueryRefused(NOT_READY, "the node stopped serving")
            in_system = len(self._queue) + (1 if self._running is not None else 0)
            if in_system >= self.settings.max_pending_queries + 1:
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
            job = Job(self, request, request_id, frame, checked.generation, checked.choices, now,
                      on_text, session)
            self._queue.append(job)
            self._lock.notify_all()
        return job

    # ----- sessions ----------------------------------------------------------------------------
    def _session_for(self, request: QueryRequest) -> tuple[_Session | None, bool]:
        """(session, is_new); a new one gets its frame later. Refusals for ended/misused ids."""
        sid = session_id_of(request)
        if not sid:
            return None, False
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(sid)
            ended = self._ended_sessions.get(sid)
        check_session_turn(request, session.frame if session is not None else None, ended)
        if session is not None:
            return session, False
        return _Session(sid, select_frame(request, self._cameras, self.settings,
                                          self._now_ns())), True

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
                               choices=job.choices, on_text=on_text,
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
            self._stats.count_error(code)
        else:
            self._stats.count_answer(answer)
        return outcome_of(code, message, answer)

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
        for frame in self._cameras.latest_frames():
            if self.is_cached(frame):
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
        cameras = camera_stats(self._cameras, self._now_ns(), self.settings)
        with self._cache_lock:
            cache_entries = len(self._cache)
        with self._lock:
            self._expire_sessions()
            model = self._model
            answers, errors, samples = self._stats.snapshot()
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
                "answers": answers,
                "errors": errors,
            }
        out["latency"] = latency_stats(samples)
        return out


def _close(model: AnsweringModel) -> None:
    """Close a model that is no longer used; a failure is logged, never raised."""
    try:
        model.close()
    except Exception:  # noqa: BLE001 - freeing memory must not break an unload
        log.exception("closing the model %s failed", model.description)

