"""VisionLanguageModel: KV-prefix reuse across calls gives the same answers as fresh calls."""

from __future__ import annotations

import numpy as np
import pytest

from llava_phi_ros.backends.base import BackendError
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
    n_image = vlm.num_image_tokens
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
    assert turn2.reused_prefix_tokens > vlm.num_image_tokens
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


def test_two_frames_in_turn_each_reuse_their_image_prefix():
    vlm = VisionLanguageModel.load("builtin:random-tiny")
    frames = {cam: frame(seed) for cam, seed in (("front", 10), ("rear", 11))}
    encoded = {cam: vlm.encode_image(img) for cam, img in frames.items()}
    ids = vlm.prompt_ids("What is there?")
    image_end = ids.index(IMAGE_TOKEN_INDEX) + vlm.num_image_tokens
    for round_ in range(3):
        for cam in ("front", "rear"):
            got = vlm.ask(encoded[cam], "What is there?", generation=GEN)
            if round_ > 0:
                assert got.reused_prefix_tokens >= image_end, (round_, cam)
            assert_same(got, fresh("What is there?", frames[cam]))  # reuse off: nothing kept
    assert vlm.prefix_cache_stats()["restores"] == 4


def test_a_sessions_second_turn_reuses_the_first_answer_too():
    vlm = VisionLanguageModel.load("builtin:tiny")  # trained: its answers re-tokenise alike
    img = np.zeros((56, 56, 3), np.uint8)
    img[10:40, 10:40] = (220, 30, 30)
    encoded = vlm.encode_image(img)
    turn1 = vlm.ask(encoded, "What colour is the square?", generation=GEN)
    vlm.ask(vlm.encode_image(frame(5)), "What is there?", generation=GEN)  # another frame between
    turn2 = vlm.ask(encoded, "And its shape?", [("What colour is the square?", turn1.text)], GEN)
    assert turn1.token_ids and turn1.finish_reason == "stop"
    fed = len(turn1.token_ids)  # every answer id was fed back (the stop token was not)
    assert turn2.reused_prefix_tokens >= turn1.prompt_tokens + fed - 1


def test_the_budget_bounds_the_kept_prefixes():
    vlm = VisionLanguageModel.load("builtin:random-tiny")
    encoded = [vlm.encode_image(frame(20 + i)) for i in range(4)]
    vlm.ask(encoded[0], "What is there?", generation=GEN)
    vlm.ask(encoded[1], "What is there?", generation=GEN)  # encoded[0]'s prefix is kept
    one_entry_mb = vlm.prefix_cache_stats()["mb"]
    assert one_entry_mb > 0
    vlm.set_prefix_cache_mb(one_entry_mb * 2.5)  # room for two
    for enc in encoded[2:]:
        vlm.ask(enc, "What is there?", generation=GEN)
    stats = vlm.prefix_cache_stats()
    assert stats["entries"] == 2 and stats["mb"] <= stats["budget_mb"]
    oldest = vlm.ask(encoded[0], "What is there?", generation=GEN)  # evicted: least recent
    placeholder = vlm.prompt_ids("What is there?").index(IMAGE_TOKEN_INDEX)
    assert oldest.reused_prefix_tokens <= placeholder  # the system prompt only
    assert vlm.ask(encoded[3], "What is there?", generation=GEN).reused_prefix_tokens > 0
    vlm.set_prefix_cache_mb(0)
    assert vlm.prefix_cache_stats()["entries"] == 0



def test_a_prefix_whose_image_nobody_holds_is_dropped():
    """Images the caller let go (the node's feature cache evicted the frame) can never be asked
    about again, so their prefixes must not sit in the budget: entries stay at what is held."""
    vlm = VisionLanguageModel.load("builtin:random-tiny")
    held = vlm.encode_image(frame(30))
    vlm.ask(held, "What is there?", generation=GEN)
    for seed in range(31, 41):  # ten frames asked about once and let go
        vlm.ask(vlm.encode_image(frame(seed)), "What is there?", generation=GEN)
    stats = vlm.prefix_cache_stats()
    assert stats["entries"] == 1  # held's; the others died with their images (the live one aside)
    again = vlm.ask(held, "What is there?", generation=GEN)
    assert again.reused_prefix_tokens > vlm.num_image_tokens
    assert_same(again, fresh("What is there?", frame(30)))

def test_closed_model_refuses_and_close_is_idempotent():
    vlm = VisionLanguageModel.load("builtin:random-tiny")
    encoded = vlm.encode_image(frame(0))
    vlm.close()
    vlm.close()
    with pytest.raises(BackendError, match="closed"):
        vlm.ask(encoded, "What is there?", generation=GEN)
