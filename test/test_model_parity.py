"""Numerical parity of the project's LLaVA-Phi with transformers' CLIP + Phi (tiny configs)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator

import pytest
import torch

from llava_phi_ros.model.checkpoint import expected_shapes
from llava_phi_ros.model.config import ConfigError, LlavaPhiConfig, TextConfig, tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX

from .reference import Reference, random_tiny_model

SEED = 1  # a seed whose random model does not collapse onto one token within 32 steps
PROMPT = [5, 17, 3, IMAGE_TOKEN_INDEX, 9, 42, 7, 11]
VISION = "model.vision_tower.vision_model."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model() -> LlavaPhiForCausalLM:
    return random_tiny_model(seed=SEED)


@pytest.fixture(scope="module")
def ref(model) -> Reference:
    return Reference(model)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 28, 28)


def our_first_logits(model: LlavaPhiForCausalLM, pixels: torch.Tensor,
                     ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        feats = model.encode_images(pixels)
        return model.forward_embeds(model.embed(ids, feats), model.new_cache(64), 0)[0]


def test_tiny_config_exercises_the_real_paths(model):
    cfg = model.config
    assert cfg.vision.hidden_size != cfg.text.hidden_size
    assert cfg.vision_layers_used == cfg.vision.num_hidden_layers - 1 >= 1
    assert cfg.text.rotary_dim == 4 < cfg.text.head_dim
    assert model.lm_head.bias.abs().min() > 0


def test_vision_features_match_reference(model, ref, pixels):
    with torch.no_grad():
        ours = model.encode_images(pixels)
    theirs = ref.image_features(pixels)
    assert ours.shape == theirs.shape == (1, model.config.num_image_tokens, 40)
    assert rel_err(ours, theirs) < 1e-5


def test_first_step_logits_match_reference(model, ref, pixels):
    ours = our_first_logits(model, pixels)
    theirs = ref.logits(ref.embeds(PROMPT, ref.image_features(pixels)))[0, -1]
    assert rel_err(ours, theirs) < 1e-5


def test_all_position_logits_match_reference(model, ref, pixels):
    with torch.no_grad():
        embeds = model.embed(PROMPT, model.encode_images(pixels))
        ours = model.forward_embeds(embeds, model.new_cache(64), 0, last_only=False)[0]
    theirs = ref.logits(ref.embeds(PROMPT, ref.image_features(pixels)))[0]
    assert rel_err(ours, theirs) < 1e-5


def greedy_with_cache(model: LlavaPhiForCausalLM, pixels: torch.Tensor, steps: int) -> list[int]:
    cache = model.new_cache(128)
    with torch.no_grad():
        embeds = model.embed(PROMPT, model.encode_images(pixels))
        logits = model.forward_embeds(embeds, cache, 0)
        pos, out = embeds.shape[1], []
        for _ in range(steps):
            nxt = int(logits[0].argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache, pos, last_only=True)
            pos += 1
    return out


def greedy_without_cache(model: LlavaPhiForCausalLM, pixels: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        embeds = model.embed(PROMPT, model.encode_images(pixels))
        out = []
        for _ in range(steps):
            logits = model.forward_embeds(embeds, model.new_cache(128), 0)
            nxt = int(logits[0].argmax())
            out.append(nxt)
            embeds = torch.cat([embeds, model.model.embed_tokens(torch.tensor([[nxt]]))], 1)
    return out


def test_greedy_32_steps_identical_with_and_without_cache(model, ref, pixels):
    cached = greedy_with_cache(model, pixels, 32)
    assert cached == greedy_without_cache(model, pixels, 32)
    assert cached == ref.greedy(PROMPT, pixels, 32)
    assert len(set(cached)) > 8  # a model collapsing onto one or two tokens would prove little


def test_dropped_lm_head_bias_is_caught(model, ref, pixels):
    no_bias = random_tiny_model(seed=SEED)
    with torch.no_grad():
        no_bias.lm_head.bias.zero_()
    theirs = ref.logits(ref.embeds(PROMPT, ref.image_features(pixels)))[0, -1]
    assert rel_err(our_first_logits(no_bias, pixels), theirs) > 1e-2


def test_wrong_vision_layer_is_caught(ref, pixels):
    cfg = dataclasses.replace(tiny_config(), vision_select_layer=-1)
    wrong = random_tiny_model(seed=SEED, cfg=cfg)
    with torch.no_grad():
        feats = wrong.encode_images(pixels)
    assert rel_err(feats, ref.image_features(pixels)) > 1e-2


def test_keeping_cls_is_caught(model, ref, pixels):
    cfg = dataclasses.replace(tiny_config(), vision_select_feature="cls_patch")
    with_cls = random_tiny_model(seed=SEED, cfg=cfg)
    with torch.no_grad():
        feats = with_cls.encode_images(pixels)
    theirs = ref.image_features(pixels)
    assert feats.shape[1] == theirs.shape[1] + 1
    assert rel_err(feats[:, 1:], theirs) < 1e-5  # the patches agree, only the CLS row is extra


def test_placeholder_count_mismatch_names_both_counts(model, pixels):
    with torch.no_grad(), pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model.embed([1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], model.encode_images(pixels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_finite_and_close(model, pixels, dtype):
    ref32 = our_first_logits(model, pixels)
    half = random_tiny_model(seed=SEED).to(dtype)
    logits = our_first_logits(half, pixels)
    assert logits.dtype == torch.float32
    assert half.model.rotary.cos.dtype == torch.float32  # positions stay exact in half precision
    assert torch.isfinite(logits).all()
    assert rel_err(logits, ref32) < (2e-2 if dtype == torch.float16 else 6e-2)
    assert int(logits.argmax()) == int(ref32.argmax())


def test_cache_overflow_is_refused(model):
    cache = model.new_cache(4)
    with torch.no_grad(), pytest.raises(ValueError, match="do not fit the KV cache of 4"):
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache)


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="must be even"):
        TextConfig(hidden_size=32, num_attention_heads=4, partial_rotary_factor=0.4).validate()
    with pytest.raises(ConfigError, match="outside"):
        dataclasses.replace(tiny_config(), vision_select_layer=-5).validate()
    with pytest.raises(ConfigError, match="grouped-query"):
        LlavaPhiConfig.from_llava_hf_dict({"text_config": {"num_attention_heads": 4,
                                                           "num_key_value_heads": 2},
                                           "vision_config": {}})
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        LlavaPhiConfig.from_dict({"model_type": "bert"})


def test_config_round_trips_both_layouts():
    cfg = tiny_config()
    assert LlavaPhiConfig.from_dict(cfg.to_original_dict(eos_token_id=3)) == cfg
    assert LlavaPhiConfig.from_dict(cfg.to_llava_hf_dict()) == cfg


# ----- layer_norm_eps from the config --------------------------------------------------------
EPS_VISION, EPS_TEXT = 2e-2, 5e-2  # far from torch's 1e-5 default, and different from each other


def eps_config(vision_eps: float, text_eps: float) -> LlavaPhiConfig:
    cfg = tiny_config()
    vision = dataclasses.replace(cfg.vision, layer_norm_eps=vision_eps)
    return dataclasses.replace(cfg, vision=vision,
                               text=dataclasses.replace(cfg.text, layer_norm_eps=text_eps))


def test_layer_norm_eps_comes_from_the_config(pixels):
    model = random_tiny_model(seed=SEED, cfg=eps_config(EPS_VISION, EPS_TEXT))
    ref = Reference(model)
    assert (ref.clip.config.layer_norm_eps, ref.phi.config.layer_norm_eps) == (EPS_VISION, EPS_TEXT)
    theirs_features = ref.image_features(pixels)
    theirs = ref.logits(ref.embeds(PROMPT, theirs_features))[0, -1]
    with torch.no_grad():
        assert rel_err(model.encode_images(pixels), theirs_features) < 1e-5
    assert rel_err(our_first_logits(model, pixels), theirs) < 1e-5
    # The eps values matter: the same weights with torch's default eps on either side, or the two
    # eps swapped, are far outside the tolerance.
    for vision_eps, text_eps in [(1e-5, EPS_TEXT), (EPS_VISION, 1e-5), (EPS_TEXT, EPS_VISION)]:
        other = LlavaPhiForCausalLM(eps_config(vision_eps, text_eps))
        other.load_state_dict(model.state_dict())
        assert rel_err(our_first_logits(other.eval(), pixels), theirs) > 1e-3, (vision_eps,
                                                                                 text_eps)


# ----- config.json files as the two ecosystems write them --------------------------------------
# The original LLaVA-Phi release: transformers 4.37 LlavaPhiConfig (a PhiConfig) with the nested
# LlavaPhiVisionConfig().to_dict() and ProjectorConfig().to_dict() (generic PretrainedConfig
# fields included: a parser must ignore e.g. the nested tie_word_embeddings true and top_k).
ORIGINAL_CONFIG_JSON = """
{
  "_name_or_path": "./checkpoints/llavaPhi-v0-3b-finetune",
  "architectures": ["LlavaPhiForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 50256,
  "embd_pdrop": 0.0,
  "eos_token_id": 50256,
  "freeze_mm_mlp_adapter": false,
  "hidden_act": "gelu_new",
  "hidden_size": 2560,
  "image_aspect_ratio": "pad",
  "initializer_range": 0.02,
  "intermediate_size": 10240,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 2048,
  "mm_projector_lr": null,
  "mm_use_im_patch_token": false,
  "mm_use_im_start_end": false,
  "model_type": "llava_phi",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": null,
  "partial_rotary_factor": 0.4,
  "qk_layernorm": false,
  "resid_pdrop": 0.1,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "tokenizer_model_max_length": 2048,
  "tokenizer_padding_side": "right",
  "torch_dtype": "float16",
  "transformers_version": "4.37.0",
  "tune_mm_mlp_adapter": false,
  "use_cache": true,
  "vision_config": {
    "mm_projector": {
      "_name_or_path": "",
      "add_cross_attention": false,
      "architectures": null,
      "bos_token_id": null,
      "eos_token_id": null,
      "hidden_size": 2560,
      "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
      "is_decoder": false,
      "label2id": {"LABEL_0": 0, "LABEL_1": 1},
      "mm_hidden_size": 1024,
      "mm_projector_type": "mlp2x_gelu",
      "model_type": "llava_phi_projector",
      "return_dict": true,
      "tie_word_embeddings": true,
      "torch_dtype": null,
      "transformers_version": "4.37.0"
    },
    "vision_tower": {
      "_name_or_path": "",
      "add_cross_attention": false,
      "architectures": null,
      "attention_dropout": 0.0,
      "bos_token_id": null,
      "do_sample": false,
      "eos_token_id": null,
      "hidden_act": "quick_gelu",
      "hidden_size": 1024,
      "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
      "image_size": 336,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
      "intermediate_size": 4096,
      "is_decoder": false,
      "label2id": {"LABEL_0": 0, "LABEL_1": 1},
      "layer_norm_eps": 1e-05,
      "max_length": 20,
      "mm_vision_select_feature": "patch",
      "mm_vision_select_layer": -2,
      "model_type": "llava_phi_clip_vision_model",
      "num_attention_heads": 16,
      "num_channels": 3,
      "num_hidden_layers": 24,
      "patch_size": 14,
      "projection_dim": 768,
      "return_dict": true,
      "temperature": 1.0,
      "tie_word_embeddings": true,
      "top_k": 50,
      "top_p": 1.0,
      "torch_dtype": null,
      "transformers_version": "4.37.0"
    }
  },
  "vocab_size": 51200
}
"""

# The same model as transformers 5 LlavaConfig.to_dict() writes it (Phi text_config whose rope
# settings live only in rope_parameters, clip_vision_model vision_config).
LLAVA_HF_CONFIG_JSON = """
{
  "architectures": ["LlavaForConditionalGeneration"],
  "dtype": "float32",
  "image_seq_length": 576,
  "image_token_index": 50295,
  "model_type": "llava",
  "multimodal_projector_bias": true,
  "projector_hidden_act": "gelu",
  "text_config": {
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "dtype": "float32",
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": null,
    "qk_layernorm": false,
    "resid_pdrop": 0.1,
    "rope_parameters": {"partial_rotary_factor": 0.4, "rope_theta": 10000.0,
                        "rope_type": "default"},
    "tie_word_embeddings": false,
    "use_cache": true,
    "vocab_size": 51200
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.24.0",
  "vision_config": {
    "attention_dropout": 0.0,
    "dtype": "float32",
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768
  },
  "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default"
}
"""


def assert_real_llava_phi_sizes(cfg: LlavaPhiConfig) -> None:
    t, v = cfg.text, cfg.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size) == (51200, 2560, 10240)
    assert (t.num_hidden_layers, t.num_attention_heads, t.head_dim) == (32, 32, 80)
    assert (t.partial_rotary_factor, t.rotary_dim) == (0.4, 32)
    assert (t.rope_theta, t.max_position_embeddings, t.layer_norm_eps) == (1e4, 2048, 1e-5)
    assert t.hidden_act == "gelu_new"
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers) == (1024, 4096, 24)
    assert (v.num_attention_heads, v.image_size, v.patch_size) == (16, 336, 14)
    assert (v.num_channels, v.hidden_act, v.layer_norm_eps) == (3, "quick_gelu", 1e-5)
    assert (cfg.projector_type, cfg.vision_select_layer, cfg.vision_select_feature) == (
        "mlp2x_gelu", -2, "patch")
    assert cfg.num_image_tokens == 576 and cfg.vision_layers_used == 23
    assert cfg.image_aspect_ratio == "pad"
    # The model it describes, built on the meta device (no 3B allocation).
    shapes = expected_shapes(cfg)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (51200, 2560)
    assert shapes["lm_head.bias"] == (51200,)
    assert shapes["model.layers.31.mlp.fc1.weight"] == (10240, 2560)
    assert "model.layers.32.mlp.fc1.weight" not in shapes
    assert shapes["model.mm_projector.0.weight"] == (2560, 1024)
    assert shapes["model.mm_projector.2.weight"] == (2560, 2560)
    assert shapes[VISION + "embeddings.position_embedding.weight"] == (577, 1024)
    assert shapes[VISION + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert VISION + "encoder.layers.23.mlp.fc1.weight" in shapes
    text_params = sum(math.prod(s) for k, s in shapes.items()
                      if not k.startswith(("model.vision_tower.", "model.mm_projector.")))
    assert text_params == 2_779_683_840  # Phi-2's published parameter count
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e9, 2) == 3.09


def test_original_llava_phi_config_json():
    cfg = LlavaPhiConfig.from_dict(json.loads(ORIGINAL_CONFIG_JSON))
    assert_real_llava_phi_sizes(cfg)
    assert cfg.image_token_id is None


def test_transformers_llava_config_json():
    cfg = LlavaPhiConfig.from_dict(json.loads(LLAVA_HF_CONFIG_JSON))
    assert_real_llava_phi_sizes(cfg)
    assert cfg.image_token_id == 50295
    original = LlavaPhiConfig.from_dict(json.loads(ORIGINAL_CONFIG_JSON))
    assert dataclasses.replace(original, image_token_id=50295) == cfg


# Every size above equals a default of the config classes, so a parser that ignored a field
# would still pass them: change each field where the file keeps it and see it parsed.
# (attribute, new value, [(path in the JSON, value), ...])
ORIGINAL_FIELDS = [
    ("text.hidden_size", 3200, [(("hidden_size",), 3200),
                                (("vision_config", "mm_projector", "hidden_size"), 3200)]),
    ("text.vocab_size", 50304, [(("vocab_size",), 50304)]),
    ("text.intermediate_size", 8192, [(("intermediate_size",), 8192)]),
    ("text.num_hidden_layers", 24, [(("num_hidden_layers",), 24)]),
    ("text.num_attention_heads", 16, [(("num_attention_heads",), 16)]),
    ("text.partial_rotary_factor", 0.5, [(("partial_rotary_factor",), 0.5)]),
    ("text.rope_theta", 5e5, [(("rope_theta",), 5e5)]),
    ("text.max_position_embeddings", 4096, [(("max_position_embeddings",), 4096)]),
    ("text.layer_norm_eps", 1e-6, [(("layer_norm_eps",), 1e-6)]),
    ("text.hidden_act", "gelu", [(("hidden_act",), "gelu")]),
    ("vision.hidden_size", 768, [(("vision_config", "vision_tower", "hidden_size"), 768),
                                 (("vision_config", "mm_projector", "mm_hidden_size"), 768)]),
    ("vision.intermediate_size", 3072, [(("vision_config", "vision_tower", "intermediate_size"),
                                         3072)]),
    ("vision.num_hidden_layers", 12, [(("vision_config", "vision_tower", "num_hidden_layers"),
                                       12)]),
    ("vision.num_attention_heads", 8, [(("vision_config", "vision_tower", "num_attention_heads"),
                                        8)]),
    ("vision.image_size", 224, [(("vision_config", "vision_tower", "image_size"), 224)]),
    ("vision.patch_size", 16, [(("vision_config", "vision_tower", "patch_size"), 16)]),
    ("vision.hidden_act", "gelu", [(("vision_config", "vision_tower", "hidden_act"), "gelu")]),
    ("vision.layer_norm_eps", 1e-6, [(("vision_config", "vision_tower", "layer_norm_eps"),
                                      1e-6)]),
    ("vision_select_layer", -1, [(("vision_config", "vision_tower", "mm_vision_select_layer"),
                                  -1)]),
    ("vision_select_feature", "cls_patch",
     [(("vision_config", "vision_tower", "mm_vision_select_feature"), "cls_patch")]),
    ("projector_type", "linear", [(("vision_config", "mm_projector", "mm_projector_type"),
                                   "linear")]),
    ("image_aspect_ratio", "square", [(("image_aspect_ratio",), "square")]),
]
LLAVA_HF_FIELDS = [
    ("text.hidden_size", 3200, [(("text_config", "hidden_size"), 3200)]),
    ("text.vocab_size", 50304, [(("text_config", "vocab_size"), 50304)]),
    ("text.intermediate_size", 8192, [(("text_config", "intermediate_size"), 8192)]),
    ("text.num_hidden_layers", 24, [(("text_config", "num_hidden_layers"), 24)]),
    ("text.num_attention_heads", 16, [(("text_config", "num_attention_heads"), 16),
                                      (("text_config", "num_key_value_heads"), 16)]),
    ("text.partial_rotary_factor", 0.5,
     [(("text_config", "rope_parameters", "partial_rotary_factor"), 0.5)]),
    ("text.rope_theta", 5e5, [(("text_config", "rope_parameters", "rope_theta"), 5e5)]),
    ("text.max_position_embeddings", 4096, [(("text_config", "max_position_embeddings"), 4096)]),
    ("text.layer_norm_eps", 1e-6, [(("text_config", "layer_norm_eps"), 1e-6)]),
    ("text.hidden_act", "gelu", [(("text_config", "hidden_act"), "gelu")]),
    ("vision.hidden_size", 768, [(("vision_config", "hidden_size"), 768)]),
    ("vision.intermediate_size", 3072, [(("vision_config", "intermediate_size"), 3072)]),
    ("vision.num_hidden_layers", 12, [(("vision_config", "num_hidden_layers"), 12)]),
    ("vision.num_attention_heads", 8, [(("vision_config", "num_attention_heads"), 8)]),
    ("vision.image_size", 224, [(("vision_config", "image_size"), 224)]),
    ("vision.patch_size", 16, [(("vision_config", "patch_size"), 16)]),
    ("vision.hidden_act", "gelu", [(("vision_config", "hidden_act"), "gelu")]),
    ("vision.layer_norm_eps", 1e-6, [(("vision_config", "layer_norm_eps"), 1e-6)]),
    ("vision_select_layer", -1, [(("vision_feature_layer",), -1)]),
    ("vision_select_feature", "cls_patch", [(("vision_feature_select_strategy",), "full")]),
    ("image_token_id", 50296, [(("image_token_index",), 50296)]),
]


@pytest.mark.parametrize(("text", "attribute", "value", "edits"),
                         [(ORIGINAL_CONFIG_JSON, *case) for case in ORIGINAL_FIELDS]
                         + [(LLAVA_HF_CONFIG_JSON, *case) for case in LLAVA_HF_FIELDS],
                         ids=[f"original-{c[0]}" for c in ORIGINAL_FIELDS]
                         + [f"llava-{c[0]}" for c in LLAVA_HF_FIELDS])
def test_every_config_field_is_read_from_its_place(text, attribute, value, edits):
    raw = json.loads(text)
    before = operator.attrgetter(attribute)(LlavaPhiConfig.from_dict(raw))
    assert before != value
    for path, new in edits:
        functools.reduce(operator.getitem, path[:-1], raw)[path[-1]] = new
    assert operator.attrgetter(attribute)(LlavaPhiConfig.from_dict(raw)) == value


def test_training_forward_without_cache_matches_reference(model, ref, pixels):
    with torch.no_grad():
        embeds = model.embed(PROMPT, model.encode_images(pixels))
        ours = model.forward_embeds(embeds, None, 0, last_only=False)[0]
    theirs = ref.logits(ref.embeds(PROMPT, ref.image_features(pixels)))[0]
    assert rel_err(ours, theirs) < 1e-5
    embeds = model.embed(PROMPT, model.encode_images(pixels)).detach().requires_grad_()
    model.forward_embeds(embeds, None, 0, last_only=False).sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
