"""Inference backends behind one interface (encode_image, prefill, decode_step). No ROS."""
