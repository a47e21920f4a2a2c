"""llava_phi_ros/core/jobs.py and worker.py on their own: a Job's life (queued, running,
done), cancellation, aborts and BUSY in the JobQueue, and the Worker running a scripted model
(test/core_helpers.py): answers, the feature cache, errors, stops and pre-encoding. A fake
steady clock; every wait is on an event or the queue's condition, never a sleep."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llava_phi_ros.core import requests as R
from llava_phi_ros.core.features import FeatureCache
from llava_phi_ros.core.frames import Cameras, Frame
from llava_phi_ros.core.jobs import DONE, QUEUED, RUNNING, Job, JobQueue
from llava_phi_ros.core.requests import QueryOutcome, QueryRefused, QueryRequest
from llava_phi_ros.core.sessions import Session, SessionTable
from llava_phi_ros.core.settings import AssistantSettings
from llava_phi_ros.core.stats import Stats
from llava_phi_ros.core.worker import WORKER_THREAD, Worker
from llava_phi_ros.model.generation import ContextOverflowError, GenerationConfig
from llava_phi_ros.model.prompt import RequestError

from .core_helpers import T0_NS, WAIT, ScriptedModel, SteadyClock, frame, image

MODEL_ID = "scripted/model"


class Parts:
    """A job queue with its statistics and sessions, and (once started) a worker."""

    def __init__(self, **settings: Any):
        self.clock = SteadyClock()
        self.settings = AssistantSettings(**settings).validate()
        self.stats = Stats()
        self.sessions = SessionTable(self.clock, 100.0, 10, 10)
        self.jobs = JobQueue(self.stats, self.sessions, self.clock, lambda: MODEL_ID)
        self.features = FeatureCache(capacity=4)
        self.cameras = Cameras(self.settings.cameras, 10.0, 100.0)
        self.frame = frame(T0_NS)
        self.may_preencode = True
        self.workers: list[Worker] = []

    def job(self, question: str = "What is it?", request: QueryRequest | None = None,
            at: Frame | None = None, session: Session | None = None, timeout_s: float = 30.0,
            on_text: Any = None, choices: tuple[str, ...] = ()) -> Job:
        """A job accepted now (not queued yet)."""
        return Job(self.jobs, request or QueryRequest(question), f"id-{question}",
                   at or self.frame, GenerationConfig(max_new_tokens=3), choices, self.clock(),
                   timeout_s, on_text, session)

    def push(self, *jobs: Job) -> None:
        with self.jobs.lock:
            for job in jobs:
                self.jobs.push_locked(job)

    def start(self, model: ScriptedModel) -> Worker:
        worker = Worker(model, self.jobs, self.sessions, self.features, self.cameras,
                        lambda: self.settings, self.clock, lambda: MODEL_ID,
                        lambda: self.may_preencode)
        self.workers.append(worker)
        worker.start()
        return worker

    def stop(self, worker: Worker, join_timeout_s: float | None = WAIT) -> None:
        with self.jobs.lock:
            worker.stop_locked()
            self.jobs.lock.notify_all()
        worker.join(join_timeout_s)

    def wait_idle(self, worker: Worker) -> None:
        """Until nothing waits, runs or is left to pre-encode (the core's wait_idle)."""
        with self.jobs.lock:
            assert self.jobs.lock.wait_for(
                lambda: self.jobs.idle_locked() and worker.preencode_target_locked() is None,
                WAIT)


@pytest.fixture
def parts() -> Iterator[Parts]:
    p = Parts()
    yield p
    for worker in p.workers:
        p.stop(worker)


# ----- the queue, without a worker -------------------------------------------------------------
def test_jobs_are_taken_in_order_and_finished_once(parts: Parts,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    first, second = parts.job("A?"), parts.job("B?")
    parts.push(first, second)
    assert parts.jobs.depth == 2 and first.state == QUEUED
    with parts.jobs.lock:
        assert parts.jobs.take_locked() is first
        assert first.state == RUNNING and parts.jobs.running is first
        outcome = parts.jobs.finish_locked(first, "", "", first.blank_answer(MODEL_ID, 1.0))
    assert first.state == DONE and parts.jobs.running is None and not first.done()
    first.resolve(outcome)  # after the lock: done callbacks run here
    assert first.done() and first.result(0).success
    first.resolve(QueryOutcome(False, R.MODEL_ERROR))  # a second resolution is dropped, logged
    assert first.result(0) is outcome and "resolved twice" in caplog.text
    assert parts.stats.snapshot()[0] == 1
    with parts.jobs.lock:
        assert parts.jobs.take_locked() is second and parts.jobs.take_locked() is None


def test_cancelling_a_waiting_job_resolves_it_at_once(parts: Parts) -> None:
    session = Session("s", parts.frame)
    parts.sessions.begin_turn(session)
    job = parts.job(request=QueryRequest("What is it?", session_id="s"), session=session)
    parts.push(job)
    parts.clock.advance(2.0)
    called: list[Job] = []
    job.add_done_callback(called.append)
    assert job.cancel() and job.done() and called == [job]
    out = job.result(0)
    assert (out.error_code, out.message) == (R.CANCELLED, "cancelled while waiting")
    answer = out.answer
    assert answer.finish_reason == "cancelled" and answer.tokens_generated == 0
    assert answer.queue_ms == 2000.0 and answer.total_ms == 2000.0
    assert (answer.model_id, answer.session_id, answer.frame) == (MODEL_ID, "s", parts.frame)
    assert parts.jobs.depth == 0 and session.in_flight == 0
    assert parts.sessions.history(session) == []  # a cancelled turn is not remembered
    assert parts.stats.snapshot()[1][R.CANCELLED] == 1
    assert not job.cancel()  # already finished
    assert job.future.cancel() is False  # the raw future cannot bypass the queue


def test_cancelling_a_running_job_flags_it_for_the_worker(parts: Parts) -> None:
    job = parts.job()
    parts.push(job)
    with parts.jobs.lock:
        parts.jobs.take_locked()
    assert job.cancel() and not job.done()
    assert job.should_stop(parts.clock(), lambda: "unused")
    assert job.stop_reason == (R.CANCELLED, "cancelled while generating")


def test_busy_counts_the_running_job_and_the_waiting_ones(parts: Parts) -> None:
    with parts.jobs.lock:
        parts.jobs.check_room_locked(0)  # empty: one may run
    parts.push(parts.job("A?"))
    with parts.jobs.lock:
        parts.jobs.take_locked()
        with pytest.raises(QueryRefused) as info:
            parts.jobs.check_room_locked(0)
    assert info.value.code == R.BUSY
    parts.push(parts.job("B?"))
    with parts.jobs.lock:
        parts.jobs.check_room_locked(2)
        with pytest.raises(QueryRefused) as info:
            parts.jobs.check_room_locked(1)
    assert info.value.message == ("1 queries are waiting (the limit, max_pending_queries, is "
                                  "1); try later")


def test_abort_finishes_the_waiting_and_stops_the_running(parts: Parts) -> None:
    running, waiting = parts.job("A?"), parts.job("B?")
    parts.push(running, waiting)
    with parts.jobs.lock:
        parts.jobs.take_locked()
        settled = parts.jobs.abort_locked("the node was deactivated")
        assert parts.jobs.abort_locked("later reason") == []  # the first reason stands
    assert [job for job, _ in settled] == [waiting] and not waiting.done()
    job, out = settled[0]
    job.resolve(out)
    assert (out.error_code, out.message) == (R.NOT_READY, "the node was deactivated")
    assert out.answer.finish_reason == "cancelled"
    assert running.should_stop(parts.clock(), lambda: "unused")
    assert running.stop_reason == (R.NOT_READY, "the node was deactivated")


def test_a_job_checks_its_stop_conditions_in_order(parts: Parts) -> None:
    job = parts.job(timeout_s=5.0)
    assert job.begin(parts.clock(), "too slow") is None and job.started == parts.clock()
    assert not job.should_stop(parts.clock(), lambda: "too slow")
    assert job.stop_reason == (R.CANCELLED, "cancelled")  # the default, never used unstopped
    parts.clock.advance(5.0)
    assert job.should_stop(parts.clock(), lambda: "too slow")
    assert job.stop_reason == (R.TIMEOUT, "too slow (while generating)")
    late = parts.job(timeout_s=5.0)
    parts.clock.advance(6.0)
    assert late.begin(parts.clock(), "too slow") == (R.TIMEOUT, "too slow (still waiting)")
    aborted = parts.job()
    parts.push(aborted)
    with parts.jobs.lock:
        parts.jobs.take_locked()
        parts.jobs.abort_locked("stopping")
    assert aborted.begin(parts.clock(), "too slow") == (R.NOT_READY, "stopping")


def test_stream_failures_are_logged_not_raised(parts: Parts,
                                               caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, int]] = []
    parts.job(on_text=lambda text, n: seen.append((text, n))).stream("a b", 2)
    assert seen == [("a b", 2)]

    def broken(_text: str, _n: int) -> None:
        raise RuntimeError("feedback publisher gone")

    parts.job("Q?", on_text=broken).stream("a", 1)
    parts.job("R?").stream("a", 1)  # no callback
    assert "on_text callback failed for request id-Q?" in caplog.text


# ----- the worker ------------------------------------------------------------------------------
def test_the_worker_answers_in_order_and_reuses_a_frames_encoding(parts: Parts) -> None:
    parts.settings = AssistantSettings(system_prompt="Be brief.", prefix_cache_mb=64.0)
    model = ScriptedModel(tokens=3)
    first, second = parts.job("A?"), parts.job("B?", choices=("x", "y"))
    parts.push(first, second)
    worker = parts.start(model)
    assert worker.is_alive() and worker._thread.name == WORKER_THREAD
    a, b = first.result(WAIT).answer, second.result(WAIT).answer
    assert [call["question"] for call in model.asked] == ["A?", "B?"]
    assert (a.text, a.finish_reason, a.tokens_generated) == ("t0 t1 t2", "length", 3)
    assert (a.header, a.stamp_ns, a.frame_id, a.camera) == (parts.frame.header, T0_NS,
                                                            "camera_optical", "camera")
    assert (a.request_id, a.question, a.model_id) == ("id-A?", "A?", MODEL_ID)
    assert a.vision_ms == 2.5 and a.time_to_first_token_ms == 4.0 + 2.5
    assert (a.prefill_ms, a.decode_tokens_per_s, a.prompt_tokens) == (1.5, 100.0, 12)
    assert b.vision_ms == 0.0 and b.time_to_first_token_ms == 4.0  # the cached encoding
    assert len(model.encoded) == 1 and model.asked[1]["encoded"] is model.asked[0]["encoded"]
    assert model.asked[1]["choices"] == ("x", "y")
    assert model.asked[0]["system_prompt"] == "Be brief." and model.prefix_cache_mb == 64.0
    assert parts.stats.snapshot()[0] == 2


def test_inline_images_are_cached_only_for_sessions(parts: Parts) -> None:
    model = ScriptedModel(tokens=1)
    worker = parts.start(model)
    inline = Frame("", 1, "hand", image(5))
    for _ in range(2):
        job = parts.job(request=QueryRequest("Q?", image=inline), at=inline)
        parts.push(job)
        assert job.result(WAIT).answer.vision_ms == 2.5
    session = Session("s", inline)
    for vision_ms in (2.5, 0.0):  # a session asks about its image again: cached
        parts.sessions.begin_turn(session)
        job = parts.job(request=QueryRequest("Q?", image=inline, session_id="s"), at=inline,
                        session=session)
        parts.push(job)
        assert job.result(WAIT).answer.vision_ms == vision_ms
    parts.wait_idle(worker)
    assert len(model.encoded) == 3


def test_a_session_turn_sees_the_history_and_is_recorded(parts: Parts) -> None:
    model = ScriptedModel(tokens=2)
    parts.start(model)
    session = Session("s", parts.frame)
    for question in ("One?", "Two?"):
        parts.sessions.begin_turn(session)
        job = parts.job(question, request=QueryRequest(question, session_id="s"),
                        session=session)
        parts.push(job)
        assert job.result(WAIT).success
    assert model.asked[0]["history"] == [] and model.asked[1]["history"] == [("One?", "t0 t1")]
    assert parts.sessions.history(session) == [("One?", "t0 t1"), ("Two?", "t0 t1")]
    assert session.in_flight == 0


@pytest.mark.parametrize("failure, code, message", [
    (RuntimeError("device lost"), R.MODEL_ERROR, "RuntimeError: device lost"),
    (ValueError("shape mismatch"), R.MODEL_ERROR, "ValueError: shape mismatch"),
    (RequestError("bad choice"), R.BAD_REQUEST, "bad choice"),
    (ContextOverflowError("too long"), R.CONTEXT_OVERFLOW, "too long"),
])
def test_failures_become_codes_and_the_worker_keeps_serving(parts: Parts, failure: Exception,
                                                            code: str, message: str) -> None:
    model = ScriptedModel()
    model.fail_ask = failure
    parts.start(model)
    job = parts.job()
    parts.push(job)
    out = job.result(WAIT)
    assert (out.success, out.error_code, out.message) == (False, code, message)
    assert out.answer.finish_reason == "error" and out.answer.stamp_ns == T0_NS
    assert parts.stats.snapshot()[1][code] == 1
    model.fail_ask = None
    again = parts.job("Again?")
    parts.push(again)
    assert again.result(WAIT).success


def test_a_vision_failure_is_model_error(parts: Parts) -> None:
    model = ScriptedModel()
    model.fail_encode = RuntimeError("vision tower down")
    parts.start(model)
    job = parts.job()
    parts.push(job)
    assert job.result(WAIT).message == "RuntimeError: vision tower down"


def test_cancel_stops_a_running_generation_between_tokens(parts: Parts) -> None:
    model = ScriptedModel(tokens=50)
    model.hold = threading.Event()
    session = Session("s", parts.frame)
    parts.sessions.begin_turn(session)
    job = parts.job(session=session)
    parts.push(job)
    parts.start(model)
    assert model.first_token.wait(WAIT)
    assert job.cancel() and not job.done()
    model.hold.set()
    out = job.result(WAIT)
    assert (out.error_code, out.message) == (R.CANCELLED, "cancelled while generating")
    assert out.answer.tokens_generated == 1 and out.answer.text == "t0"  # the partial answer
    assert out.answer.finish_reason == "cancelled"
    assert parts.sessions.history(session) == [] and session.in_flight == 0


def test_timeouts_while_generating_and_while_waiting(parts: Parts) -> None:
    parts.settings = AssistantSettings(query_timeout_s=5.0)
    model = ScriptedModel(tokens=50)
    model.hold = threading.Event()
    running, waiting = parts.job("A?", timeout_s=5.0), parts.job("B?", timeout_s=5.0)
    parts.push(running, waiting)
    parts.start(model)
    assert model.first_token.wait(WAIT)
    parts.clock.advance(6.0)  # both deadlines pass
    model.hold.set()
    gen, wait = running.result(WAIT), waiting.result(WAIT)
    assert gen.error_code == R.TIMEOUT and gen.answer.tokens_generated == 1
    assert gen.message == "no answer within query_timeout_s = 5 s (while generating)"
    assert wait.error_code == R.TIMEOUT and wait.answer.tokens_generated == 0
    assert wait.message == "no answer within query_timeout_s = 5 s (still waiting)"
    assert wait.answer.queue_ms == 6000.0 and len(model.asked) == 1  # never ran


def test_an_abort_stops_the_running_job_with_its_partial_answer(parts: Parts) -> None:
    model = ScriptedModel(tokens=50)
    model.hold = threading.Event()
    job = parts.job()
    parts.push(job)
    parts.start(model)
    assert model.first_token.wait(WAIT)
    with parts.jobs.lock:
        assert parts.jobs.abort_locked("the model was unloaded") == []
    model.hold.set()
    out = job.result(WAIT)
    assert (out.error_code, out.message) == (R.NOT_READY, "the model was unloaded")
    assert out.answer.tokens_generated == 1 and out.answer.finish_reason == "cancelled"


def test_idle_pre_encoding_fills_the_cache_once_per_frame(parts: Parts) -> None:
    parts.settings = AssistantSettings(cameras=["camera"], preencode_latest=True)
    model = ScriptedModel()
    worker = parts.start(model)
    f = frame(T0_NS, seed=1)
    parts.cameras.add(f, T0_NS, 1.0)
    with parts.jobs.lock:
        parts.jobs.lock.notify_all()  # what add_frame does: wake an idle worker
    parts.wait_idle(worker)
    assert parts.features.get(f) is not None and model.encoded == [f.image]
    job = parts.job(at=f)
    parts.push(job)
    assert job.result(WAIT).answer.vision_ms == 0.0 and len(model.encoded) == 1


def test_pre_encoding_waits_for_the_setting_and_the_node(parts: Parts) -> None:
    model = ScriptedModel()
    worker = parts.start(model)
    f = frame(T0_NS, seed=1)
    parts.cameras.add(f, T0_NS, 1.0)
    parts.wait_idle(worker)
    assert model.encoded == []  # preencode_latest is off
    parts.settings = AssistantSettings(preencode_latest=True)
    parts.may_preencode = False  # e.g. the node is inactive
    parts.wait_idle(worker)
    assert model.encoded == []
    parts.may_preencode = True
    with parts.jobs.lock:
        parts.jobs.lock.notify_all()
    parts.wait_idle(worker)
    assert model.encoded == [f.image]


def test_a_failed_pre_encode_is_logged_and_not_retried(parts: Parts,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    parts.settings = AssistantSettings(preencode_latest=True)
    model = ScriptedModel()
    model.fail_encode = RuntimeError("vision tower down")
    worker = parts.start(model)
    f = frame(T0_NS)
    parts.cameras.add(f, T0_NS, 1.0)
    with parts.jobs.lock:
        parts.jobs.lock.notify_all()
    parts.wait_idle(worker)  # would never return if the worker retried in a loop
    assert parts.features.get(f) is None and worker.is_alive()
    assert "pre-encoding a frame of camera 'camera' failed" in caplog.text


def test_a_stopped_worker_ends_and_an_abandoned_one_spares_its_successor(
        parts: Parts, caplog: pytest.LogCaptureFixture) -> None:
    old_model, new_model = ScriptedModel(tokens=3), ScriptedModel(tokens=3)
    old_model.hold, new_model.hold = threading.Event(), threading.Event()
    first = parts.job("A?")
    parts.push(first)
    old = parts.start(old_model)
    assert old_model.first_token.wait(WAIT)
    parts.stop(old, join_timeout_s=0.0)  # still inside its step: abandoned, not waited for
    assert old.is_alive() and "did not leave its step" in caplog.text
    second = parts.job("B?")
    parts.push(second)
    parts.start(new_model)
    assert new_model.first_token.wait(WAIT)
    old_model.hold.set()
    assert first.result(WAIT).success
    old.join(WAIT)
    assert not old.is_alive()
    assert parts.jobs.running is second  # the abandoned worker did not clear it
    new_model.hold.set()
    assert second.result(WAIT).success and parts.jobs.running is None
