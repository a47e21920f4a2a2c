"""The service core's first import path, kept: the code lives in `llava_phi_ros.core`.

`from llava_phi_ros import assistant` and `from llava_phi_ros.assistant import AssistantCore,
Frame, QueryRequest, ...` keep working: this module re-exports the package's public names
(`llava_phi_ros.core.__all__`). New code imports `llava_phi_ros.core`.
"""

from . import core as _core
from .core import *  # noqa: F403 - the public names, re-exported

__all__ = list(_core.__all__)
