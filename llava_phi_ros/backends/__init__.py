"""Inference backends behind one interface (encode_image, prefill, decode_step, score_choices). No ROS."""
