"""`llava-phi-demo`: the node, a camera streaming generated scenes, and a planner asking questions.

Everything is real ROS 2 over DDS (three nodes in one process, talking through the middleware):
the planner calls `~/query` and `~/ask` and prints each grounded answer next to the truth of
the frame it was computed from, looked up by the answer's stamp.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ..action import Ask
from ..model.builtin import BUILTIN_TINY, BUILTIN_WARNINGS
from ..srv import Query
from ..training.scenes import (
    PALETTE,
    Background,
    Scene,
    SceneObject,
    caption,
    render_scene,
)
from .assistant_node import AssistantNode
from .image_conversion import rgb_to_image_msg

DEMO_COLOURS = ("red", "green", "blue", "yellow")
# (question, choices, the answer's key in DemoScene.answers)
QUESTIONS = (("What colour is the square?", (), "square"),
             ("How many objects are there?", (), "count"),
             ("What colour is the circle?", DEMO_COLOURS, "circle"))
DESCRIBE_QUESTION = "Describe the image briefly."


@dataclass(frozen=True)
class DemoScene:
    """One generated camera image and what is really in it."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    description: str  # the caption, as the scene generator words it
    answers: dict[str, str]  # "square" / "circle": its colour, "count": the number word


def demo_scene(index: int, width: int = 640, height: int = 480) -> DemoScene:
    """A square in the left third and a circle in the right third, drawn like the training
    scenes of `llava-phi scenes`; the colours change with index."""
    left, right = DEMO_COLOURS[index % 4], DEMO_COLOURS[(index + 1) % 4]
    size, top = height // 3, height // 3
    x_left, x_right = width // 12, 2 * width // 3 + width // 12
    objects = (SceneObject("square", left, "large", "left",
                           (x_left, top, x_left + size, top + size), PALETTE[left]),
               SceneObject("circle", right, "large", "right",
                           (x_right, top, x_right + size, top + size), PALETTE[right]))
    scene = Scene(objects, Background("plain", (205, 205, 205)), width, height)
    return DemoScene(np.asarray(render_scene(scene)), caption(scene),
                     {"square": left, "circle": right, "count": "two"})


class CameraPublisher(Node):
    """Publishes demo scenes as rgb8 on `camera/image_raw` at a fixed rate, and remembers which
    scene each recent stamp showed (the ground truth of an answer, by the answer's stamp)."""

    def __init__(self, rate_hz: float = 10.0, scene_period_s: float = 4.0,
                 history: int = 600):
        super().__init__("demo_camera")
        self._pub = self.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self._scene_period_s = scene_period_s
        self._start = time.monotonic()
        self._scene: tuple[int, DemoScene] | None = None  # the current scene and its index
        self._published: OrderedDict[tuple[int, int], DemoScene] = OrderedDict()
        self._history = history
        self._lock = threading.Lock()
        self.create_timer(1.0 / rate_hz, self._tick)

    def _tick(self) -> None:
        index = int((time.monotonic() - self._start) / self._scene_period_s)
        if self._scene is None or self._scene[0] != index:  # render each scene once
            self._scene = (index, demo_scene(index))
        scene = self._scene[1]
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id="camera_optical_frame")
        with self._lock:
            self._published[(header.stamp.sec, header.stamp.nanosec)] = scene
            while len(self._published) > self._history:
                self._published.popitem(last=False)
        self._pub.publish(rgb_to_image_msg(scene.image, header))

    def scene_at(self, stamp) -> DemoScene | None:
        """The scene of the frame published with this stamp (None: not one of ours, or too
        old)."""
        with self._lock:
            return self._published.get((stamp.sec, stamp.nanosec))


def _stamp(msg) -> str:
    return f"{msg.sec}.{msg.nanosec:09d}"


def run_planner(query, ask, camera: CameraPublisher, out=sys.stdout) -> int:
    """Ask a few questions over the service and the action; print each grounded answer."""
    if not query.wait_for_service(timeout_sec=30.0) or not ask.wait_for_server(timeout_sec=30.0):
        print("demo: the assistant did not come up", file=sys.stderr)
        return 1
    failures = 0
    for question, choices, key in QUESTIONS:
        response = None
        # The model may still be loading (NOT_READY) and the first frames on their way.
        for _ in range(300):
            response = _wait(query.call_async(Query.Request(question=question,
                                                            choices=list(choices))))
            if response is None or response.error_code not in (Query.Request.NO_IMAGE,
                                                               Query.Request.NOT_READY):
                break
            time.sleep(0.2)
        if response is None or not response.success:
            failures += 1
            why = "no response" if response is None else f"{response.error_code}: " \
                                                          f"{response.message}"
            print(f"Q (service): {question}\n   refused: {why}", file=out)
            continue
        a = response.answer
        confidence = f" (p={max(a.choice_probs):.2f})" if choices else ""
        print(f"Q (service): {question}\n   answer: {a.text!r}{confidence}\n"
              f"   camera={a.camera} frame_id={a.header.frame_id} "
              f"stamp={_stamp(a.header.stamp)} latency={a.total_ms:.0f} ms "
              f"ttft={a.time_to_first_token_ms:.0f} ms\n"
              f"   {_verdict(camera.scene_at(a.header.stamp), key, a.text)}", file=out)

    question = DESCRIBE_QUESTION
    chunks: list[str] = []
    goal = ask.send_goal_async(Ask.Goal(question=question, max_new_tokens=48),
                               feedback_callback=lambda fb: chunks.append(fb.feedback.text))
    handle = _wait(goal)
    if handle is None or not handle.accepted:
        print(f"Q (action): {question}\n   goal rejected", file=out)
        return failures + 1
    result = _wait(handle.get_result_async())
    answer = result.result.answer
    print(f"Q (action): {question}\n   streamed {len(chunks)} feedback messages\n"
          f"   answer: {answer.text!r}\n   camera={answer.camera} "
          f"frame_id={answer.header.frame_id} stamp={_stamp(answer.header.stamp)} "
          f"decode={answer.decode_tokens_per_s:.0f} tokens/s\n"
          f"   {_verdict(camera.scene_at(answer.header.stamp), 'description', answer.text)}",
          file=out)
    return failures + (0 if result.result.success else 1)


def _verdict(scene: DemoScene | None, key: str, answer: str) -> str:
    """'ground truth at that stamp: ... -> correct' (or WRONG)."""
    if scene is None:
        return "ground truth at that stamp: unknown (not a frame of the demo camera)"
    truth = scene.description if key == "description" else scene.answers[key]
    ok = answer.strip().lower().rstrip(".") == truth.lower().rstrip(".")
    return f"ground truth at that stamp: {truth!r} -> {'correct' if ok else 'WRONG'}"


def _wait(future, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    return future.result() if future.done() else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llava-phi-demo`."""
    parser = argparse.ArgumentParser(prog="llava-phi-demo", description=__doc__)
    parser.add_argument("--model", default=BUILTIN_TINY, help="model_path of the node")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rclpy.init()
    executor = SingleThreadedExecutor()
    spinner = threading.Thread(target=executor.spin, daemon=True)
    nodes = []
    try:
        assistant = AssistantNode(parameter_overrides=[
            Parameter("model_path", value=args.model), Parameter("device", value=args.device)])
        if assistant.core is None:
            print("demo: the assistant failed to configure; see the log above", file=sys.stderr)
            return 1
        if args.model in BUILTIN_WARNINGS:
            print(f"demo: warning: {BUILTIN_WARNINGS[args.model]}", file=sys.stderr)
        camera = CameraPublisher()
        planner = Node("demo_planner")
        # Made before the executor spins: rclpy's ActionClient registers itself with the node
        # before it is initialised, so one made while another thread spins can kill the executor.
        query = planner.create_client(Query, "llava_phi/query")
        ask = ActionClient(planner, Ask, "llava_phi/ask")
        nodes = [assistant, camera, planner]
        for node in nodes:
            executor.add_node(node)
        spinner.start()
        return run_planner(query, ask, camera)
    finally:
        executor.shutdown()
        if spinner.is_alive():
            spinner.join()
        for node in nodes:
            if isinstance(node, AssistantNode):
                node.release()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
