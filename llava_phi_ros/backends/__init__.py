"""Inference backends behind one interface (encode_image, prefill, decode_step). No ROS.

This module imports no runtime (torch, onnxruntime, tensorrt): it holds the names that the node's
parameters, the launch file and the CLI all check against.
"""

BACKENDS = ("torch", "onnxruntime", "tensorrt")  # every backend name the product knows
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")  # auto: fp32 on CPU, fp16 on a GPU
