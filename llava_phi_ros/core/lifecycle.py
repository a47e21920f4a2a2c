"""The model's lifecycle in the service core: loaded or loading, active or not, and its worker.

`ModelLifecycle` holds the model (one at a time), a background load in progress, whether the
node accepts queries, and the worker thread of the loaded model. Loading happens on the
calling thread (`load`) or a loader thread (`start_loading`, queries meanwhile NOT_READY
"loading"); a load that `take_model()` abandoned drops its model when it arrives. Stopping
(`abort_jobs`) resolves waiting jobs NOT_READY, asks the running one to stop, and optionally
stops the worker.

Locking: every field here but `loader` is guarded by the core's lock (`JobQueue.lock`, given
at construction), so that "is a model loaded and the node active" and putting a job in the
queue are one step for `AssistantCore.submit()`. They are written only with it held; readers
that need one attribute (the core's properties) read it without. Methods named `*_locked` are
called with it held. `loader` belongs to the thread that drives the lifecycle (the node's, via
start_loading and shutdown).
It is never held while a model loads (the loader runs unlocked), while a worker is joined, or
while `on_done` or a job's callbacks run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..pipeline import AnsweringModel
from .jobs import JobQueue
from .worker import Worker

log = logging.getLogger(__name__)

LOADER_THREAD = "llava_phi_loader"  # the name of start_loading()'s thread


class ModelLifecycle:
    """The loaded model, a load in progress, the active flag and the model's worker."""

    def __init__(self, jobs: JobQueue, make_worker: Callable[[AnsweringModel], Worker],
                 monotonic: Callable[[], float]):
        self._jobs = jobs
        self._lock = jobs.lock
        self._make_worker = make_worker
        self._monotonic = monotonic
        self.model: AnsweringModel | None = None
        self.loading_since: float | None = None  # steady clock, while start_loading() runs
        self._load_token: object | None = None  # identifies the current background load
        self.loader: threading.Thread | None = None
        self.active = False
        self.worker: Worker | None = None

    def load(self, loader: Callable[[], AnsweringModel]) -> None:
        """Load a model (on the calling thread; exceptions propagate) and start the worker."""
        with self._lock:
            self._check_no_model_locked()
        model = loader()
        with self._lock:
            self._install_locked(model)

    def start_loading(self, loader: Callable[[], AnsweringModel],
                      on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Load on a background thread; on_done(None or the exception) runs on it at the end,
        unless take_model() abandoned the load first (its model is then closed and dropped)."""
        token = object()
        with self._lock:
            self._check_no_model_locked()
            self.loading_since, self._load_token = self._monotonic(), token

        def run() -> None:
            model, error = None, None
            try:
                model = loader()
            except Exception as exc:  # noqa: BLE001 - any load failure goes to on_done
                error = exc
            with self._lock:
                current = self._load_token is token
                if current:
                    self.loading_since = self._load_token = None
                    if model is not None:
                        self._install_locked(model)
            if not current and model is not None:
                close_model(model)  # abandoned: nobody will use it
            if current and on_done is not None:
                on_done(error)

        self.loader = threading.Thread(target=run, name=LOADER_THREAD, daemon=True)
        self.loader.start()

    def take_model(self) -> AnsweringModel | None:
        """Forget the model (returned, for the caller to close) and abandon a load: from here
        no load installs and no request is accepted."""
        with self._lock:
            model, self.model = self.model, None
            self.loading_since = self._load_token = None
        return model

    def set_active(self, active: bool) -> None:
        """Accept queries or not (wakes the worker: pre-encoding depends on it)."""
        with self._lock:
            self.active = bool(active)
            self._lock.notify_all()

    def serving_locked(self, model: AnsweringModel) -> bool:
        """Whether `model` is still the loaded one and the node active."""
        return self.model is model and self.active

    def may_preencode_locked(self) -> bool:
        """Whether the worker may pre-encode frames: active with a model."""
        return self.active and self.model is not None

    def abort_jobs(self, why: str, stop_worker: bool,
                   join_timeout_s: float | None = None) -> None:
        """Resolve waiting jobs NOT_READY, stop the running one; optionally stop the worker
        (join_timeout_s bounds the wait for it to leave its current step; None: wait)."""
        with self._lock:
            settled = self._jobs.abort_locked(why)
            worker = None
            if stop_worker:
                worker, self.worker = self.worker, None
                if worker is not None:
                    worker.stop_locked()
            self._lock.notify_all()
        for job, outcome in settled:
            job.resolve(outcome)
        if worker is not None:
            worker.join(join_timeout_s)

    def join_loader(self, timeout_s: float | None) -> None:
        """Wait for a loader thread (not from itself) to end."""
        loader = self.loader
        if loader is not None and loader is not threading.current_thread():
            loader.join(timeout_s)

    def _check_no_model_locked(self) -> None:
        """RuntimeError while a model is loaded or loading."""
        if self.model is not None or self.loading_since is not None:
            raise RuntimeError("a model is already loaded or loading; unload it first")

    def _install_locked(self, model: AnsweringModel) -> None:
        """Adopt a loaded model and start its worker."""
        self.model = model
        self.worker = self._make_worker(model)
        self.worker.start()
        self._lock.notify_all()


def close_model(model: AnsweringModel) -> None:
    """Close a model that is no longer used; a failure is logged, never raised."""
    try:
        model.close()
    except Exception:  # noqa: BLE001 - freeing memory must not break an unload
        log.exception("closing the model %s failed", model.description)
