"""llava_phi_ros/core/lifecycle.py on its own: loading (here and in the background), an
abandoned load, the active flag, and stopping the jobs and the worker. A scripted model
(test/core_helpers.py) and a real Worker; no weights, no ROS."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from llava_phi_ros.core import requests as R
from llava_phi_ros.core.features import FeatureCache
from llava_phi_ros.core.frames import Cameras
from llava_phi_ros.core.jobs import Job, JobQueue
from llava_phi_ros.core.lifecycle import LOADER_THREAD, ModelLifecycle, close_model
from llava_phi_ros.core.requests import QueryRequest
from llava_phi_ros.core.sessions import SessionTable
from llava_phi_ros.core.settings import AssistantSettings
from llava_phi_ros.core.stats import Stats
from llava_phi_ros.core.worker import Worker
from llava_phi_ros.model.generation import GenerationConfig

from .core_helpers import T0_NS, WAIT, ScriptedModel, SteadyClock, frame


class Rig:
    """A lifecycle over a job queue whose workers run scripted models."""

    def __init__(self) -> None:
        self.clock = SteadyClock()
        self.sessions = SessionTable(self.clock, 100.0, 10, 10)
        self.jobs = JobQueue(Stats(), self.sessions, self.clock, lambda: "scripted/model")
        self.features = FeatureCache(4)
        self.cameras = Cameras(["camera"], 10.0, 100.0)
        self.settings = AssistantSettings()
        self.life = ModelLifecycle(self.jobs, self.make_worker, self.clock)

    def make_worker(self, model: ScriptedModel) -> Worker:
        return Worker(model, self.jobs, self.sessions, self.features, self.cameras,
                      lambda: self.settings, self.clock, lambda: "scripted/model",
                      self.life.may_preencode_locked)

    def submit(self, question: str = "Q?") -> Job:
        job = Job(self.jobs, QueryRequest(question), question, frame(T0_NS),
                  GenerationConfig(max_new_tokens=3), (), self.clock(), 30.0)
        with self.jobs.lock:
            self.jobs.push_locked(job)
        return job


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.life.take_model()
    r.life.abort_jobs("test over", stop_worker=True, join_timeout_s=WAIT)
    r.life.join_loader(WAIT)


def test_load_installs_the_model_and_starts_its_worker(rig: Rig) -> None:
    model = ScriptedModel()
    assert rig.life.worker is None and not rig.life.may_preencode_locked()
    rig.life.load(lambda: model)
    assert rig.life.model is model and rig.life.worker.is_alive()
    with pytest.raises(RuntimeError, match="already loaded or loading"):
        rig.life.load(ScriptedModel)
    rig.life.set_active(True)
    assert rig.life.serving_locked(model) and not rig.life.serving_locked(ScriptedModel())
    assert rig.life.may_preencode_locked()
    assert rig.submit().result(WAIT).success  # the worker serves the queue


def test_a_failed_load_leaves_no_model(rig: Rig) -> None:
    def broken() -> ScriptedModel:
        raise FileNotFoundError("config.json is missing")

    with pytest.raises(FileNotFoundError):
        rig.life.load(broken)
    assert rig.life.model is None and rig.life.worker is None


def test_a_background_load_reports_its_end(rig: Rig) -> None:
    release, ended = threading.Event(), threading.Event()
    results: list[BaseException | None] = []
    model = ScriptedModel()

    def loader() -> ScriptedModel:
        assert release.wait(WAIT)
        return model

    rig.clock.advance(1.0)
    rig.life.start_loading(loader, lambda err: (results.append(err), ended.set()))
    assert rig.life.loader.name == LOADER_THREAD
    assert rig.life.loading_since == rig.clock() and rig.life.model is None
    with pytest.raises(RuntimeError, match="already loaded or loading"):
        rig.life.start_loading(loader)
    release.set()
    assert ended.wait(WAIT) and results == [None]
    assert rig.life.model is model and rig.life.loading_since is None


def test_a_background_load_failure_reaches_on_done(rig: Rig) -> None:
    ended = threading.Event()
    results: list[BaseException | None] = []

    def broken() -> ScriptedModel:
        raise OSError("disk gone")

    rig.life.start_loading(broken, lambda err: (results.append(err), ended.set()))
    assert ended.wait(WAIT) and isinstance(results[0], OSError)
    assert rig.life.model is None and rig.life.loading_since is None


def test_an_abandoned_load_drops_its_model(rig: Rig) -> None:
    release, returned = threading.Event(), threading.Event()
    model, results = ScriptedModel(), []

    def loader() -> ScriptedModel:
        assert release.wait(WAIT)
        returned.set()
        return model

    rig.life.start_loading(loader, results.append)
    assert rig.life.take_model() is None and rig.life.loading_since is None
    release.set()
    assert returned.wait(WAIT)
    rig.life.join_loader(WAIT)
    assert rig.life.model is None and model.closed == 1 and results == []


def test_stopping_resolves_the_waiting_and_ends_the_worker(rig: Rig) -> None:
    model = ScriptedModel(tokens=50)
    model.hold = threading.Event()
    rig.life.load(lambda: model)
    running = rig.submit("A?")
    assert model.first_token.wait(WAIT)
    waiting = rig.submit("B?")
    rig.life.abort_jobs("the node was deactivated", stop_worker=False)
    assert waiting.done() and waiting.result(0).error_code == R.NOT_READY
    worker = rig.life.worker
    model.hold.set()
    assert running.result(WAIT).message == "the node was deactivated"
    assert worker.is_alive()  # deactivating keeps the worker
    assert rig.life.take_model() is model
    rig.life.abort_jobs("the model was unloaded", stop_worker=True, join_timeout_s=WAIT)
    assert rig.life.worker is None and not worker.is_alive()


def test_close_model_logs_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    model = ScriptedModel()
    close_model(model)
    assert model.closed == 1

    def broken() -> None:
        raise RuntimeError("CUDA context gone")

    model.close = broken  # type: ignore[method-assign]
    close_model(model)
    assert "closing the model scripted/model failed" in caplog.text
