"""The static-shape decoder step (fixed KV cache, positions as tensors, a mask over the whole
cache) against the independent transformers reference, and its fp16 safety."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llava_phi_ros.backends.torch_backend import TorchBackend
from llava_phi_ros.model import phi
from llava_phi_ros.model.builtin import BUILTIN_TINY_DIR, random_tiny_config
from llava_phi_ros.model.checkpoint import load_model
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.generation import GenerationConfig, embed_prompt, generate
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX

from .reference import Reference, random_tiny_model

STEPS = 32
PROMPT = [5, 17, 3, IMAGE_TOKEN_INDEX, 9, 42, 7, 11]
CONFIGS = {
    "tiny": tiny_config(),
    "random-tiny": random_tiny_config(),  # 320 ids, 56 px: 16 image tokens
    "full-rotary": dataclasses.replace(tiny_config(), text=dataclasses.replace(
        tiny_config().text, partial_rotary_factor=1.0, num_attention_heads=2)),
}


def pixels_for(model: LlavaPhiForCausalLM, seed: int = 1) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def static_greedy(model: LlavaPhiForCausalLM, pixels: torch.Tensor,
                  steps: int = STEPS) -> tuple[list[int], list[float]]:
    """Greedy ids and log-probs through the torch backend's static step and the shared loop."""
    backend = TorchBackend(model, max_context=128)
    features = backend.encode_image(pixels.numpy())
    logits = backend.prefill(embed_prompt(backend, PROMPT, features))
    start = len(PROMPT) - 1 + model.config.num_image_tokens
    gen = generate(backend, logits, start, -1, lambda ids: "", GenerationConfig(steps))
    return gen.token_ids, gen.token_logprobs


def reference_greedy(ref: Reference, pixels: torch.Tensor,
                     steps: int = STEPS) -> tuple[list[int], list[float]]:
    """transformers, recomputing the whole sequence each step (no cache at all)."""
    embeds = ref.embeds(PROMPT, ref.image_features(pixels))
    ids, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(ref.logits(embeds)[0, -1].double(), dim=-1)
            nxt = int(logp.argmax())
            ids.append(nxt)
            logprobs.append(float(logp[nxt]))
            embeds = torch.cat([embeds, ref.phi.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    return ids, logprobs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_step_greedy_matches_transformers(name):
    model = random_tiny_model(seed=1, cfg=CONFIGS[name])
    ref = Reference(model)
    pixels = pixels_for(model)
    ids, logprobs = static_greedy(model, pixels)
    ref_ids, ref_logprobs = reference_greedy(ref, pixels)
    assert ids == ref_ids
    assert len(set(ids)) > 4  # a model stuck on one token would prove little
    assert np.allclose(logprobs, ref_logprobs, rtol=0, atol=1e-5)


@pytest.mark.skipif(BUILTIN_TINY_DIR is None or not BUILTIN_TINY_DIR.is_dir(),
                    reason="builtin:tiny is not shipped in this build")
def test_static_step_greedy_matches_transformers_on_the_trained_tiny_model():
    model = load_model(BUILTIN_TINY_DIR)
    ref = Reference(model)
    pixels = pixels_for(model)
    ids, logprobs = static_greedy(model, pixels)
    ref_ids, ref_logprobs = reference_greedy(ref, pixels)
    assert ids == ref_ids
    assert np.allclose(logprobs, ref_logprobs, rtol=0, atol=1e-5)


def test_stale_entries_past_the_position_are_masked_out():
    model = random_tiny_model(seed=1)
    clean = TorchBackend(model, max_context=64)
    dirty = TorchBackend(model, max_context=64)
    with torch.no_grad():  # what a longer, earlier sequence would have left behind
        dirty.cache.keys.normal_(0, 30)
        dirty.cache.values.normal_(0, 30)
    embeds = embed_prompt(clean, [1, 2, 3, 4, 5])
    torch.testing.assert_close(dirty.prefill(embeds), clean.prefill(embeds), rtol=0, atol=1e-6)
    torch.testing.assert_close(dirty.decode_step(7, 5), clean.decode_step(7, 5), rtol=0,
                               atol=1e-6)


def test_decode_step_refuses_a_position_outside_the_cache():
    backend = TorchBackend(random_tiny_model(seed=1), max_context=16)
    with pytest.raises(ValueError, match="outside the KV cache of 16"):
        backend.decode_step(3, 16)


def test_fp16_survives_raw_scores_past_the_fp16_range(monkeypatch):
    """q/k weights scaled so that raw q.k exceeds 65504 (where fp16 overflows): the step scales
    q before q.k, so the fp16 model stays finite and close to fp32."""
    model = random_tiny_model(seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(70.0)
                proj.bias.mul_(70.0)
    raw_max = []
    real_attention = phi.attention

    def spying_attention(q, keys, values, visible):
        raw = torch.matmul(q.float(), keys.float().transpose(-1, -2))  # (B, H, T, S)
        if visible is not None:
            raw = raw.masked_fill(~visible, 0)
        raw_max.append(float(raw.abs().max()))
        return real_attention(q, keys, values, visible)

    monkeypatch.setattr(phi, "attention", spying_attention)
    pixels = pixels_for(model)
    fp32_ids, _ = static_greedy(model, pixels, steps=4)
    fp32 = TorchBackend(model, max_context=64)
    ref = fp32.prefill(embed_prompt(fp32, PROMPT, fp32.encode_image(pixels.numpy())))
    assert max(raw_max) > 65504 * 1.5  # raw q.k really leaves the fp16 range
    assert max(raw_max) * model.config.text.head_dim ** -0.5 < 65504  # scaled, it does not
    half = TorchBackend(model.half(), max_context=64)
    logits = half.prefill(embed_prompt(half, PROMPT, half.encode_image(pixels.numpy())))
    assert torch.isfinite(logits).all()
    assert float((logits - ref).abs().max() / ref.abs().max()) < 2e-2
    half_ids = [int(logits.argmax())]
    assert half_ids[0] == fp32_ids[0]


def test_attention_window_blocks_do_not_change_the_answer():
    model = random_tiny_model(seed=1)
    pixels = pixels_for(model)
    runs = []
    for block in (None, 4, 256):  # whole cache; a boundary every 4 positions; the default
        backend = TorchBackend(model, max_context=128, window_block=block)
        logits = backend.prefill(embed_prompt(backend, PROMPT, backend.encode_image(
            pixels.numpy())))
        start = len(PROMPT) - 1 + model.config.num_image_tokens
        gen = generate(backend, logits, start, -1, lambda ids: "", GenerationConfig(STEPS))
        runs.append((gen.token_ids, gen.token_logprobs))
    for ids, logprobs in runs[1:]:
        assert ids == runs[0][0]
        assert np.allclose(logprobs, runs[0][1], rtol=0, atol=1e-6)
    backend = TorchBackend(model, max_context=100, window_block=32)
    assert [backend.attention_window(p) for p in (0, 31, 32, 95, 99)] == [32, 32, 64, 96, 100]
