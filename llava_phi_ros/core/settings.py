"""The service core's settings: the node parameters it uses, checked against the schema.

Defaults, types and ranges come from llava_phi_ros/parameters.py; model-loading parameters
(model_path, backend, device, ...) stay with the node. A settings object is replaced whole by
`AssistantCore.update_settings()`, never mutated after it was validated, so any thread may read
the core's current one without a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import parameters

_D = parameters.DEFAULTS


@dataclass
class AssistantSettings:
    """The node parameters the core uses; defaults, types and ranges come from the schema
    (llava_phi_ros/parameters.py). Model-loading parameters stay with the node."""

    cameras: list[str] = field(default_factory=lambda: list(_D["cameras"]))
    max_new_tokens: int = _D["max_new_tokens"]
    temperature: float = _D["temperature"]
    top_p: float = _D["top_p"]
    system_prompt: str = _D["system_prompt"]  # "" = the model's default system prompt
    max_image_age_s: float = _D["max_image_age_s"]  # 0 = no limit
    frame_buffer_s: float = _D["frame_buffer_s"]
    frame_buffer_max_mb: float = _D["frame_buffer_max_mb"]  # MiB per camera
    stamp_tolerance_s: float = _D["stamp_tolerance_s"]
    max_future_stamp_s: float = _D["max_future_stamp_s"]
    query_timeout_s: float = _D["query_timeout_s"]
    max_pending_queries: int = _D["max_pending_queries"]  # how many may WAIT while one runs
    session_ttl_s: float = _D["session_ttl_s"]
    max_sessions: int = _D["max_sessions"]
    max_session_turns: int = _D["max_session_turns"]
    preencode_latest: bool = _D["preencode_latest"]
    prefix_cache_mb: float = _D["prefix_cache_mb"]  # applied by the worker before each job

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AssistantSettings:
        """The core's settings out of a mapping of (checked) parameter values."""
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})

    @property
    def model_system_prompt(self) -> str | None:
        """The system prompt for the model (None = its default)."""
        return self.system_prompt or None

    @property
    def timeout_message(self) -> str:
        """The TIMEOUT message."""
        return f"no answer within query_timeout_s = {self.query_timeout_s:g} s"

    def validate(self) -> AssistantSettings:
        """Check (and coerce) every field against the schema; ParameterError naming it."""
        for name in self.__dataclass_fields__:
            setattr(self, name, parameters.check(name, getattr(self, name)))
        return self
