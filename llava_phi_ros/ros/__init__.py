"""The ROS 2 layer: the only code that imports rclpy or message types."""
