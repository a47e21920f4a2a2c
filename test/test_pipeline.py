"""VisionLanguageModel: KV-prefix reuse across calls gives the same answers as fresh calls."""

from __future__ import annotations

import numpy as np
import pytest

from llava_phi_ros.model.generation import GenerationConfig
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX
from llava_phi_ros.pipeline import VisionLanguageModel

GEN = GenerationConfig(max_new_tokens=12)


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 64, 3), dtype=np.uint8)


@pytest.fixture()
def vlm() -> VisionLanguageModel:
    return VisionLanguageModel.load("builtin:random-tiny")


def fresh(question, img, history=(), choices=()):
    """The same request on a model that has never run anything (nothing to reuse)."""
    return VisionLanguageModel.load("builtin:random-tiny").ask(img, question, history, GEN, choices)


def assert_same(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text
    assert np.allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
    assert np.allclose(a.choice_logprobs, b.choice_logprobs, atol=1e-4)


def test_same_frame_reuses_image_prefix(vlm):
    img = frame(0)
    encoded = vlm.encode_image(img)
    first = vlm.ask(encoded, "What colour is the cube?", generation=GEN)
    second = vlm.ask(encoded, "How many objects are there?", generation=GEN)
    n_image = vlm.backend.config.num_image_tokens
    assert first.reused_prefix_tokens == 0
    assert second.reused_prefix_tokens > n_image  # system prompt + image + the shared text
    assert second.vision_ms == 0
    assert_same(second, fresh("How many objects are there?", img))


def test_other_image_keeps_only_the_text_before_it(vlm):
    vlm.ask(vlm.encode_image(frame(0)), "What colour is the cube?", generation=GEN)
    other = vlm.ask(vlm.encode_image(frame(1)), "What colour is the cube?", generation=GEN)
    ids = vlm.prompt_ids("What colour is the cube?")
    assert other.reused_prefix_tokens == ids.index(IMAGE_TOKEN_INDEX) > 0  # the system prompt
    assert_same(other, fresh("What colour is the cube?", frame(1)))


def test_reuse_after_choices_and_multi_turn(vlm):
    img = frame(2)
    encoded = vlm.encode_image(img)
    scored = vlm.ask(encoded, "Which colour?", choices=["red", "blue"], generation=GEN)
    assert_same(scored, fresh("Which colour?", img, choices=["red", "blue"]))
    turn1 = vlm.ask(encoded, "Which colour?", generation=GEN)
    assert_same(turn1, fresh("Which colour?", img))
    history = [("Which colour?", turn1.text or "red")]
    turn2 = vlm.ask(encoded, "And the shape?", history, GEN)
    assert turn2.reused_prefix_tokens > vlm.backend.config.num_image_tokens
    assert_same(turn2, fresh("And the shape?", img, history))


def test_failed_call_invalidates_the_cache(vlm):
    encoded = vlm.encode_image(frame(3))
    vlm.ask(encoded, "What is it?", generation=GEN)

    def boom(text, n):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        vlm.ask(encoded, "What is it now?", generation=GEN, on_text=boom)
    again = vlm.ask(encoded, "What is it now?", generation=GEN)
    assert again.reused_prefix_tokens == 0
    assert_same(again, fresh("What is it now?", frame(3)))
