"""The `llava_phi` lifecycle node: cameras in, grounded answers out.

A thin ROS layer over the ROS-free `AssistantCore`: it converts messages, declares and validates
parameters, and bridges the core's worker-thread futures to async service/action callbacks, so a
waiting query never holds an executor thread and image intake never waits for inference.
"""

from __future__ import annotations

from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
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
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image

from .. import assistant as core
from ..action import Ask
from ..model.builtin import BUILTIN_WARNINGS
from ..msg import Answer
from ..srv import Query
from .debug_overlay import draw_answer
from .image_conversion import (
    ImageConversionError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_image_msg,
)
from .launch_support import BACKENDS, DTYPES, NODE_NAME
from .launch_support import IMAGE_TRANSPORTS as TRANSPORTS

# name: (default, description). Types follow the defaults; doubles are always floats.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "model_path": ("", "Checkpoint directory, or builtin:tiny for the embedded toy model "
                       "(builtin:random-tiny: random weights, for plumbing tests). "
                       "Required: an empty or unreadable path fails configure."),
    "backend": ("torch", "Inference backend: torch | onnxruntime | tensorrt."),
    "device": ("cpu", "torch device, e.g. cpu or cuda:0."),
    "dtype": ("auto", "Weights dtype: auto (fp32 on CPU, fp16 on GPU) | float32 | float16 | "
                      "bfloat16."),
    "engine_dir": ("", "Directory of TensorRT engines (backend tensorrt)."),
    "max_new_tokens": (64, "Default answer length limit in tokens."),
    "temperature": (0.0, "Default sampling temperature; 0 = greedy."),
    "top_p": (1.0, "Default nucleus sampling mass, in (0, 1]."),
    "system_prompt": ("", "System prompt; empty = the model's default."),
    "cameras": (["camera"], "Camera names; each NAME subscribes to NAME/image_raw "
                            "(or NAME/image_raw/compressed). Relative names."),
    "image_transport": ("raw", "raw (sensor_msgs/Image) or compressed (CompressedImage)."),
    "qos_reliable": (False, "Subscribe to cameras with reliable QoS instead of sensor-data QoS."),
    "max_image_age_s": (2.0, "Refuse the latest frame when older than this (node clock); 0 = "
                             "no limit."),
    "frame_buffer_s": (5.0, "Seconds of frames kept per camera, for stamp lookups."),
    "frame_buffer_max_mb": (256.0, "Memory bound of each camera's frame buffer, in MB."),
    "stamp_tolerance_s": (0.05, "A requested stamp matches a buffered frame within this."),
    "query_timeout_s": (60.0, "From acceptance to answer, steady clock; then TIMEOUT."),
    "max_pending_queries": (4, "Queries that may wait while one runs; beyond that BUSY."),
    "session_ttl_s": (300.0, "Idle conversations expire after this many seconds."),
    "max_sessions": (16, "Conversations kept at most (least recently used evicted)."),
    "preencode_latest": (False, "Encode each camera's newest frame in the background."),
    "autostart": (True, "Configure and activate at start."),
    "test_only_token_delay_s": (0.0, "TEST ONLY: sleep this long after every generated token, "
                                     "so tests can make BUSY/TIMEOUT/CANCELLED deterministic."),
}
SETTINGS_FIELDS = ("cameras", "max_new_tokens", "temperature", "top_p", "system_prompt",
                   "max_image_age_s", "frame_buffer_s", "frame_buffer_max_mb",
                   "stamp_tolerance_s", "query_timeout_s", "max_pending_queries",
                   "session_ttl_s", "max_sessions", "preencode_latest",
                   "test_only_token_delay_s")


def settings_from_values(values: dict[str, Any]) -> core.AssistantSettings:
    """AssistantSettings from parameter values; ValueError naming what is wrong."""
    kwargs = {name: values[name] for name in SETTINGS_FIELDS}
    kwargs["cameras"] = list(kwargs["cameras"])
    settings = core.AssistantSettings(**kwargs)
    settings.validate()
    if values["backend"] not in BACKENDS:
        raise ValueError(f"backend {values['backend']!r} is not one of {', '.join(BACKENDS)}")
    if values["dtype"] not in DTYPES:
        raise ValueError(f"dtype {values['dtype']!r} is not one of {', '.join(DTYPES)}")
    if values["image_transport"] not in TRANSPORTS:
        raise ValueError(f"image_transport {values['image_transport']!r} is not one of "
                         f"{', '.join(TRANSPORTS)}")
    return settings


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class AssistantNode(LifecycleNode):
    """Lifecycle node `llava_phi`: `~/query`, `~/ask`, `~/answers`, `~/debug_image`."""

    def __init__(self, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.core: core.AssistantCore | None = None
        self._configure_error = ""
        self._camera_subscriptions: list[Any] = []
        # Action goals keyed by id() of the goal message, which rclpy hands to the goal callback
        # and then to the goal handle: the job accepted at once, or why it was refused, and the
        # goal handle once execution starts (feedback goes there).
        self._goal_jobs: dict[int, Any] = {}
        self._goal_refusals: dict[int, core.QueryRefused] = {}
        self._goal_handles: dict[int, Any] = {}

        self._request_group = ReentrantCallbackGroup()  # async callbacks awaiting the worker
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()
        # Triggered by the worker thread after it completes a future, so the executor wakes up
        # and resumes the coroutine awaiting it (nothing else may be happening on the graph).
        self._wake = self.create_guard_condition(lambda: None, self._request_group)

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE,
                              history=HistoryPolicy.KEEP_LAST)
        self._answers_pub = self.create_publisher(Answer, "~/answers", reliable)
        self._debug_pub = self.create_publisher(
            Image, "~/debug_image", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Query, "~/query", self._on_query, callback_group=self._request_group)
        self._action_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel,
            callback_group=self._request_group)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._diagnostics_group)
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1)),
            post_callback=self._on_time_jump)

        if self.get_parameter("autostart").value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # ----- parameters -------------------------------------------------------------------------
    def _values(self) -> dict[str, Any]:
        return {name: self.get_parameter(name).value for name in PARAMETERS}

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Refuse bad values with a reason; new values take effect at the next configure."""
        values = self._values() | {p.name: p.value for p in params}
        try:
            settings_from_values(values)
        except (TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    # ----- lifecycle --------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate parameters, load the model, subscribe to the cameras."""
        from ..pipeline import VisionLanguageModel

        values = self._values()
        try:
            settings = settings_from_values(values)
            if not values["model_path"]:
                raise ValueError("model_path is empty: set it to a checkpoint directory or "
                                 "builtin:tiny")
            assistant = core.AssistantCore(settings, now_ns=self._now_ns)
            assistant.load_model(lambda: VisionLanguageModel.load(
                values["model_path"], backend=values["backend"], device=values["device"],
                dtype=values["dtype"], system_prompt=values["system_prompt"] or None))
        except Exception as exc:  # noqa: BLE001 - any failure keeps the node unconfigured
            self._configure_error = f"configure failed: {exc}"
            self.get_logger().error(self._configure_error)
            return TransitionCallbackReturn.FAILURE
        self.core, self._configure_error = assistant, ""
        if values["model_path"] in BUILTIN_WARNINGS:
            self.get_logger().warning(BUILTIN_WARNINGS[values["model_path"]])
        self._subscribe(settings.cameras, values["image_transport"], values["qos_reliable"])
        self.get_logger().info(f"configured with {assistant.model_id}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.core is not None:
            self.core.set_active(True)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
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

    def release(self) -> None:
        """Stop the worker, free the model, drop the camera subscriptions."""
        for sub in self._camera_subscriptions:
            self.destroy_subscription(sub)
        self._camera_subscriptions.clear()
        if self.core is not None:
            self.core.shutdown()
            self.core = None

    # ----- cameras ----------------------------------------------------------------------------
    def _subscribe(self, cameras: list[str], transport: str, reliable: bool) -> None:
        qos = qos_profile_sensor_data
        if reliable:
            qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        for camera in cameras:
            # One mutually exclusive group per camera: a camera's frames stay in order, cameras
            # run in parallel, and none of them shares a group with the request callbacks.
            group = MutuallyExclusiveCallbackGroup()
            if transport == "compressed":
                sub = self.create_subscription(
                    CompressedImage, f"{camera}/image_raw/compressed",
                    lambda msg, c=camera: self._on_image(c, msg, compressed_msg_to_rgb), qos,
                    callback_group=group)
            else:
                sub = self.create_subscription(
                    Image, f"{camera}/image_raw",
                    lambda msg, c=camera: self._on_image(c, msg, image_msg_to_rgb), qos,
                    callback_group=group)
            self._camera_subscriptions.append(sub)

    def _on_image(self, camera: str, msg: Any, convert: Any) -> None:
        assistant = self.core
        if assistant is None:
            return
        try:
            rgb = convert(msg)
        except ImageConversionError as exc:
            self.get_logger().warning(f"{camera}: dropped a frame: {exc}",
                                      throttle_duration_sec=5.0)
            return
        try:
            assistant.add_frame(core.Frame(camera=camera,
                                           stamp_ns=stamp_to_ns(msg.header.stamp),
                                           frame_id=msg.header.frame_id, image=rgb,
                                           header=msg.header, received_ns=self._now_ns()))
        except ValueError as exc:  # e.g. the core was reconfigured without this camera
            self.get_logger().warning(f"{camera}: dropped a frame: {exc}",
                                      throttle_duration_sec=5.0)

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
            try:
                rgb = image_msg_to_rgb(req.image)
            except ImageConversionError as exc:
                raise core.QueryRefused(core.BAD_IMAGE, str(exc)) from exc
            frame = core.Frame(camera="", stamp_ns=stamp_to_ns(req.image.header.stamp),
                               frame_id=req.image.header.frame_id, image=rgb,
                               header=req.image.header, received_ns=self._now_ns())
        return core.QueryRequest(
            question=req.question, request_id=req.request_id, camera=req.camera,
            stamp_ns=stamp_to_ns(req.stamp), image=frame, choices=tuple(req.choices),
            max_new_tokens=int(req.max_new_tokens), temperature=float(req.temperature),
            top_p=float(req.top_p), session_id=req.session_id)

    def _submit(self, req: Any, on_text: Any = None) -> Any:
        """Accept (a core Job) or raise QueryRefused at once."""
        if self.core is None:
            state = "unconfigured" + (f" ({self._configure_error})" if self._configure_error
                                      else "")
            raise core.QueryRefused(core.NOT_READY, f"the node is {state}")
        return self.core.submit(self._to_core_request(req), on_text=on_text)

    async def _await_job(self, job: Any) -> core.QueryOutcome:
        """Wait for the worker without holding an executor thread."""
        done: Future = Future(executor=self.executor)

        def resolve(job_future: Any) -> None:
            done.set_result(job_future.result())
            self._wake.trigger()

        job.future.add_done_callback(resolve)
        return await done

    async def _on_query(self, request: Any, response: Any) -> Any:
        try:
            outcome = await self._await_job(self._submit(request))
        except core.QueryRefused as refused:
            outcome = core.QueryOutcome(False, refused.code, refused.message, None)
        self._fill_response(response, outcome)
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
        refused = self._goal_refusals.pop(key, None)
        if refused is not None:
            self._fill_response(result, core.QueryOutcome(False, refused.code, refused.message,
                                                          None))
            goal_handle.abort()
            return result
        self._goal_handles[key] = goal_handle
        job = self._goal_jobs[key]
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

    # ----- diagnostics ------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = diagnostics_statuses(self.get_fully_qualified_name(),
                                            self.core.stats() if self.core else None,
                                            self._configure_error)
        self._diagnostics_pub.publish(array)


def diagnostics_statuses(node_name: str, stats: dict[str, Any] | None,
                         configure_error: str) -> list[DiagnosticStatus]:
    """DiagnosticStatus entries for the model, the queue and each camera."""
    def status(name: str, level: bytes, message: str, values: dict[str, Any]) -> DiagnosticStatus:
        return DiagnosticStatus(level=level, name=f"{node_name}: {name}", message=message,
                                hardware_id=node_name,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    if stats is None:
        msg = configure_error or "not configured"
        level = DiagnosticStatus.ERROR if configure_error else DiagnosticStatus.WARN
        return [status("model", level, msg, {})]
    out = []
    if stats.get("builtin_toy"):
        out.append(status("model", DiagnosticStatus.WARN,
                          f"{stats.get('model_id')}: a toy model, not for real use",
                          {"model_id": stats.get("model_id"), "active": stats.get("active")}))
    else:
        out.append(status("model", DiagnosticStatus.OK if stats.get("active")
                          else DiagnosticStatus.WARN,
                          "active" if stats.get("active") else "inactive",
                          {"model_id": stats.get("model_id")}))
    latency = stats.get("latency", {})
    out.append(status("queries", DiagnosticStatus.OK, "ok",
                      {"queue_depth": stats.get("queue_depth"), "running": stats.get("running"),
                       "sessions": stats.get("sessions"), **{f"latency_{k}": v for k, v in
                                                              latency.items()},
                       **{f"errors_{k}": v for k, v in stats.get("errors", {}).items()}}))
    for camera, cam in stats.get("cameras", {}).items():
        age = cam.get("age_s")
        level = DiagnosticStatus.OK if cam.get("frames") else DiagnosticStatus.WARN
        out.append(status(f"camera {camera}", level,
                          "receiving" if cam.get("frames") else "no frames yet",
                          {"rate_hz": cam.get("rate_hz"), "age_s": age,
                           "frames": cam.get("frames"), "buffer_mb": cam.get("buffer_mb")}))
    return out


def main(args: list[str] | None = None) -> None:
    """`ros2 run llava_phi_ros assistant` / `llava-phi-assistant`."""
    rclpy.init(args=args)
    node = None
    # One thread is enough: image callbacks only convert and buffer, request callbacks are
    # coroutines that yield while the worker thread runs the model. It also costs less per query
    # than the multi-threaded executor (benchmarks/bench_ros_overhead.py: 0.9 vs 2.2 ms median).
    executor = SingleThreadedExecutor()
    try:
        node = AssistantNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.release()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
