"""A real ROS 2 graph for tests: assistant nodes, a camera publisher and clients over DDS.

Every test process gets its own ROS_DOMAIN_ID and LOCALHOST discovery, so parallel runs and
other machines never see each other.
"""

from __future__ import annotations

import array
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ["ROS_DOMAIN_ID"] = os.environ.get("LLAVA_PHI_TEST_DOMAIN_ID",
                                             str(random.Random().randint(1, 100)))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from llava_phi_ros.pipeline import VisionLanguageModel  # noqa: E402
from llava_phi_ros.ros.assistant_node import AssistantNode  # noqa: E402
from llava_phi_ros.ros.image_conversion import (  # noqa: E402
    rgb_to_compressed_msg,
    rgb_to_encoding,
)
from llava_phi_ros.srv import Query  # noqa: E402

from .doubles import SlowModel  # noqa: E402


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition"):
    """Poll until predicate() is truthy; its value, or AssertionError naming what never came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def stamp(seconds: float) -> Time:
    sec = int(seconds)
    return Time(sec=sec, nanosec=int(round((seconds - sec) * 1e9)))


def image_msg(rgb: np.ndarray, encoding: str = "rgb8", t: float = 1.0,
              frame_id: str = "cam_optical", row_padding: int = 0) -> Image:
    data, step = rgb_to_encoding(rgb, encoding, row_padding=row_padding)
    return Image(header=Header(stamp=stamp(t), frame_id=frame_id), height=rgb.shape[0],
                 width=rgb.shape[1], encoding=encoding, is_bigendian=False, step=step,
                 data=array.array("B", data))


def compressed_msg(rgb: np.ndarray, fmt: str, t: float = 1.0,
                   frame_id: str = "cam_optical") -> CompressedImage:
    return rgb_to_compressed_msg(rgb, Header(stamp=stamp(t), frame_id=frame_id), fmt=fmt)


def slow_loader(token_delay_s: float = 0.05) -> Callable[[dict], SlowModel]:
    """A node model loader: the parameters' model wrapped in SlowModel (each token +delay)."""
    def load(values: dict) -> SlowModel:
        return SlowModel(VisionLanguageModel.load(values["model_path"]), token_delay_s)

    return load


def ask_ok(graph: Graph, node: AssistantNode, **fields: Any) -> Any:
    """A ~/query response that must be a success."""
    response = graph.query(node, **fields)
    assert response.success, (response.error_code, response.message)
    return response


def change_state(graph: Graph, node: AssistantNode, transition_id: int) -> bool:
    """Trigger a lifecycle transition over the node's change_state service; its success."""
    client = graph.client.create_client(ChangeState,
                                        f"{node.get_fully_qualified_name()}/change_state")
    assert client.wait_for_service(timeout_sec=20)
    future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
    return wait_for(lambda: future.done() and future.result(), timeout_s=60).success


class Graph:
    """Nodes spun by one executor in a background thread."""

    def __init__(self):
        rclpy.init()
        self.executor = SingleThreadedExecutor()  # as the node's own main() runs it
        self.client = Node("test_client")
        self.executor.add_node(self.client)
        self.assistants: list[AssistantNode] = []
        self._pubs: dict[tuple[str, str], Any] = {}
        self._clients: dict[str, Any] = {}
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def assistant(self, namespace: str, model_loader: Any = None, wait_loaded: bool = True,
                  cli_args: list[str] | None = None, **params: Any) -> AssistantNode:
        """An AssistantNode in its own namespace: the random toy model (answers of any length),
        no frame-age limit, unless given; waits until its model has loaded (or failed to)."""
        params.setdefault("model_path", "builtin:random-tiny")
        params.setdefault("max_image_age_s", 0.0)  # test frames carry synthetic stamps
        node = AssistantNode(model_loader=model_loader, namespace=namespace, cli_args=cli_args,
                             parameter_overrides=[Parameter(name, value=value)
                                                  for name, value in params.items()])
        self.executor.add_node(node)
        self.assistants.append(node)
        if wait_loaded:
            wait_for(lambda: node.core is None or node.core.model_loaded, timeout_s=60,
                     what=f"{namespace}: model loaded")
        return node

    def on_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) run on the executor thread; its result."""
        task = self.executor.create_task(fn, *args)
        wait_for(task.done, what=f"{getattr(fn, '__name__', fn)} on the executor thread")
        return task.result()

    def action_client(self, action_type: Any, name: str) -> ActionClient:
        """An ActionClient of the test client node, made on the executor thread: rclpy's
        ActionClient registers itself with the node before it is initialised, so one made while
        another thread spins can kill the executor (AttributeError: no attribute '_lock')."""
        return self.on_executor(ActionClient, self.client, action_type, name)

    def publisher(self, topic: str, msg_type: Any = Image, qos: Any = None):
        key = (topic, msg_type.__name__)
        if key not in self._pubs:
            self._pubs[key] = self.client.create_publisher(msg_type, topic,
                                                           qos or qos_profile_sensor_data)
        return self._pubs[key]

    def publish_frame(self, node: AssistantNode, camera: str, msg: Any) -> None:
        """Publish until the node has buffered this exact stamp (best effort may drop one)."""
        compressed = isinstance(msg, CompressedImage)
        topic = f"/{node.get_namespace().strip('/')}/{camera}/image_raw" + (
            "/compressed" if compressed else "")
        pub = self.publisher(topic, type(msg))
        want = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

        def buffered() -> bool:
            pub.publish(msg)
            time.sleep(0.02)
            frame = node.core.frame_buffer(camera).nearest(want, 0)
            return frame is not None

        wait_for(buffered, what=f"{topic} frame at {want} ns")

    def query(self, node: AssistantNode, timeout_s: float = 60.0, **fields: Any) -> Any:
        """Call ~/query and wait for the response."""
        future = self.query_async(node, **fields)
        return wait_for(lambda: future.done() and future.result(), timeout_s, "query response")

    def query_async(self, node: AssistantNode, **fields: Any) -> Any:
        name = f"{node.get_fully_qualified_name()}/query"
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.client.create_client(Query, name)
            assert client.wait_for_service(timeout_sec=20.0), name
        return client.call_async(Query.Request(**fields))

    def subscribe(self, topic: str, msg_type: Any, reliable: bool = True) -> list:
        """Collect every message on a topic into a list."""
        got: list = []
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.client.create_subscription(msg_type, topic, got.append, qos)
        return got

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=10)
        for node in self.assistants:
            node.release()
            node.destroy_node()
        self.client.destroy_node()
        rclpy.try_shutdown()
