"""The worker: the one thread that runs the model, job after job, and pre-encodes when idle.

Each loaded model gets a `Worker`. Its loop takes the oldest waiting job from the `JobQueue`
and answers it (`model.ask`), streaming tokens to the job's on_text and checking between tokens
whether to stop (cancel, timeout, the node stopping). With no job waiting and `preencode_latest`
on, it encodes each camera's newest frame into the feature cache, so that the first question
about it skips the vision tower. Every job it takes ends resolved: unexpected exceptions become
MODEL_ERROR, a RequestError from the pipeline BAD_REQUEST, a ContextOverflowError
CONTEXT_OVERFLOW. A stopped worker (unload) leaves its loop after its current step; one that
did not within the join timeout is abandoned and never clears its successor's running job.

Locking: the worker holds the queue's lock (`JobQueue.lock`, the core's lock) only to take
work, to wait for it, and to finish a job; never while the model runs, on_text is called or a
future resolves. `preencode_target_locked()` is called with that lock held and takes only leaf
locks (frame buffers, feature cache). The model is used by this thread alone, except for its
thread-safe `prefix_cache_stats()` and `backend_info()`, its attributes, and `prompt_ids()`
(tokenisation only), which `submit()` calls on the caller's thread to check the prompt's length.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..model.generation import ContextOverflowError
from ..model.prompt import RequestError
from ..pipeline import AnsweringModel, AskResult
from .features import FeatureCache
from .frames import Cameras, Frame, FrameDecodeError
from .jobs import Job, JobQueue, Stop
from .requests import BAD_IMAGE, BAD_REQUEST, CONTEXT_OVERFLOW, MODEL_ERROR, AnswerRecord
from .sessions import SessionTable
from .settings import AssistantSettings

log = logging.getLogger(__name__)

WORKER_THREAD = "llava_phi_worker"


class Worker:
    """One thread that runs one model's jobs in FIFO order and pre-encodes when idle."""

    def __init__(self, model: AnsweringModel, jobs: JobQueue, sessions: SessionTable,
                 features: FeatureCache, cameras: Cameras,
                 settings: Callable[[], AssistantSettings], monotonic: Callable[[], float],
                 model_id: Callable[[], str], may_preencode: Callable[[], bool]):
        self._model = model
        self._jobs = jobs
        self._lock = jobs.lock
        self._sessions = sessions
        self._features = features
        self._cameras = cameras
        self._settings = settings  # the core's current (live) settings
        self._monotonic = monotonic
        self._model_id = model_id
        self._may_preencode = may_preencode  # the node is active with this model (lock held)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=WORKER_THREAD, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop_locked(self) -> None:
        """Ask the loop to end after its current step (caller holds the lock and notifies)."""
        self._stop.set()

    def join(self, timeout_s: float | None) -> None:
        """Wait for the thread to end (not from the worker itself); warn if it did not."""
        if self._thread is threading.current_thread():
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the worker did not leave its step within %.1f s; not waiting",
                        timeout_s)

    def is_alive(self) -> bool:
        """Whether the thread still runs."""
        return self._thread.is_alive()

    def preencode_target_locked(self) -> Frame | None:
        """A camera's newest frame that is not cached yet, when pre-encoding is on."""
        if not (self._settings().preencode_latest and self._may_preencode()):
            return None
        return self._features.next_to_encode(self._cameras.latest_frames())

    # ----- the thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        """Run jobs in FIFO order; when idle, pre-encode each camera's newest frame."""
        while True:
            job: Job | None = None
            target: Frame | None = None
            with self._lock:
                while not self._stop.is_set():
                    job = self._jobs.take_locked()
                    if job is not None:
                        break
                    target = self.preencode_target_locked()
                    if target is not None:
                        self._jobs.preencoding = True
                        break
                    self._lock.notify_all()  # idle: wakes wait_idle()
                    self._lock.wait()
                if self._stop.is_set():
                    self._lock.notify_all()
                    return
            if job is not None:
                self._model.set_prefix_cache_mb(self._settings().prefix_cache_mb)  # owned here
                self._run(job)
            elif target is not None:
                self._preencode(target)

    def _run(self, job: Job) -> None:
        """Run one job and resolve it; unexpected exceptions become MODEL_ERROR."""
        try:
            code, message, answer = self._infer(job)
        except Exception as exc:  # noqa: BLE001 - any inference failure must become an answer
            log.exception("inference failed for request %s", job.request_id)
            code, message, answer = MODEL_ERROR, f"{type(exc).__name__}: {exc}", None
        if answer is None:
            answer = job.blank_answer(self._model_id(), self._monotonic())
        with self._lock:
            outcome = self._jobs.finish_locked(job, code, message, answer)
        job.resolve(outcome)

    def _infer(self, job: Job) -> tuple[str, str, AnswerRecord | None]:
        """(error code or '', message, answer) for one job."""
        settings = self._settings()
        start = self._monotonic()
        stop = job.begin(start, settings.timeout_message)
        if stop is not None:
            return stop[0], stop[1], None
        # Camera frames are cached; an inline image only when a session will ask about it again.
        cacheable = job.request.image is None or job.session is not None
        encoded = self._features.get(job.frame)
        vision_ms = 0.0
        if encoded is None:
            try:
                pixels = job.frame.image  # a frame that arrived compressed is decoded here
            except FrameDecodeError as exc:
                return BAD_IMAGE, str(exc), None
            encoded = self._model.encode_image(pixels)
            vision_ms = encoded.vision_ms
            if cacheable:
                self._features.put(job.frame, encoded)
        history = self._sessions.history(job.session) if job.session is not None else []

        def should_cancel() -> bool:
            return job.should_stop(self._monotonic(), lambda: self._settings().timeout_message)

        try:
            result = self._model.ask(encoded, job.request.question, history,
                                     generation=job.generation, choices=job.choices,
                                     on_text=job.stream, should_cancel=should_cancel,
                                     system_prompt=settings.model_system_prompt)
        except ContextOverflowError as exc:
            return CONTEXT_OVERFLOW, str(exc), None
        except RequestError as exc:  # the pipeline's input checks; anything else is MODEL_ERROR
            return BAD_REQUEST, str(exc), None
        answer = self._answer(job, result, vision_ms, start)
        if result.finish_reason == "cancelled":
            stopped: Stop = job.stop_reason
            return stopped[0], stopped[1], answer
        return "", "", answer

    def _answer(self, job: Job, result: AskResult, vision_ms: float,
                start: float) -> AnswerRecord:
        """The job's answer out of the model's result (vision_ms: 0 on a cache hit)."""
        end = self._monotonic()
        ttft = result.time_to_first_token_ms
        answer = job.blank_answer(self._model_id(), self._monotonic())
        answer.text = result.text
        answer.finish_reason = result.finish_reason
        answer.choices = list(result.choices)
        answer.choice_logprobs = list(result.choice_logprobs)
        answer.choice_probs = list(result.choice_probs)
        answer.choice_index = result.choice_index
        answer.tokens_generated = len(result.token_ids)
        answer.queue_ms = (start - job.accepted) * 1000.0
        answer.vision_ms = vision_ms
        answer.prefill_ms = result.prefill_ms
        answer.time_to_first_token_ms = ttft + vision_ms if ttft > 0 else 0.0
        answer.decode_tokens_per_s = result.decode_tokens_per_s
        answer.total_ms = (end - job.accepted) * 1000.0
        answer.prompt_tokens = result.prompt_tokens
        answer.reused_prefix_tokens = result.reused_prefix_tokens
        return answer

    def _preencode(self, frame: Frame) -> None:
        """Encode one frame into the cache (between jobs)."""
        try:
            self._features.put(frame, self._model.encode_image(frame.image))
        except FrameDecodeError as exc:  # the frame's data, not the model: no traceback
            log.warning("pre-encoding skipped a frame: %s", exc)
            self._features.mark_failed(frame)
        except Exception:  # noqa: BLE001 - a background encode must not kill the worker
            log.exception("pre-encoding a frame of camera %r failed", frame.camera)
            self._features.mark_failed(frame)
        finally:
            with self._lock:
                self._jobs.preencoding = False
                self._lock.notify_all()
