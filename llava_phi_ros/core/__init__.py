"""The ROS-free service core of the assistant node: frames in, grounded answers out.

It holds per-camera frame buffers, validates requests (accepted or refused at once, with the
error codes of srv/Query.srv), runs the model on ONE worker thread with a bounded FIFO of
waiting jobs, and handles cancellation, timeouts, sessions, per-frame image-feature caching and
timing statistics. The ROS layer (`llava_phi_ros/ros/`) converts messages to `Frame` /
`QueryRequest`, calls `AssistantCore.submit()`, and turns the returned `Job`'s future into a
response.

Modules, each with its own locking rules in its docstring:
- `settings`: AssistantSettings (the node parameters the core uses).
- `frames`: Frame (decoded on first use), image_problem, FrameBuffer, Cameras (intake checks).
- `requests`: error codes, QueryRequest, AnswerRecord, QueryOutcome, QueryRefused and every
  check a request passes before it is accepted.
- `sessions`: Session and the SessionTable (TTL, LRU eviction, history).
- `stats`: answer/error counters, latency and per-camera statistics.
- `features`: the image feature cache (what pre-encoding fills).
- `jobs`: Job and the JobQueue (the core's lock, cancellation, aborts).
- `worker`: the worker thread (inference, pre-encoding).
- `lifecycle`: ModelLifecycle (the model, a background load, the active flag, the worker).
- `service`: AssistantCore (the front: unload, live settings, frames, submit, stats).

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

from .features import FeatureCache
from .frames import Cameras, Frame, FrameBuffer, FrameDecodeError, FrameRefused, image_problem
from .jobs import Job, JobQueue
from .lifecycle import LOADER_THREAD, ModelLifecycle
from .requests import (
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
)
from .service import AssistantCore
from .sessions import ENDED_SESSIONS_REMEMBERED, Session, SessionTable
from .settings import AssistantSettings
from .stats import LATENCY_WINDOW, Stats
from .worker import WORKER_THREAD, Worker

__all__ = [
    "BAD_IMAGE", "BAD_REQUEST", "BUSY", "CANCELLED", "CONTEXT_OVERFLOW",
    "ENDED_SESSIONS_REMEMBERED", "ERROR_CODES", "LATENCY_WINDOW", "LOADER_THREAD", "MODEL_ERROR",
    "NOT_READY", "NO_IMAGE", "STALE_IMAGE", "STAMP_OUT_OF_RANGE", "TIMEOUT", "UNKNOWN_CAMERA",
    "UNKNOWN_SESSION", "WORKER_THREAD", "AnswerRecord", "AssistantCore", "AssistantSettings",
    "Cameras", "FeatureCache", "Frame", "FrameBuffer", "FrameDecodeError", "FrameRefused", "Job",
    "JobQueue",
    "ModelLifecycle", "QueryOutcome", "QueryRefused", "QueryRequest", "Session", "SessionTable",
    "Stats", "Worker", "image_problem",
]
