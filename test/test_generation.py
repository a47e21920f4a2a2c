"""The shared generation loop and choice scoring, on the torch backend with a random tiny model."""

from __future__ import annotations

import pytest
import torch

from llava_phi_ros.backends.torch_backend import TorchBackend
from llava_phi_ros.model.generation import (
    ContextOverflowError,
    GenerationConfig,
    choose_token,
    embed_prompt,
    expanded_length,
    generate,
    score_choices,
    stable_text,
)
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX

from .reference import random_tiny_model

PROMPT = [5, 17, IMAGE_TOKEN_INDEX, 9, 42, 7]


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend(random_tiny_model(seed=1), max_context=128)


@pytest.fixture(scope="module")
def image(backend):
    torch.manual_seed(3)
    return backend.encode_image(torch.randn(3, 28, 28).numpy())


def run(backend, image, cfg, eos=-1, decode=lambda ids: " ".join(map(str, ids)), **kw):
    logits = backend.prefill(embed_prompt(backend, PROMPT, image))
    start = expanded_length(PROMPT, backend.config.num_image_tokens)
    return generate(backend, logits, start, eos, decode, cfg, **kw)


def full_logits(backend, ids_after_prompt, image) -> torch.Tensor:
    """No-cache reference: all logits of prompt + ids in one fresh forward."""
    model = backend.model
    with torch.no_grad():
        embeds = model.embed(PROMPT + list(ids_after_prompt), image)
        return model.forward_embeds(embeds, model.new_cache(128), 0, last_only=False)[0]


def test_greedy_logprobs_are_the_models(backend, image):
    gen = run(backend, image, GenerationConfig(max_new_tokens=10))
    assert gen.finish_reason == "length" and len(gen.token_ids) == 10
    logits = full_logits(backend, gen.token_ids, image)
    start = expanded_length(PROMPT, backend.config.num_image_tokens) - 1
    expected = torch.log_softmax(logits[start:start + 10], -1)
    for i, (tok, lp) in enumerate(zip(gen.token_ids, gen.token_logprobs, strict=True)):
        assert tok == int(logits[start + i].argmax())
        assert abs(lp - float(expected[i, tok])) < 1e-5


def test_eos_stops_and_is_excluded(backend, image):
    greedy = run(backend, image, GenerationConfig(max_new_tokens=10)).token_ids
    gen = run(backend, image, GenerationConfig(max_new_tokens=10), eos=greedy[3])
    assert gen.finish_reason == "stop"
    assert gen.token_ids == greedy[:greedy.index(greedy[3])]


def test_stop_string_cuts_text(backend, image):
    greedy = run(backend, image, GenerationConfig(max_new_tokens=10))
    stop = f" {greedy.token_ids[2]} "
    gen = run(backend, image, GenerationConfig(max_new_tokens=10, stop_strings=(stop,)),
              decode=lambda ids: " ".join(map(str, ids)) + " ")
    assert gen.finish_reason == "stop" and gen.stop_string == stop
    assert stop not in gen.text and gen.text == " ".join(map(str, greedy.token_ids[:2]))
    assert gen.token_ids == greedy.token_ids[:2]  # the ids that spelled the stop string are gone
    assert len(gen.token_logprobs) == 2


def test_stable_text_holds_back_what_may_change():
    assert stable_text("caf\ufffd") == "caf"  # a UTF-8 character cut between tokens
    assert stable_text("yes<|end", ("<|endoftext|>",)) == "yes"
    assert stable_text("yes<", ("<|endoftext|>", "USER:")) == "yes"
    assert stable_text("yes US", ("USER:",)) == "yes "
    assert stable_text("a < b", ("<|endoftext|>",)) == "a < b"


def test_streamed_text_never_shows_partial_characters(backend, image):
    def decode(ids):  # every generated id spells one byte of the two-byte character "é"
        data = "é".encode() * (len(ids) // 2) + "é".encode()[:len(ids) % 2]
        return data.decode("utf-8", errors="replace")

    seen = []
    run(backend, image, GenerationConfig(max_new_tokens=6), decode=decode,
        on_text=lambda text, n: seen.append(text))
    assert seen == ["", "é", "é", "éé", "éé", "ééé"]


def test_sampling_is_seeded(backend, image):
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7)
    a = run(backend, image, cfg).token_ids
    assert a == run(backend, image, cfg).token_ids
    others = {tuple(run(backend, image, GenerationConfig(max_new_tokens=12, temperature=1.5,
                                                         seed=s)).token_ids) for s in range(5)}
    assert len(others) > 1


def test_tiny_top_p_is_greedy():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(temperature=1.0, top_p=1e-6)
    assert {int(choose_token(logits, cfg, gen)) for _ in range(50)} == {1}
    cfg = GenerationConfig(temperature=1.0, top_p=0.6)  # keeps tokens 1 and 2 only
    assert {int(choose_token(logits, cfg, gen)) for _ in range(200)} == {1, 2}


def test_streaming_and_cancel(backend, image):
    seen = []
    gen = run(backend, image, GenerationConfig(max_new_tokens=8),
              on_text=lambda text, n: seen.append((text, n)),
              should_cancel=lambda: len(seen) >= 3)
    assert gen.finish_reason == "cancelled"
    assert [n for _, n in seen] == [1, 2, 3] and len(gen.token_ids) == 3
    assert seen[-1][0] == gen.text


def test_context_end_is_length(backend, image):
    start = expanded_length(PROMPT, backend.config.num_image_tokens)
    gen = run(backend, image, GenerationConfig(max_new_tokens=1000))
    assert gen.finish_reason == "length" and len(gen.token_ids) == 128 - start
    with pytest.raises(ContextOverflowError):
        generate(backend, torch.zeros(128), 128, -1, str, GenerationConfig())


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(temperature=float("nan"))])
def test_bad_generation_config(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad).validate()


def test_choice_scores_equal_full_forward(backend, image):
    choices = [[3, 4, 99], [8], [3, 11, 12, 99]]
    backend.prefill(embed_prompt(backend, PROMPT, image))
    scores = score_choices(backend, PROMPT, [PROMPT + c for c in choices],
                           backend.config.num_image_tokens)
    start = expanded_length(PROMPT, backend.config.num_image_tokens) - 1
    for choice, got in zip(choices, scores.logprobs, strict=True):
        logp = torch.log_softmax(full_logits(backend, choice, image).double(), -1)
        want = sum(float(logp[start + i, t]) for i, t in enumerate(choice))
        assert abs(got - want) < 1e-5
    assert abs(sum(scores.probs) - 1) < 1e-9
    assert scores.index == max(range(3), key=lambda i: scores.logprobs[i])


def test_choice_that_resplits_the_prompt_rewinds(backend, image):
    """A choice tokenised together with the prompt may change the prompt's last token."""
    resplit = PROMPT[:-1] + [50, 60]  # last prompt id 7 became 50, then the answer 60
    backend.prefill(embed_prompt(backend, PROMPT, image))
    got = score_choices(backend, PROMPT, [PROMPT + [60], resplit],
                        backend.config.num_image_tokens).logprobs
    n = backend.config.num_image_tokens
    start = expanded_length(PROMPT, n) - 2  # logits predicting the last prompt position
    with torch.no_grad():
        model = backend.model
        for ids, lp in ((PROMPT + [60], got[0]), (resplit, got[1])):
            logits = model.forward_embeds(model.embed(ids, image), model.new_cache(128), 0,
                                          last_only=False)[0]
            logp = torch.log_softmax(logits.double(), -1)
            want = float(logp[start, ids[-2]] + logp[start + 1, ids[-1]])
            assert abs(lp - want) < 1e-5
    # the image cannot be re-split
    with pytest.raises(ValueError, match="image"):
        score_choices(backend, PROMPT, [[5, 17, 1]], n)


def test_scoring_reports_the_untouched_prompt_prefix(backend, image):
    backend.prefill(embed_prompt(backend, PROMPT, image))
    scores = score_choices(backend, PROMPT, [PROMPT + [60], PROMPT[:-1] + [50, 60]],
                           backend.config.num_image_tokens)
    assert scores.intact_prompt_ids == len(PROMPT) - 2  # the re-split rewound one more id


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e300])
@pytest.mark.parametrize("top_p", [1.0, 0.5, 1e-300])
def test_extreme_sampling_values_still_pick_a_token(temperature, top_p):
    """Found by the hypothesis suite: a temperature below fp32's range became 0 (0/0 = NaN) and
    a tiny one overflowed logits / T; a tiny top_p kept no token. Now: a tiny temperature or
    top_p gives the argmax, a huge temperature a uniform pick."""
    from llava_phi_ros.model.generation import choose_token

    logits = torch.randn(64, generator=torch.Generator().manual_seed(3))
    token = int(choose_token(logits, GenerationConfig(temperature=temperature, top_p=top_p),
                             torch.Generator().manual_seed(0)))
    assert 0 <= token < 64
    if temperature < 1e-30:
        assert token == int(logits.argmax())
