"""The ROS-free service core of the assistant node, one part per module (each with its locking
rules in its docstring). Moving out of `llava_phi_ros/assistant.py`; so far:

- `settings`: AssistantSettings (the node parameters the core uses).
- `frames`: Frame, image_problem, FrameBuffer, Cameras (frame intake checks).
- `requests`: error codes, QueryRequest, AnswerRecord, QueryOutcome, QueryRefused and every
  check a request passes before it is accepted.
- `stats`: answer/error counters, latency and per-camera statistics.
"""
