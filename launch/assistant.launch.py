"""Start the llava_phi lifecycle node (and optionally rviz2 with its debug image).

    ros2 launch llava_phi_ros assistant.launch.py model_path:=builtin:tiny
    ros2 launch llava_phi_ros assistant.launch.py model_path:=/models/llava-phi device:=cuda \
        image_topic:=/front/color/image_raw use_rviz:=true

`ros2 launch llava_phi_ros assistant.launch.py --show-args` lists every argument. The node
configures and activates itself (parameter autostart), so no lifecycle events are sent here.
Everything computed from the arguments lives in llava_phi_ros/ros/launch_support.py (tested).
"""

# `launch` is the ROS package, not this repository's launch/ folder that ruff takes it for.
import tempfile  # noqa: I001

from ament_index_python.packages import get_package_prefix
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

from llava_phi_ros.ros.launch_support import (
    LAUNCH_ARGUMENTS,
    PACKAGE,
    check_launch_executables,
    plan_launch,
)


def _launch_setup(context, *args, **kwargs):
    """Build the actions from the resolved arguments (validated by plan_launch)."""
    plan = plan_launch(context.launch_configurations, FindPackageShare(PACKAGE).perform(context))
    check_launch_executables(plan, get_package_prefix)  # nothing starts when rviz2 is missing
    actions = [
        LifecycleNode(
            package=plan.package,
            executable=plan.executable,
            name=plan.node_name,
            namespace=plan.namespace,
            parameters=plan.parameters,
            remappings=plan.remappings,
            output="screen",
        )
    ]
    if plan.use_rviz:
        rviz_config = plan.rviz_config
        if plan.rviz_config_text is not None:  # namespaced: the debug image topic moved
            with tempfile.NamedTemporaryFile("w", prefix="llava_phi_", suffix=".rviz",
                                             delete=False) as config_file:
                config_file.write(plan.rviz_config_text)
            rviz_config = config_file.name
        actions.append(Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", rviz_config],
            parameters=[{"use_sim_time": plan.use_sim_time}],
            output="screen",
        ))
    return actions


def generate_launch_description():
    """Declare every argument with its description; the rest happens in _launch_setup."""
    default_params = PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "assistant.yaml"])
    arguments = [
        DeclareLaunchArgument(
            arg.name,
            default_value=default_params if arg.name == "params_file" else arg.default,
            description=arg.description,
        )
        for arg in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_launch_setup)])
