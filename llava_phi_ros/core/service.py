"""`AssistantCore`: the service core's front: it owns the parts and does what needs several.

The parts: camera buffers (frames.py), the session table (sessions.py), the image feature
cache (features.py), statistics (stats.py), the job queue (jobs.py), the model's lifecycle and
its worker (lifecycle.py, worker.py). Here: unloading (jobs, sessions and caches go with the
model), live settings, frame intake, accepting a request (`submit`: the checks of requests.py
in their documented order, then a Job in the queue) and the diagnostics snapshot. The threading
contract the ROS node relies on is in the package docstring (`llava_phi_ros.core`).

Locking: `self._lock` is the job queue's Condition (jobs.py), which also guards the model
lifecycle (lifecycle.py) and `self.settings` replacement. Accepting a job is one step under it:
the model is still loaded and the node active, the queue has room, the session turn begins, the
job is queued; so a request is never accepted after the node stopped serving. `_submit_lock`
serialises `submit()` (two first turns of one new session cannot both create it); it is taken
before `_lock`, never with it held. `self.settings` is replaced whole, never mutated, so it is
read without a lock. Every other lock (frame buffers, sessions, feature cache, statistics) is a
leaf that may be taken with `_lock` held. Nothing holds `_lock` while a model loads, runs or is
closed, or while a future resolves; `stats()` calls the model's cheap thread-safe getters
(`backend_info`, `prefix_cache_stats`) with it held, so that an unload (which takes the model
under it before closing it) cannot close the model under them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import parameters
from ..pipeline import AnsweringModel
from .features import FeatureCache
from .frames import Cameras, Frame, FrameBuffer
from .jobs import Job, JobQueue
from .lifecycle import ModelLifecycle, close_model
from .requests import (
    MODEL_ERROR,
    NOT_READY,
    QueryRefused,
    QueryRequest,
    check_prompt,
    check_request,
    check_session_turn,
    select_frame,
    session_id_of,
)
from .sessions import Session, SessionTable
from .settings import AssistantSettings
from .stats import Stats, camera_stats, latency_stats
from .worker import Worker

log = logging.getLogger(__name__)


class AssistantCore:
    """Frame buffers, request validation, one inference worker, sessions, caching, statistics."""

    def __init__(self, settings: AssistantSettings, now_ns: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings.validate()
        self._now_ns = now_ns
        self._monotonic = monotonic
        self._cameras = Cameras(settings.cameras, settings.frame_buffer_s,
                                settings.frame_buffer_max_mb)
        self._sessions = SessionTable(monotonic, settings.session_ttl_s, settings.max_sessions,
                                      settings.max_session_turns)
        self._features = FeatureCache(capacity=2 * len(settings.cameras) + 2)
        self._stats = Stats()
        self._jobs = JobQueue(self._stats, self._sessions, monotonic, lambda: self.model_id)
        self._lock = self._jobs.lock
        self._submit_lock = threading.Lock()
        self._life = ModelLifecycle(self._jobs, self._make_worker, monotonic)

    def _make_worker(self, model: AnsweringModel) -> Worker:
        """The worker of a newly loaded model (called with the lock held; not started)."""
        return Worker(model, self._jobs, self._sessions, self._features, self._cameras,
                      lambda: self.settings, self._monotonic, lambda: self.model_id,
                      self._life.may_preencode_locked)

    # ----- model lifecycle ---------------------------------------------------------------------
    def load_model(self, loader: Callable[[], AnsweringModel]) -> None:
        """Load a model (on the calling thread; exceptions propagate) and start the worker."""
        self._life.load(loader)

    def start_loading(self, loader: Callable[[], AnsweringModel],
                      on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Load on a background thread; meanwhile queries get NOT_READY ("loading").

        on_done(None) or on_done(the exception) runs on that thread once the load ends, unless
        unload_model() abandoned it first (a model that arrives after that is dropped).
        """
        self._life.start_loading(loader, on_done)

    def unload_model(self, join_timeout_s: float | None = None) -> None:
        """Stop the worker (waiting/running jobs resolve NOT_READY), close the model (its device
        memory is freed) and clear the caches; abandon a load in progress. Sessions end too
        (their history came from the model)."""
        model = self._life.take_model()  # first: from here no request is accepted
        self._life.abort_jobs("the model was unloaded", stop_worker=True,
                              join_timeout_s=join_timeout_s)
        self._sessions.end_all("the model was unloaded")
        self._features.clear()
        if model is not None:
            close_model(model)

    def shutdown(self, why: str = "the node is shutting down",
                 join_timeout_s: float | None = None) -> None:
        """Stop serving: waiting and running jobs resolve NOT_READY (`why`); unloads the model.

        join_timeout_s bounds the wait for the worker to leave its current step (None: wait).
        """
        self._life.set_active(False)
        self._life.abort_jobs(why, stop_worker=False)
        self.unload_model(join_timeout_s)
        self._life.join_loader(join_timeout_s)  # an abandoned load drops its model when it ends

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
            self._sessions.set_limits(settings.session_ttl_s, settings.max_sessions,
                                      settings.max_session_turns)
            self._lock.notify_all()  # preencode_latest may have been switched on

    def set_active(self, active: bool) -> None:
        """Accept queries or not; deactivating resolves waiting and running jobs NOT_READY."""
        self._life.set_active(active)
        if not active:
            self._life.abort_jobs("the node was deactivated", stop_worker=False)

    @property
    def model_loaded(self) -> bool:
        """Whether a model is loaded."""
        return self._life.model is not None

    @property
    def loading(self) -> bool:
        """Whether start_loading() is still loading a model."""
        return self._life.loading_since is not None

    @property
    def active(self) -> bool:
        """Whether queries are accepted (given a loaded model)."""
        return self._life.active

    @property
    def model_id(self) -> str:
        """The loaded model's id ('' when none)."""
        model = self._life.model
        return model.description if model is not None else ""

    @property
    def cameras(self) -> list[str]:
        """The configured camera names, the default (first) one first."""
        return list(self.settings.cameras)

    # ----- frames ------------------------------------------------------------------------------
    def add_frame(self, frame: Frame) -> None:
        """Buffer a camera frame; never waits for inference (FrameRefused: see Cameras.add)."""
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
        self._features.clear()

    def is_cached(self, frame: Frame) -> bool:
        """Whether this frame's encoding is cached (its next question skips the vision tower)."""
        return self._features.get(frame) is not None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job waits or runs and no pre-encoding is left; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self._jobs.idle_locked() and (
                    self._life.worker is None
                    or self._life.worker.preencode_target_locked() is None),
                timeout)

    # ----- requests ----------------------------------------------------------------------------
    def submit(self, request: QueryRequest,
               on_text: Callable[[str, int], None] | None = None) -> Job:
        """Accept a request (a Job) or refuse it at once (QueryRefused with the error code).

        on_text(text_so_far, tokens_generated) is called on the worker thread after each token.
        Every refusal is counted in the statistics.
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
        life = self._life
        with self._lock:
            model, active, loading_since = life.model, life.active, life.loading_since
        if model is None and loading_since is not None:
            raise QueryRefused(NOT_READY, f"the model is still loading "
                                          f"({self._monotonic() - loading_since:.1f} s so far)")
        if model is None:
            raise QueryRefused(NOT_READY, "no model is loaded")
        if not active:
            raise QueryRefused(NOT_READY, "the node is not active")
        settings = self.settings
        checked = check_request(request, settings, model.max_context)
        sid = session_id_of(request)
        session: Session | None = None
        if sid:
            session, ended = self._sessions.find(sid)
            check_session_turn(request, session.frame if session is not None else None, ended)
        if session is not None:
            frame = session.frame
            history = self._sessions.history(session)
        else:
            frame = select_frame(request, self._cameras, settings, self._now_ns())
            history = []
            if sid:
                session = Session(sid, frame)  # added to the table once accepted
        check_prompt(model, request.question, history, settings.model_system_prompt)
        request_id = request.request_id or str(uuid.uuid4())
        with self._lock:
            if not life.serving_locked(model):
                raise QueryRefused(NOT_READY, "the node stopped serving")
            self._jobs.check_room_locked(self.settings.max_pending_queries)
            if session is not None:
                self._sessions.begin_turn(session)
            job = Job(self._jobs, request, request_id, frame, checked.generation,
                      checked.choices, self._monotonic(), self.settings.query_timeout_s, on_text,
                      session)
            self._jobs.push_locked(job)
        return job

    # ----- diagnostics -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot for /diagnostics: model, queue, cameras, latency, sessions, cache, errors."""
        cameras = camera_stats(self._cameras, self._now_ns(), self.settings)
        cache_entries = len(self._features)
        with self._lock:
            self._sessions.expire()
            model = self._life.model
            answers, errors, samples = self._stats.snapshot()
            out: dict[str, Any] = {
                "model_loaded": model is not None,
                "loading": self._life.loading_since is not None,
                "active": self._life.active,
                "model_id": model.description if model is not None else "",
                "backend": model.backend_info() if model is not None else {},
                "builtin_toy": bool(model is not None and model.is_builtin_toy),
                "queue_depth": self._jobs.depth,
                "running": self._jobs.running is not None,
                "cameras": cameras,
                "sessions": len(self._sessions),
                "cache_entries": cache_entries,
                "prefix_cache": model.prefix_cache_stats() if model is not None else {},
                "answers": answers,
                "errors": errors,
            }
        out["latency"] = latency_stats(samples)
        return out

