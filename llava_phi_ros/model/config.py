"""Model configuration: every size comes from the checkpoint's config.json, nothing is hard-coded.

Two on-disk config layouts are understood:
- the original LLaVA-Phi layout (`model_type: llava_phi`): Phi fields at the top level and a nested
  `vision_config: {vision_tower: {...CLIP...}, mm_projector: {...}}`; this is also the project's
  canonical layout, written by `llava-phi convert`;
- the transformers llava layout (`model_type: llava`) with a Phi `text_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a LLaVA-Phi model."""


SUPPORTED_VISION_ACTS = ("quick_gelu", "gelu")
SUPPORTED_TEXT_ACTS = ("gelu_new", "gelu")
SUPPORTED_PROJECTORS = ("mlp2x_gelu", "linear")
SUPPORTED_SELECT_FEATURES = ("patch", "cls_patch")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (defaults: ViT-L/14 at 336 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by LLaVA; kept so configs round-trip

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Raise ConfigError when the sizes are inconsistent."""
        _require_positive(self, "vision_config", ("hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "image_size", "patch_size", "num_channels"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        if self.hidden_act not in SUPPORTED_VISION_ACTS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_VISION_ACTS)})")


@dataclass(frozen=True)
class TextConfig:
    """Phi decoder (defaults: Phi-2)."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        """Raise ConfigError when the sizes are inconsistent."""
        _require_positive(self, "text config", ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads",
                                                "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} must be in "
                              "(0, 1]")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dims {self.rotary_dim} (head_dim {self.head_dim} x "
                              f"partial_rotary_factor {self.partial_rotary_factor}) must be even")
        if self.hidden_act not in SUPPORTED_TEXT_ACTS:
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_TEXT_ACTS)})")


@dataclass(frozen=True)
class LlavaPhiConfig:
    """The whole model: vision tower, projector, Phi decoder, and how they connect."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    vision_select_layer: int = -2
    vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    # Token id that stands for the image in the transformers llava layout; the project itself
    # splices features at IMAGE_TOKEN_INDEX placeholders and only keeps this for round trips.
    image_token_id: int | None = None

    @property
    def num_image_tokens(self) -> int:
        """How many embeddings one image contributes to the prompt (576 for ViT-L/14-336)."""
        return self.vision.num_patches + (1 if self.vision_select_feature == "cls_patch" else 0)

    @property
    def vision_layers_used(self) -> int:
        """How many encoder blocks must run to reach `vision_select_layer`.

        hidden_states has num_hidden_layers + 1 entries (index 0 = embeddings), as in transformers.
        """
        return self.vision_select_layer % (self.vision.num_hidden_layers + 1)

    def validate(self) -> LlavaPhiConfig:
        """Raise ConfigError when anything is inconsistent; return self for chaining."""
        self.vision.validate()
        self.text.validate()
        n = self.vision.num_hidden_layers
        if not -(n + 1) <= self.vision_select_layer <= n:
            raise ConfigError(f"mm_vision_select_layer {self.vision_select_layer} is outside the "
                              f"vision tower's {n + 1} hidden states")
        if self.projector_type not in SUPPORTED_PROJECTORS:
            raise ConfigError(f"mm_projector_type {self.projector_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_PROJECTORS)})")
        if self.vision_select_feature not in SUPPORTED_SELECT_FEATURES:
            raise ConfigError(f"mm_vision_select_feature {self.vision_select_feature!r} is not "
                              f"supported (supported: {', '.join(SUPPORTED_SELECT_FEATURES)})")
        return self

    # ----- the original / canonical layout ---------------------------------------------------
    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> LlavaPhiConfig:
        """Parse an original LLaVA-Phi config.json (`model_type: llava_phi`)."""
        vision_cfg = d.get("vision_config")
        if not isinstance(vision_cfg, dict) or not isinstance(vision_cfg.get("vision_tower"), dict):
            raise ConfigError("config.json of model_type 'llava_phi' has no "
                              "vision_config.vision_tower section")
        tower = vision_cfg["vision_tower"]
        projector = vision_cfg.get("mm_projector") or {}
        text = _text_config(d)
        vision = _vision_config(tower)
        mm_hidden = projector.get("mm_hidden_size", vision.hidden_size)
        if mm_hidden != vision.hidden_size:
            raise ConfigError(f"mm_projector.mm_hidden_size {mm_hidden} != vision hidden_size "
                              f"{vision.hidden_size}")
        proj_out = projector.get("hidden_size", text.hidden_size)
        if proj_out != text.hidden_size:
            raise ConfigError(f"mm_projector.hidden_size {proj_out} != text hidden_size "
                              f"{text.hidden_size}")
        return cls(
            vision=vision,
            text=text,
            projector_type=projector.get("mm_projector_type",
                                         d.get("mm_projector_type", "mlp2x_gelu")),
            vision_select_layer=int(tower.get("mm_vision_select_layer",
                                              d.get("mm_vision_select_layer", -2))),
            vision_select_feature=tower.get("mm_vision_select_feature",
                                            d.get("mm_vision_select_feature", "patch")),
            image_aspect_ratio=d.get("image_aspect_ratio", "pad"),
            image_token_id=d.get("image_token_index"),
        ).validate()

    def to_original_dict(self, eos_token_id: int | None = None) -> dict[str, Any]:
        """The config.json of the original (and canonical) layout."""
        t, v = self.text, self.vision
        tower = asdict(v) | {
            "model_type": "llava_phi_clip_vision_model",
            "mm_vision_select_layer": self.vision_select_layer,
            "mm_vision_select_feature": self.vision_select_feature,
        }
        out: dict[str, Any] = {
            "architectures": ["LlavaPhiForCausalLM"],
            "model_type": "llava_phi",
            **asdict(t),
            "num_key_value_heads": t.num_attention_heads,
            "qk_layernorm": False,
            "tie_word_embeddings": False,
            "mm_vision_select_layer": self.vision_select_layer,
            "mm_vision_select_feature": self.vision_select_feature,
            "mm_projector_type": self.projector_type,
            "mm_hidden_size": v.hidden_size,
            "image_aspect_ratio": self.image_aspect_ratio,
            "vision_config": {
                "vision_tower": tower,
                "mm_projector": {
                    "model_type": "llava_phi_projector",
                    "mm_projector_type": self.projector_type,
                    "mm_hidden_size": v.hidden_size,
                    "hidden_size": t.hidden_size,
                },
            },
        }
        if eos_token_id is not None:
            out["bos_token_id"] = out["eos_token_id"] = eos_token_id
        if self.image_token_id is not None:
            out["image_token_index"] = self.image_token_id
        return out

    # ----- the transformers llava layout ----------------------------------------------------
    @classmethod
    def from_llava_hf_dict(cls, d: dict[str, Any]) -> LlavaPhiConfig:
        """Parse a transformers `LlavaConfig` dict whose text backbone is Phi."""
        text_d = d.get("text_config")
        vision_d = d.get("vision_config")
        if not isinstance(text_d, dict) or not isinstance(vision_d, dict):
            raise ConfigError("config.json of model_type 'llava' needs text_config and "
                              "vision_config")
        if text_d.get("model_type", "phi") != "phi":
            raise ConfigError(f"text_config.model_type is {text_d.get('model_type')!r}; only a "
                              "Phi text backbone is supported")
        act = d.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"projector_hidden_act {act!r} is not supported (LLaVA-Phi uses "
                              "gelu)")
        if d.get("multimodal_projector_bias", True) is not True:
            raise ConfigError("multimodal_projector_bias false is not supported")
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        strategy = d.get("vision_feature_select_strategy", "default")
        features = {"default": "patch", "full": "cls_patch"}.get(strategy)
        if features is None:
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
        return cls(
            vision=_vision_config(vision_d),
            text=_text_config(text_d),
            projector_type="mlp2x_gelu",
            vision_select_layer=layer,
            vision_select_feature=features,
            image_token_id=d.get("image_token_index", d.get("image_token_id")),
        ).validate()

    def to_llava_hf_dict(self) -> dict[str, Any]:
        """A transformers `LlavaConfig` dict (used by tests to write that layout)."""
        t, v = self.text, self.vision
        text_d = {
            "model_type": "phi",
            **{k: val for k, val in asdict(t).items()
               if k not in ("partial_rotary_factor", "rope_theta")},
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "partial_rotary_factor": t.partial_rotary_factor},
            "partial_rotary_factor": t.partial_rotary_factor,
            "rope_theta": t.rope_theta,
            "num_key_value_heads": t.num_attention_heads,
            "tie_word_embeddings": False,
        }
        vision_d = {"model_type": "clip_vision_model", **asdict(v)}
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "text_config": text_d,
            "vision_config": vision_d,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": self.vision_select_layer,
            "vision_feature_select_strategy":
                "default" if self.vision_select_feature == "patch" else "full",
            "image_token_index": self.image_token_id,
            "multimodal_projector_bias": True,
            "tie_word_embeddings": False,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaPhiConfig:
        """Parse either layout, chosen by `model_type`."""
        model_type = d.get("model_type")
        if model_type == "llava_phi":
            return cls.from_original_dict(d)
        if model_type == "llava":
            return cls.from_llava_hf_dict(d)
        raise ConfigError(f"config.json model_type {model_type!r} is not a LLaVA-Phi layout "
                          "(expected 'llava_phi' or 'llava' with a Phi text_config)")

    def with_text(self, **changes: Any) -> LlavaPhiConfig:
        """A copy with some text-config fields changed."""
        return replace(self, text=replace(self.text, **changes)).validate()


def tiny_config(vocab_size: int = 128, image_size: int = 28) -> LlavaPhiConfig:
    """The tiny config of LLAVA_PHI.md: same code paths as the real model, in kilobytes."""
    return LlavaPhiConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=image_size, patch_size=14,
                            projection_dim=16),
        text=TextConfig(vocab_size=vocab_size, hidden_size=40, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.4,
                        max_position_embeddings=256),
        image_token_id=vocab_size - 1,
    ).validate()


def _require_positive(cfg: Any, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")


def _rope_field(d: dict[str, Any], name: str, default: float) -> float:
    """A rope field from the top level or from rope_parameters/rope_scaling (transformers 5)."""
    if name in d and d[name] is not None:
        return float(d[name])
    for nested in ("rope_parameters", "rope_scaling"):
        sub = d.get(nested)
        if isinstance(sub, dict) and sub.get(name) is not None:
            return float(sub[name])
    return default


def _text_config(d: dict[str, Any]) -> TextConfig:
    """Phi fields, from the top level of an original config or from a llava text_config."""
    heads = int(d.get("num_attention_heads", TextConfig.num_attention_heads))
    kv_heads = d.get("num_key_value_heads")
    if kv_heads not in (None, heads):
        raise ConfigError(f"num_key_value_heads {kv_heads} != num_attention_heads {heads}: "
                          "grouped-query attention is not part of Phi-2")
    if d.get("qk_layernorm"):
        raise ConfigError("qk_layernorm true is not supported (Phi-2 has none)")
    if d.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings true is not supported (Phi-2's lm_head is untied)")
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    try:
        return TextConfig(
            vocab_size=int(d.get("vocab_size", TextConfig.vocab_size)),
            hidden_size=int(d.get("hidden_size", TextConfig.hidden_size)),
            intermediate_size=int(d.get("intermediate_size", TextConfig.intermediate_size)),
            num_hidden_layers=int(d.get("num_hidden_layers", TextConfig.num_hidden_layers)),
            num_attention_heads=heads,
            partial_rotary_factor=_rope_field(d, "partial_rotary_factor",
                                              TextConfig.partial_rotary_factor),
            rope_theta=_rope_field(d, "rope_theta", TextConfig.rope_theta),
            max_position_embeddings=int(d.get("max_position_embeddings",
                                              TextConfig.max_position_embeddings)),
            layer_norm_eps=float(d.get("layer_norm_eps", TextConfig.layer_norm_eps)),
            hidden_act=str(d.get("hidden_act", TextConfig.hidden_act)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad text config value: {exc}") from exc


def _vision_config(d: dict[str, Any]) -> VisionConfig:
    """CLIP vision fields from a vision_tower / vision_config dict."""
    try:
        return VisionConfig(
            hidden_size=int(d.get("hidden_size", VisionConfig.hidden_size)),
            intermediate_size=int(d.get("intermediate_size", VisionConfig.intermediate_size)),
            num_hidden_layers=int(d.get("num_hidden_layers", VisionConfig.num_hidden_layers)),
            num_attention_heads=int(d.get("num_attention_heads", VisionConfig.num_attention_heads)),
            num_channels=int(d.get("num_channels", VisionConfig.num_channels)),
            image_size=int(d.get("image_size", VisionConfig.image_size)),
            patch_size=int(d.get("patch_size", VisionConfig.patch_size)),
            hidden_act=str(d.get("hidden_act", VisionConfig.hidden_act)),
            layer_norm_eps=float(d.get("layer_norm_eps", VisionConfig.layer_norm_eps)),
            projection_dim=int(d.get("projection_dim", VisionConfig.projection_dim)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad vision config value: {exc}") from exc
