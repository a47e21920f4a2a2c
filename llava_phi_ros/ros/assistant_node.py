"""The `llava_phi` lifecycle node: cameras in, grounded answers out.

A thin ROS layer over the ROS-free `AssistantCore`: it converts messages, declares parameters
from the schema (llava_phi_ros/parameters.py), and bridges the core's worker-thread futures to
async service/action callbacks, so a waiting query never holds an executor thread, image intake
never waits for inference, and loading a model never blocks the executor.

Every request ends in an answer or an error code: the request queues are sized by
`request_queue_depth` (DDS would otherwise overwrite requests beyond 10), the excess is refused
BUSY at once, and on SIGINT/SIGTERM every waiting and running request is answered before exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image

from .. import core, parameters
from ..action import Ask
from ..model.builtin import BUILTIN_WARNINGS, BUILTINS
from ..msg import Answer
from ..parameters import LIVE, RELOAD, STARTUP
from ..srv import Query
from .debug_overlay import draw_answer
from .image_conversion import (
    ImageConversionError,
    check_compressed_msg,
    check_image_msg,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_image_msg,
)
from .launch_support import NODE_NAME

ModelLoader = Callable[[dict[str, Any]], Any]  # parameter values -> a VisionLanguageModel
SHUTDOWN_GRACE_S = 2.5  # how long shutdown waits for the request callbacks to finish
WORKER_JOIN_S = 1.0  # how long shutdown waits for the worker to leave its current step


def load_model_from_values(values: dict[str, Any]) -> Any:
    """The product's model loader: the model the parameters name."""
    from ..pipeline import VisionLanguageModel

    return VisionLanguageModel.load(
        values["model_path"], backend=values["backend"], device=values["device"],
        dtype=values["dtype"], max_context=values["max_context"] or None,
        backend_options={"decode_path": values["decode_path"],
                         "engine_dir": values["engine_dir"],
                         "max_prefill": values["max_prefill"] or None})


def descriptor(spec: parameters.Param) -> ParameterDescriptor:
    """The ParameterDescriptor of a schema entry: description, range, choices, when it applies."""
    desc = ParameterDescriptor(description=spec.description, read_only=spec.applies == STARTUP)
    constraints = [parameters.APPLIES_TEXT[spec.applies]]
    if spec.choices:
        constraints.insert(0, f"one of: {spec.bounds}")
    elif spec.low is not None:
        constraints.insert(0, f"in {spec.bounds}")
        if spec.type_name == "integer":
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high),
                                               step=1)]
        else:
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
    desc.additional_constraints = "; ".join(constraints)
    return desc


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class AssistantNode(LifecycleNode):
    """Lifecycle node `llava_phi`: `~/query`, `~/ask`, `~/answers`, `~/debug_image`.

    model_loader (parameter values -> model) replaces the product's loader; tests pass doubles.
    """

    def __init__(self, model_loader: ModelLoader | None = None, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        self._model_loader = model_loader or load_model_from_values
        self.core: core.AssistantCore | None = None
        self._configure_error = ""
        self._model_path = ""  # what the current configure loads
        self._active = False
        self._shutting_down = False
        self._requests_in_flight = 0  # service and action callbacks not finished yet
        # (core, error or None) from the loader thread, handed to the executor
        self._load_outcome: tuple[core.AssistantCore, BaseException | None] | None = None
        self._camera_subscriptions: list[Any] = []
        # Action goals keyed by id() of the goal message, which rclpy hands to the goal callback
        # and then to the goal handle: the job accepted at once, or why it was refused, and the
        # goal handle once execution starts (feedback goes there).
        self._goal_jobs: dict[int, Any] = {}
        self._goal_refusals: dict[int, core.QueryRefused] = {}
        self._goal_handles: dict[int, Any] = {}

        # Bad values from a params file or -p do not raise here: each falls back to its default
        # and the node stays unconfigured, saying why (log, diagnostics, NOT_READY messages).
        self._parameter_errors = self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._request_group = ReentrantCallbackGroup()  # async callbacks awaiting the worker
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()
        # Triggered by the worker thread after it completes a future, so the executor wakes up
        # and resumes the coroutine awaiting it (nothing else may be happening on the graph).
        self._wake = self.create_guard_condition(lambda: None, self._request_group)
        # Triggered by the loader thread when a background load ends.
        self._load_done = self.create_guard_condition(self._after_load, self._diagnostics_group)

        depth = self.get_parameter("request_queue_depth").value
        requests = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE,
                              history=HistoryPolicy.KEEP_LAST)
        self._answers_pub = self.create_publisher(Answer, "~/answers", requests)
        self._debug_pub = self.create_publisher(
            Image, "~/debug_image", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Query, "~/query", self._on_query, qos_profile=requests,
                            callback_group=self._request_group)
        self._action_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel,
            callback_group=self._request_group, goal_service_qos_profile=requests,
            result_service_qos_profile=requests, cancel_service_qos_profile=requests)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._diagnostics_group)
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1)),
            post_callback=self._on_time_jump)

        if self.get_parameter("autostart").value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # ----- parameters -------------------------------------------------------------------------
    def _declare_parameters(self) -> dict[str, str]:
        """Declare every schema parameter; {name: why its override was refused}."""
        overrides = getattr(self, "_parameter_overrides", {})  # rclpy's -p / params-file values
        errors = {}
        for spec in parameters.PARAMETERS:
            value = spec.default_value
            if spec.name in overrides:
                try:
                    value = parameters.check(spec.name, overrides[spec.name].value)
                except parameters.ParameterError as exc:
                    errors[spec.name] = str(exc)
            self.declare_parameter(spec.name, value, descriptor(spec), ignore_override=True)
        try:
            parameters.check_together(self._values())
        except parameters.ParameterError as exc:  # filed under the one `param set` can fix
            errors["max_pending_queries"] = str(exc)
        for why in errors.values():
            self.get_logger().error(f"parameter refused, default kept: {why}")
        return errors

    def _values(self) -> dict[str, Any]:
        return {p.name: self.get_parameter(p.name).value for p in parameters.PARAMETERS}

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Live parameters apply at once; reload ones only while unconfigured; else refused."""
        ours = [p for p in params if p.name in parameters.SPECS]  # use_sim_time is rclpy's
        if not ours:
            return SetParametersResult(successful=True)
        for p in ours:
            applies = parameters.SPECS[p.name].applies
            if applies == STARTUP:
                return SetParametersResult(successful=False,
                                           reason=f"{p.name} is read-only: set it at start")
            if applies == RELOAD and self.core is not None:
                return SetParametersResult(
                    successful=False, reason=f"{p.name} needs a reload: the node is configured; "
                                             "clean up first (lifecycle cleanup), set it, then "
                                             "configure")
        try:
            values = parameters.validate(self._values() | {p.name: p.value for p in ours})
            if any(p.name == "device" for p in ours):
                _check_device_exists(values["device"])
            if self.core is not None:
                self.core.update_settings(core.AssistantSettings.from_values(values))
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        for p in ours:
            self._parameter_errors.pop(p.name, None)  # a good value replaces a refused one
        if any(parameters.SPECS[p.name].applies == LIVE for p in ours) and self.core is not None:
            self.get_logger().info("applied: " + ", ".join(f"{p.name}={p.value!r}" for p in ours))
        return SetParametersResult(successful=True)

    # ----- lifecycle --------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Check the parameters, subscribe to the cameras and start loading the model.

        The load runs on a background thread (30-60 s on a Jetson): the executor keeps serving,
        queries get NOT_READY ("loading") meanwhile, and a load that fails takes the node back
        to unconfigured with the reason.
        """
        values = self._values()
        try:
            if self._parameter_errors:
                raise ValueError("; ".join(self._parameter_errors.values()))
            values = parameters.validate(values)
            _check_model_path(values["model_path"])
            _check_device_exists(values["device"])
            assistant = core.AssistantCore(core.AssistantSettings.from_values(values),
                                           now_ns=self._now_ns)
        except ValueError as exc:
            self._configure_error = f"configure failed: {exc}"
            self.get_logger().error(self._configure_error)
            return TransitionCallbackReturn.FAILURE
        self.core, self._configure_error = assistant, ""
        self._model_path = values["model_path"]
        self._subscribe(assistant.cameras, values["image_transport"], values["qos_reliable"])
        assistant.start_loading(lambda: self._model_loader(values),
                                lambda error: self._on_loaded(assistant, error))
        self.get_logger().info(f"configured; loading {values['model_path']} "
                               f"({values['backend']} on {values['device']})")
        return TransitionCallbackReturn.SUCCESS

    def _on_loaded(self, assistant: core.AssistantCore, error: BaseException | None) -> None:
        """Loader thread: hand the outcome to the executor."""
        self._load_outcome = (assistant, error)
        self._load_done.trigger()

    def _after_load(self) -> None:
        """Executor: log the loaded model, or go back to unconfigured with the reason."""
        outcome, self._load_outcome = self._load_outcome, None
        if outcome is None or outcome[0] is not self.core:  # a core since cleaned up
            return
        assistant, error = outcome
        if error is None:
            self.get_logger().info(f"model loaded: {assistant.model_id}")
            if self._model_path in BUILTIN_WARNINGS:
                self.get_logger().warning(BUILTIN_WARNINGS[self._model_path])
            return
        reason = f"loading the model failed: {type(error).__name__}: {error}"
        self.get_logger().error(reason)
        if self._active:
            self.trigger_deactivate()
        self.trigger_cleanup()
        self._configure_error = reason  # after cleanup: it says why the node is unconfigured

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.core is not None:
            self.core.set_active(True)
        self._active = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        if self.core is not None:
            self.core.set_active(False)
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Free the model and the camera subscriptions; configure loads anew."""
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self, why: str = "the model was unloaded") -> None:
        """Stop the worker (every request ends, NOT_READY), free the model, drop the cameras."""
        for sub in self._camera_subscriptions:
            self.destroy_subscription(sub)
        self._camera_subscriptions.clear()
        self._active = False
        if self.core is not None:
            self.core.shutdown(why, join_timeout_s=WORKER_JOIN_S)
            self.core = None

    def begin_shutdown(self) -> None:
        """Stop accepting; every waiting and running request ends now (NOT_READY, partial text).

        Keep spinning afterwards until `requests_in_flight` is 0, so their responses go out.
        """
        self._shutting_down = True
        self.release("the node is shutting down")

    @property
    def requests_in_flight(self) -> int:
        """Service and action callbacks that have not returned yet."""
        return self._requests_in_flight

    # ----- cameras ----------------------------------------------------------------------------
    def _subscribe(self, cameras: list[str], transport: str, reliable: bool) -> None:
        qos = qos_profile_sensor_data
        if reliable:
            qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        for camera in cameras:
            # One mutually exclusive group per camera: a camera's frames stay in order, cameras
            # run in parallel, and none of them shares a group with the request callbacks.
            group = MutuallyExclusiveCallbackGroup()
            msg_type, topic = ((CompressedImage, f"{camera}/image_raw/compressed")
                               if transport == "compressed" else (Image, f"{camera}/image_raw"))
            sub = self.create_subscription(msg_type, topic,
                                           lambda msg, c=camera: self._on_image(c, msg), qos,
                                           callback_group=group)
            self._camera_subscriptions.append(sub)

    def _on_image(self, camera: str, msg: Any) -> None:
        """Buffer a frame as it arrived (checked from its header; decoded only when a request
        or pre-encoding reads it, on the worker): microseconds on the executor."""
        assistant = self.core
        if assistant is None:
            return
        max_bytes = assistant.settings.frame_buffer_max_mb * 2**20
        try:
            frame = undecoded_frame(msg, camera, self._now_ns(), max_bytes)
            assistant.add_frame(frame)
        except ImageConversionError as exc:
            self.get_logger().warning(f"{camera}: dropped a frame: {exc}",
                                      throttle_duration_sec=5.0)
        except core.FrameRefused as exc:
            self.get_logger().warning(f"dropped a frame: {exc}", throttle_duration_sec=5.0)

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_time_jump(self, jump: Any) -> None:
        if self.core is not None and jump.delta.nanoseconds < 0:
            self.get_logger().warning("ROS time jumped backwards: frame buffers cleared")
            self.core.on_time_jump_back()

    # ----- requests ---------------------------------------------------------------------------
    def _to_core_request(self, req: Any) -> core.QueryRequest:
        """Query request / Ask goal -> core request (an inline image is converted here)."""
        frame = None
        if req.image.height or req.image.width or len(req.image.data):
            try:  # checked here, converted on the worker (BAD_IMAGE either way)
                frame = undecoded_frame(req.image, "", self._now_ns())
            except ImageConversionError as exc:
                raise core.QueryRefused(core.BAD_IMAGE, str(exc)) from exc
        return core.QueryRequest(
            question=req.question, request_id=req.request_id, camera=req.camera,
            stamp_ns=stamp_to_ns(req.stamp), image=frame, choices=tuple(req.choices),
            max_new_tokens=int(req.max_new_tokens), temperature=float(req.temperature),
            top_p=float(req.top_p), session_id=req.session_id)

    def _submit(self, req: Any, on_text: Any = None) -> Any:
        """Accept (a core Job) or raise QueryRefused at once; nothing else escapes."""
        if self._shutting_down:
            raise core.QueryRefused(core.NOT_READY, "the node is shutting down")
        if self.core is None:
            state = "unconfigured" + (f" ({self._configure_error})" if self._configure_error
                                      else "")
            raise core.QueryRefused(core.NOT_READY, f"the node is {state}")
        try:
            request = self._to_core_request(req)
        except core.QueryRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - every request ends in an error code
            self.get_logger().error(f"converting a request failed: {exc!r}")
            raise core.QueryRefused(core.MODEL_ERROR, f"converting the request failed: "
                                                      f"{type(exc).__name__}: {exc}") from exc
        return self.core.submit(request, on_text=on_text)

    async def _await_job(self, job: Any) -> core.QueryOutcome:
        """Wait for the worker without holding an executor thread."""
        done: Future = Future(executor=self.executor)

        def resolve(job_future: Any) -> None:
            done.set_result(job_future.result())
            self._wake.trigger()

        job.future.add_done_callback(resolve)
        return await done

    async def _on_query(self, request: Any, response: Any) -> Any:
        self._requests_in_flight += 1
        try:
            try:
                outcome = await self._await_job(self._submit(request))
            except core.QueryRefused as refused:
                outcome = core.QueryOutcome(False, refused.code, refused.message, None)
            self._fill_response(response, outcome)
        finally:
            self._requests_in_flight -= 1
        return response

    def _fill_response(self, response: Any, outcome: core.QueryOutcome) -> None:
        response.success = outcome.success
        response.error_code = outcome.error_code
        response.message = outcome.message
        if outcome.answer is not None:
            response.answer = self._answer_msg(outcome.answer)
            self._answers_pub.publish(response.answer)
            if outcome.success:
                self._publish_debug_image(outcome.answer)

    def _answer_msg(self, record: Any) -> Answer:
        msg = Answer()
        if record.header is not None:
            msg.header = record.header
        for name in ("request_id", "camera", "question", "text", "finish_reason", "model_id"):
            setattr(msg, name, getattr(record, name))
        msg.choices = list(record.choices)
        msg.choice_logprobs = [float(x) for x in record.choice_logprobs]
        msg.choice_probs = [float(x) for x in record.choice_probs]
        msg.choice_index = int(record.choice_index)
        msg.tokens_generated = int(record.tokens_generated)
        msg.prompt_tokens = int(record.prompt_tokens)
        msg.reused_prompt_tokens = int(record.reused_prefix_tokens)
        for name in ("queue_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms",
                     "decode_tokens_per_s", "total_ms"):
            setattr(msg, name, float(getattr(record, name)))
        return msg

    def _publish_debug_image(self, record: Any) -> None:
        if self._debug_pub.get_subscription_count() == 0 or record.frame is None:
            return
        overlay = draw_answer(record.frame.image, record.question, record.text, record.camera,
                              record.stamp_ns / 1e9, record.total_ms)
        self._debug_pub.publish(rgb_to_image_msg(overlay, record.header))

    # ----- action -----------------------------------------------------------------------------
    def _on_goal(self, goal: Any) -> GoalResponse:
        """Accept or refuse at once; a full queue rejects the goal, other refusals abort it."""
        try:
            self._goal_jobs[id(goal)] = self._submit(goal, on_text=self._feedback_sink(goal))
        except core.QueryRefused as refused:
            if refused.code == core.BUSY:
                self.get_logger().info(f"goal rejected: {refused.message}",
                                       throttle_duration_sec=1.0)
                return GoalResponse.REJECT
            self._goal_refusals[id(goal)] = refused
        return GoalResponse.ACCEPT

    def _feedback_sink(self, goal: Any) -> Any:
        """Per-token callback (worker thread) publishing the cumulative text as feedback."""
        key = id(goal)

        def publish(text: str, tokens: int) -> None:
            handle = self._goal_handles.get(key)
            if handle is not None and handle.is_active:
                handle.publish_feedback(Ask.Feedback(text=text, tokens_generated=tokens))

        return publish

    def _on_cancel(self, goal_handle: Any) -> CancelResponse:
        job = self._goal_jobs.get(id(goal_handle.request))
        if job is not None:
            job.cancel()
        return CancelResponse.ACCEPT

    async def _execute_ask(self, goal_handle: Any) -> Any:
        key = id(goal_handle.request)
        result = Ask.Result()
        self._requests_in_flight += 1
        try:
            refused = self._goal_refusals.pop(key, None)
            if refused is not None:
                self._fill_response(result, core.QueryOutcome(False, refused.code,
                                                              refused.message, None))
                goal_handle.abort()
                return result
            job = self._goal_jobs.get(key)
            if job is None:  # cannot happen with rclpy's ActionServer; never leave a goal hanging
                self._fill_response(result, core.QueryOutcome(
                    False, core.MODEL_ERROR, "the goal's request was not found", None))
                goal_handle.abort()
                return result
            self._goal_handles[key] = goal_handle
            if goal_handle.is_cancel_requested:
                job.cancel()
            try:
                outcome = await self._await_job(job)
            finally:
                self._goal_jobs.pop(key, None)
                self._goal_handles.pop(key, None)
            self._fill_response(result, outcome)
            if outcome.success:
                goal_handle.succeed()
            elif outcome.error_code == core.CANCELLED and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
            return result
        finally:
            self._requests_in_flight -= 1

    # ----- diagnostics ------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        why = self._configure_error or "; ".join(self._parameter_errors.values())
        array.status = diagnostics_statuses(self.get_fully_qualified_name(),
                                            self.core.stats() if self.core else None, why)
        self._diagnostics_pub.publish(array)


def _check_model_path(model_path: str) -> None:
    """Quick checks before a load starts: ValueError for an empty or missing path."""
    if not model_path:
        raise ValueError("model_path is empty: set it to a checkpoint directory or builtin:tiny")
    if model_path not in BUILTINS and not os.path.isdir(model_path):
        raise ValueError(f"model_path {model_path!r} does not exist or is not a directory")


def _check_device_exists(device: str) -> None:
    """ValueError when a device is named that this machine does not have (e.g. cuda:99): the
    torch backend's own check, at `param set` and configure rather than at load."""
    from ..backends.base import BackendError
    from ..backends.torch_backend import check_device

    try:
        check_device(device)
    except BackendError as exc:
        raise ValueError(str(exc)) from exc


def undecoded_frame(msg: Any, camera: str, received_ns: int,
                    max_bytes: float | None = None) -> core.Frame:
    """A core Frame of an Image or CompressedImage message, not decoded: its header checked
    (ImageConversionError otherwise, also when its pixels would exceed max_bytes), the message's
    own data kept, and the conversion run when the frame is first read."""
    compressed = isinstance(msg, CompressedImage)
    height, width = (check_compressed_msg if compressed else check_image_msg)(msg)
    if max_bytes is not None and height * width * 3 > max_bytes:
        raise ImageConversionError(
            f"{width}x{height} decodes to {height * width * 3 / 2**20:.0f} MiB, more than a "
            f"camera's frame buffer holds (frame_buffer_max_mb {max_bytes / 2**20:g})")
    convert = compressed_msg_to_rgb if compressed else image_msg_to_rgb
    return core.Frame(camera, stamp_to_ns(msg.header.stamp), msg.header.frame_id,
                      header=msg.header, received_ns=received_ns,
                      decode=lambda: convert(msg), held_bytes=len(msg.data))


def diagnostics_statuses(node_name: str, stats: dict[str, Any] | None,
                         why_unconfigured: str) -> list[DiagnosticStatus]:
    """DiagnosticStatus entries for the model, the queue and each camera."""
    def status(name: str, level: bytes, message: str, values: dict[str, Any]) -> DiagnosticStatus:
        return DiagnosticStatus(level=level, name=f"{node_name}: {name}", message=message,
                                hardware_id=node_name,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    if stats is None:
        level = DiagnosticStatus.ERROR if why_unconfigured else DiagnosticStatus.WARN
        return [status("model", level, why_unconfigured or "not configured", {})]
    out = []
    if stats.get("loading"):
        out.append(status("model", DiagnosticStatus.WARN, "loading", {"active": stats["active"]}))
    elif stats.get("builtin_toy"):
        out.append(status("model", DiagnosticStatus.WARN,
                          f"{stats.get('model_id')}: a toy model, not for real use",
                          {"model_id": stats.get("model_id"), "active": stats.get("active"),
                           **stats.get("backend", {})}))
    else:
        out.append(status("model", DiagnosticStatus.OK if stats.get("active")
                          else DiagnosticStatus.WARN,
                          "active" if stats.get("active") else "inactive",
                          {"model_id": stats.get("model_id"), **stats.get("backend", {})}))
    latency = stats.get("latency", {})
    out.append(status("queries", DiagnosticStatus.OK, "ok",
                      {"queue_depth": stats.get("queue_depth"), "running": stats.get("running"),
                       "answers": stats.get("answers"),
                       "sessions": stats.get("sessions"),
                       **{f"prefix_cache_{k}": v for k, v in stats.get("prefix_cache", {}).items()},
                       **{f"latency_{k}": v for k, v in latency.items()},
                       **{f"errors_{k}": v for k, v in stats.get("errors", {}).items()}}))
    for camera, cam in stats.get("cameras", {}).items():
        problem = cam.get("problem", "")
        out.append(status(f"camera {camera}",
                          DiagnosticStatus.WARN if problem else DiagnosticStatus.OK,
                          problem or "receiving",
                          {"rate_hz": cam.get("rate_hz"), "age_s": cam.get("age_s"),
                           "frames": cam.get("frames"), "buffer_mb": cam.get("buffer_mb"),
                           "refused_future": cam.get("refused_future")}))
    return out


def spin_until_shutdown(node: AssistantNode, executor: Any, stop: threading.Event) -> None:
    """Spin until `stop` is set, then answer every request and deliver the responses."""
    while not stop.is_set() and rclpy.ok():
        executor.spin_once(timeout_sec=0.1)  # at most 0.1 s from a signal to the shutdown
    if not rclpy.ok():
        return
    node.begin_shutdown()
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while node.requests_in_flight and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    # The last responses and action results are sent from tasks that run after the callbacks
    # return (result requests); a short spin delivers them before the node goes away.
    flush_until = time.monotonic() + 0.3
    while time.monotonic() < flush_until:
        executor.spin_once(timeout_sec=0.05)


def main(args: list[str] | None = None, model_loader: ModelLoader | None = None) -> None:
    """`ros2 run llava_phi_ros assistant` / `llava-phi-assistant`.

    rclpy's own signal handlers would shut the context down at once, before the node could
    answer anyone; ours set a flag, and the node answers every request before it exits (0).
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node = None
    # One thread is enough: image callbacks only convert and buffer, request callbacks are
    # coroutines that yield while the worker thread runs the model. It also costs less per query
    # than the multi-threaded executor (benchmarks/bench_ros_overhead.py: 0.9 vs 2.2 ms median).
    executor = SingleThreadedExecutor()
    try:
        node = AssistantNode(model_loader=model_loader)
        executor.add_node(node)
        spin_until_shutdown(node, executor, stop)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.release("the node is shutting down")
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if any(t.name == core.LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
        # Stopped while a model was still loading (30-60 s on a Jetson): every request is
        # answered and ROS is shut down, but the interpreter would abort at exit on the thread
        # still inside torch ("terminate called without an active exception"). Exit now, 0.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
