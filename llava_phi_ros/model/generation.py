"""The one generation loop every backend shares: greedy or top-p sampling, stop token and stop
strings, per-token streaming, cancellation, and multiple-choice scoring.

It talks to a model only through `StepModel` (prefill / decode_step at absolute positions), so the
torch, ONNX Runtime and TensorRT backends all run exactly this code.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .prompt import IMAGE_TOKEN_INDEX, RequestError


class ContextOverflowError(RequestError):
    """The prompt (plus at least one new token) does not fit the model's context."""


class StepModel(ABC):
    """What the loop needs from a backend: one sequence's KV cache, driven at absolute positions
    the caller chooses (so a cached prefix can be reused and a choice scored by rewinding).

    Tensors are torch tensors on the backend's device; image splicing is NOT a backend's job
    (see embed_prompt), so every backend takes input embeddings.
    """

    max_context: int

    @abstractmethod
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """Text token embeddings: T ids -> (T, D)."""

    @abstractmethod
    def prefill(self, embeds: torch.Tensor, start_pos: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Run (T, D) embeddings at positions start_pos..start_pos+T-1, keeping their KV;
        fp32 logits (V,) of the last position, or (T, V) of every position when all_logits."""

    @abstractmethod
    def decode_step(self, token_id: int, pos: int) -> torch.Tensor:
        """Feed one token at absolute position pos; fp32 logits (V,) for the next one."""


def splice_image_features(input_ids: Sequence[int],
                          embed_ids: Callable[[Sequence[int]], torch.Tensor],
                          image_features: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with each IMAGE_TOKEN_INDEX replaced by one image's N features, the one
    place where images meet text. The placeholders are found in the host-side id list (no
    device sync). image_features: (K, N, D) or (N, D); returns (T - K + K*N, D)."""
    ids = list(input_ids)
    slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if image_features is not None and image_features.dim() == 2:
        image_features = image_features.unsqueeze(0)
    n_images = 0 if image_features is None else image_features.shape[0]
    if len(slots) != n_images:
        raise ValueError(f"the prompt has {len(slots)} image placeholders but "
                         f"{n_images} images were given")
    pieces: list[torch.Tensor] = []
    text_dtype = None
    prev = 0
    for k, slot in enumerate([*slots, len(ids)]):  # the text before each image, then the rest
        if slot > prev or not pieces and k == len(slots):
            pieces.append(embed_ids(ids[prev:slot]))  # (t, D)
            text_dtype = pieces[-1].dtype
        if k < len(slots):
            pieces.append(image_features[k])  # (N, D)
        prev = slot + 1
    if text_dtype is not None:  # features in the text's dtype, as the decoder expects
        pieces = [p if p.dtype == text_dtype else p.to(text_dtype) for p in pieces]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def embed_prompt(model: StepModel, input_ids: Sequence[int],
                 image_features: torch.Tensor | None = None) -> torch.Tensor:
    """A backend's input embeddings for ids with images spliced in: (T', D)."""
    return splice_image_features(input_ids, model.embed_tokens, image_features)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. temperature 0 = greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def validate(self) -> GenerationConfig:
        """Raise RequestError naming the bad setting; return self."""
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RequestError(f"temperature must be a finite number >= 0, got "
                               f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class Generation:
    """What one generation produced."""

    text: str
    token_ids: list[int]  # generated ids, the stop token excluded
    token_logprobs: list[float]  # natural-log model probability of each generated id
    finish_reason: str  # "stop", "length" or "cancelled"
    first_token_time: float | None = None  # time.perf_counter() when the first token was chosen
    decode_steps: int = 0  # tokens fed back through decode_step
    decode_seconds: float = 0.0  # from the first token to the end (sampling and decoding too)
    stop_string: str | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second after the first token (0 when there were none)."""
        if self.decode_seconds <= 0 or not self.decode_steps:
            return 0.0
        return self.decode_steps / self.decode_seconds


def expanded_length(input_ids: Sequence[int], num_image_tokens: int) -> int:
    """How many positions ids occupy once each IMAGE_TOKEN_INDEX becomes num_image_tokens."""
    n_images = sum(1 for i in input_ids if i == IMAGE_TOKEN_INDEX)
    return len(input_ids) + n_images * (num_image_tokens - 1)


def choose_token(logits: torch.Tensor, cfg: GenerationConfig,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a temperature / nucleus (top-p) sample, on the logits' device.
    logits: (V,) fp32; returns a 0-d long tensor (not read on the host here)."""
    if cfg.temperature == 0:
        return torch.argmax(logits)
    # softmax(logits / T), shifted first so the best logit is 0, and T at least the smallest
    # normal number of the logits' dtype (a Python float below it becomes 0 in fp32): a tiny T
    # (say 1e-300) then gives the one-hot argmax instead of inf / inf or 0 / 0 = NaN.
    temperature = max(cfg.temperature, torch.finfo(logits.dtype).tiny)
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of better tokens
        top_p = max(cfg.top_p, torch.finfo(probs.dtype).tiny)  # the best token always stays
        sorted_probs = torch.where(before < top_p, sorted_probs, 0.0)
        pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return order[pick[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]


def next_token(logits: torch.Tensor, cfg: GenerationConfig,
               generator: torch.Generator | None) -> tuple[int, float]:
    """The chosen token and its natural-log probability, both computed on the device and read
    back together: the loop's one host sync per token."""
    token = choose_token(logits, cfg, generator)
    logprob = torch.log_softmax(logits, dim=-1)[token]
    token_id, value = torch.stack((token.double(), logprob.double())).tolist()  # exact below 2**53
    return int(token_id), value


def _find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in text."""
    hits = [(text.find(s), s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


def stable_text(text: str, stop_strings: Sequence[str] = ()) -> str:
    """The part of a partial answer that later tokens cannot change: without a trailing
    replacement character (a multi-byte character cut between tokens) and without a tail that
    may still grow into a stop string."""
    text = text.rstrip("\ufffd")
    held = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return text[:len(text) - held]


def generate(model: StepModel, first_logits: torch.Tensor, start_pos: int, eos_token_id: int,
             decode: Callable[[list[int]], str], cfg: GenerationConfig,
             on_text: Callable[[str, int], None] | None = None,
             should_cancel: Callable[[], bool] | None = None) -> Generation:
    """Generate after a prefill whose last logits are first_logits and which filled start_pos slots.

    on_text(text_so_far, tokens_generated) is called after every token with the stable part of
    the text (see stable_text); should_cancel() is checked before every token and ends the
    generation with finish_reason "cancelled". A stop string ends it with "stop": the text is cut
    before it and the ids that spelled it are dropped.
    """
    cfg.validate()
    generator = None
    if cfg.temperature > 0:  # its own generator: never the process-global RNG other threads share
        generator = torch.Generator(device=first_logits.device)
        if cfg.seed is not None:
            generator.manual_seed(cfg.seed)
        else:
            generator.seed()  # a fresh non-deterministic seed
    budget = min(cfg.max_new_tokens, model.max_context - start_pos)
    if budget < 1:
        raise ContextOverflowError(f"the prompt fills {start_pos} of {model.max_context} "
                                   "context positions; nothing is left to generate")
    ids: list[int] = []
    logprobs: list[float] = []
    out = Generation(text="", token_ids=ids, token_logprobs=logprobs, finish_reason="length")
    logits, pos = first_logits, start_pos
    decode_start = None
    while True:
        if should_cancel is not None and should_cancel():
            out.finish_reason = "cancelled"
            break
        token, logprob = next_token(logits, cfg, generator)
        if out.first_token_time is None:
            out.first_token_time = decode_start = time.perf_counter()
        if token == eos_token_id:
            out.finish_reason = "stop"
            break
        ids.append(token)
        logprobs.append(logprob)
        out.text = decode(ids)
        stop = _find_stop(out.text, cfg.stop_strings)
        if stop is not None:
            out.text, out.stop_string, out.finish_reason = out.text[:stop[0]], stop[1], "stop"
            while ids and len(decode(ids[:-1])) >= len(out.text):  # drop the stop string's ids
                ids.pop()
                logprobs.pop()
        if on_text is not None:
            on_text(out.text if stop is not None else stable_text(out.text, cfg.stop_strings),
                    len(ids))
        if stop is not None or len(ids) >= budget:
            break
        logits = model.decode_step(token, pos)
        out.decode_steps += 1
        pos += 1
    if decode_start is not None:
        out.decode_seconds = time.perf_counter() - decode_start
    return out


@dataclass
class ChoiceScores:
    """Log-likelihood of each choice as the whole answer."""

    logprobs: list[float]
    probs: list[float] = field(default_factory=list)  # normalised over the choices
    index: int = -1  # best choice
    intact_prompt_ids: int = 0  # leading prompt ids whose KV cache scoring left untouched
    cancelled: bool = False  # should_cancel() said stop before every choice was scored

    def __post_init__(self) -> None:
        if self.logprobs:
            t = torch.tensor(self.logprobs, dtype=torch.float64)
            self.probs = torch.softmax(t, dim=0).tolist()
            self.index = int(torch.argmax(t))


def score_choices(model: StepModel, prompt_ids: Sequence[int], choice_ids: Sequence[Sequence[int]],
                  num_image_tokens: int,
                  should_cancel: Callable[[], bool] | None = None) -> ChoiceScores:
    """Score each choice's ids (the prompt's ids + the answer's + the stop token, tokenised
    together) after a prefill of prompt_ids already in the KV cache. should_cancel() is checked
    before each choice; when it says stop, no scores come back (cancelled=True).

    Tokenising together can re-split the prompt's last tokens; each choice then starts from the
    first id where all choices and the prompt agree, and the cache is rewound to that point.
    """
    if not choice_ids:
        return ChoiceScores([], intact_prompt_ids=len(prompt_ids))
    shared = len(prompt_ids)
    for full in choice_ids:
        common = 0
        while common < min(shared, len(full)) and full[common] == prompt_ids[common]:
            common += 1
        shared = common
    last_image = max((i for i, t in enumerate(prompt_ids) if t == IMAGE_TOKEN_INDEX), default=-1)
    if shared - 1 <= last_image:
        raise RequestError("choices must follow the prompt's text; they cannot re-split the image")
    start = shared - 1  # feed the last shared id again to get the logits that predict the next
    pos = expanded_length(prompt_ids[:start], num_image_tokens)
    scores = []
    for full in choice_ids:
        if should_cancel is not None and should_cancel():
            return ChoiceScores([], intact_prompt_ids=start, cancelled=True)
        if len(full) <= shared:
            raise RequestError("a choice must add at least one token after the prompt")
        if pos + len(full) - start > model.max_context:
            raise ContextOverflowError(f"a choice needs {pos + len(full) - start} positions; the "
                                       f"context has {model.max_context}")
        logits = model.prefill(model.embed_tokens(full[start:]), pos, all_logits=True)  # (T, V)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # predicts full[shared:]
        targets = torch.tensor(full[shared:], device=logp.device)
        scores.append(float(logp.gather(1, targets[:, None]).sum()))
    return ChoiceScores(scores, intact_prompt_ids=start)
