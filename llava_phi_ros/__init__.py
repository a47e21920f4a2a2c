"""llava_phi_ros: a ROS 2 node that answers questions about camera images with LLaVA-Phi."""

__version__ = "0.1.0"
