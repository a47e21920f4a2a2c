"""Numerical parity of the project's LLaVA-Phi with transformers' CLIP + Phi (tiny configs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llava_phi_ros.model.config import ConfigError, LlavaPhiConfig, TextConfig, tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX

from .reference import Reference, random_tiny_model

SEED = 1  # a seed whose random model does not collapse onto one token within 32 steps
PROMPT = [5, 17, 3, IMAGE_TOKEN_INDEX, 9, 42, 7, 11]


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
