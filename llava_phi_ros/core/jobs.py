"""Accepted requests (`Job`) and the queue that holds them until the worker is done with them.

A job's life: QUEUED (waiting in FIFO order) -> RUNNING (the worker took it) -> DONE (its
future holds a QueryOutcome). Every accepted job reaches DONE exactly once and its future is
resolved with an outcome, never an exception: by the worker, by `Job.cancel()` while it waits,
or by `JobQueue.abort_locked()` when the node stops serving (waiting jobs NOT_READY at once, the
running one asked to stop between tokens). Finishing a job also ends its session turn and
counts it in the statistics.

Locking: `JobQueue.lock` (a Condition) is the core's lock. It guards the waiting deque, the
running job, the pre-encoding flag and each Job's state fields (`_state`, `_cancel_requested`,
`_abort`); `AssistantCore` keeps its lifecycle state under it too. Methods named `*_locked` are
called with it held; `cancel()` takes it itself. With it held, only leaf locks are taken (the
session table's, the statistics', the feature cache's, the frame buffers'); nothing runs the
model, and no future is resolved: done callbacks run synchronously inside `set_result`, so
`Job.resolve()` is called after the lock is released. Every change that another thread may wait
for is followed by `notify_all()`. The worker reads `_cancel_requested` and `_abort` between
tokens without the lock: each is set once, and a stale read only delays the stop by a token.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from ..model.generation import GenerationConfig
from .frames import Frame
from .requests import (
    BUSY,
    CANCELLED,
    NOT_READY,
    TIMEOUT,
    AnswerRecord,
    QueryOutcome,
    QueryRefused,
    QueryRequest,
    outcome_of,
)
from .sessions import Session, SessionTable
from .stats import Stats

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE = "queued", "running", "done"
Stop = tuple[str, str]  # (error code, message) of a job stopped before its answer was complete


class Job:
    """An accepted request: its fixed frame and a future resolved with a QueryOutcome."""

    def __init__(self, queue: JobQueue, request: QueryRequest, request_id: str, frame: Frame,
                 generation: GenerationConfig, choices: tuple[str, ...], accepted: float,
                 timeout_s: float, on_text: Callable[[str, int], None] | None = None,
                 session: Session | None = None):
        self.request = request
        self.request_id = request_id
        self.frame = frame
        self.generation = generation
        self.choices = choices  # checked and stripped
        self.session = session
        self.accepted = accepted  # steady clock, seconds
        self.deadline = accepted + timeout_s
        self.started: float | None = None  # steady clock, when the worker took it
        self.future: Future[QueryOutcome] = Future()
        # RUNNING from the start, so Future.cancel() cannot bypass the queue; use Job.cancel().
        self.future.set_running_or_notify_cancel()
        self._queue = queue
        self._on_text = on_text
        self._state = QUEUED  # guarded by the queue's lock, as are the next two
        self._cancel_requested = False
        self._abort: Stop | None = None  # set when the node stops serving
        self._stop_reason: Stop | None = None  # worker thread only

    @property
    def session_id(self) -> str:
        """The request's session id ('' when none)."""
        return self.request.session_id

    @property
    def state(self) -> str:
        """QUEUED, RUNNING or DONE."""
        return self._state

    def cancel(self) -> bool:
        """Cancel: a waiting job resolves CANCELLED at once, a running one between tokens.

        Returns False when the job had already finished.
        """
        return self._queue.cancel(self)

    def done(self) -> bool:
        """Whether the outcome is known."""
        return self.future.done()

    def result(self, timeout: float | None = None) -> QueryOutcome:
        """Wait for the outcome (concurrent.futures.TimeoutError after timeout seconds)."""
        return self.future.result(timeout)

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call fn(job) once resolved (on the resolving thread, or now if already done)."""
        self.future.add_done_callback(lambda _future: fn(self))

    # ----- the worker's side (worker thread, no lock) ------------------------------------------
    def begin(self, now: float, timeout_message: str) -> Stop | None:
        """The worker starts the job at `now`; why it must not run (stopped meanwhile, or its
        deadline passed while it waited), or None."""
        self.started = now
        if self._abort is not None:
            return self._abort
        # Waiting jobs time out here, when taken. That is prompt: the queue is FIFO with one
        # timeout for all, so the job running ahead of this one passed its (earlier) deadline
        # first and stopped within a token.
        if now >= self.deadline:
            return TIMEOUT, timeout_message + " (still waiting)"
        return None

    def should_stop(self, now: float, timeout_message: Callable[[], str]) -> bool:
        """Between tokens: whether to stop (aborted, cancelled, past the deadline), noting why."""
        if self._abort is not None:
            self._stop_reason = self._abort
        elif self._cancel_requested:
            self._stop_reason = (CANCELLED, "cancelled while generating")
        elif now >= self.deadline:
            self._stop_reason = (TIMEOUT, timeout_message() + " (while generating)")
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> Stop:
        """Why a stopped generation stopped."""
        return self._stop_reason or (CANCELLED, "cancelled")

    def stream(self, text: str, n_tokens: int) -> None:
        """Hand the answer so far to on_text; a failing callback is logged, never raised."""
        if self._on_text is None:
            return
        try:
            self._on_text(text, n_tokens)
        except Exception:  # noqa: BLE001 - a feedback failure must not end the answer
            log.exception("on_text callback failed for request %s", self.request_id)

    def blank_answer(self, model_id: str, now: float) -> AnswerRecord:
        """An answer grounded on the job's frame with no text yet, timed at `now`."""
        frame = self.frame
        answer = AnswerRecord(header=frame.header, stamp_ns=frame.stamp_ns,
                              frame_id=frame.frame_id, request_id=self.request_id,
                              camera=frame.camera, question=self.request.question,
                              model_id=model_id, session_id=self.session_id, frame=frame)
        started = self.started if self.started is not None else now
        answer.queue_ms = (started - self.accepted) * 1000.0
        answer.total_ms = (now - self.accepted) * 1000.0
        return answer

    def resolve(self, outcome: QueryOutcome) -> None:
        """Set the outcome; never called with the queue's lock held (callbacks run here)."""
        try:
            self.future.set_result(outcome)
        except InvalidStateError:
            log.error("job %s was resolved twice; kept the first outcome, dropped %s",
                      self.request_id, outcome.error_code or "success")


class JobQueue:
    """The waiting jobs (FIFO), the running one, and the lock and condition that guard them."""

    def __init__(self, stats: Stats, sessions: SessionTable, monotonic: Callable[[], float],
                 model_id: Callable[[], str]):
        self.lock = threading.Condition()
        self._stats = stats
        self._sessions = sessions
        self._monotonic = monotonic
        self._model_id = model_id
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self.preencoding = False  # the worker is encoding a frame in the background

    @property
    def depth(self) -> int:
        """How many jobs wait."""
        return len(self._waiting)

    @property
    def running(self) -> Job | None:
        """The job the worker runs, or None."""
        return self._running

    def idle_locked(self) -> bool:
        """No job waits or runs and nothing is being pre-encoded."""
        return not self._waiting and self._running is None and not self.preencoding

    def check_room_locked(self, max_pending: int) -> None:
        """BUSY when max_pending jobs wait already (one more may run)."""
        in_system = len(self._waiting) + (1 if self._running is not None else 0)
        if in_system >= max_pending + 1:
            raise QueryRefused(BUSY, f"{len(self._waiting)} queries are waiting (the limit, "
                                     f"max_pending_queries, is {max_pending}); try later")

    def push_locked(self, job: Job) -> None:
        """Append an accepted job; wakes the worker."""
        self._waiting.append(job)
        self.lock.notify_all()

    def take_locked(self) -> Job | None:
        """The oldest waiting job, now RUNNING, or None."""
        if not self._waiting:
            return None
        job = self._running = self._waiting.popleft()
        job._state = RUNNING
        return job

    def finish_locked(self, job: Job, code: str, message: str,
                      answer: AnswerRecord) -> QueryOutcome:
        """Mark a job DONE, end its session turn, count it; the caller resolves it after
        releasing the lock."""
        job._state = DONE
        if self._running is job:  # a worker abandoned at unload must not clear its successor's
            self._running = None
        if job.session is not None:
            self._sessions.end_turn(job.session, None if code else (job.request.question,
                                                                    answer.text))
        if code:
            self._stats.count_error(code)
        else:
            self._stats.count_answer(answer)
        self.lock.notify_all()
        return outcome_of(code, message, answer)

    def abort_locked(self, why: str) -> list[tuple[Job, QueryOutcome]]:
        """Finish every waiting job NOT_READY (`why`) and ask the running one to stop; returns
        the finished jobs with their outcomes, for the caller to resolve after releasing."""
        waiting = list(self._waiting)
        self._waiting.clear()
        settled = [(job, self.finish_locked(job, NOT_READY, why, self._blank(job)))
                   for job in waiting]
        running = self._running
        if running is not None and running._abort is None:  # the first reason stands
            running._abort = (NOT_READY, why)
        self.lock.notify_all()
        return settled

    def cancel(self, job: Job) -> bool:
        """Job.cancel(): a waiting job is finished CANCELLED now, a running one is flagged."""
        with self.lock:
            if job._state == DONE:
                return False
            if job._state == RUNNING:
                job._cancel_requested = True
                return True
            self._waiting.remove(job)
            outcome = self.finish_locked(job, CANCELLED, "cancelled while waiting",
                                         self._blank(job))
        job.resolve(outcome)
        return True

    def _blank(self, job: Job) -> AnswerRecord:
        return job.blank_answer(self._model_id(), self._monotonic())
