"""Train the tiny model's tokenizer: byte-level BPE (as GPT-2 / Phi-2) with `tokenizers`.

The result is an ordinary `Tokenizer` (model/tokenizer.py): saved as tokenizer.json with
`Tokenizer.save`, loaded by `load_tokenizer` exactly like a real checkpoint's, with
`<|endoftext|>` as its one special token and stop token. Every byte is in the initial alphabet,
so any text encodes; training is deterministic (same texts -> identical tokenizer.json).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from ..model.prompt import DEFAULT_SYSTEM_PROMPT, ROLES, STOP_STRING, render_conversation
from ..model.tokenizer import EOS_TOKEN, Tokenizer

DEFAULT_VOCAB_SIZE = 1024
MIN_VOCAB_SIZE = 258  # 256 bytes + <|endoftext|> + at least one merge


class TokenizerTrainingError(ValueError):
    """Texts or settings a tokenizer cannot be trained from."""


def template_texts(system: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """The phi-2_v0 template's own text (system prompt, roles), so prompts tokenise compactly."""
    example = render_conversation([("question", "answer")], system=system, with_image=False)
    return [example, system, *(f"{role}:" for role in ROLES)]


def _checked(texts: Iterable[str]) -> Iterator[str]:
    """Yield the texts, rejecting non-strings with a clear error."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerTrainingError(f"text {i} is a {type(text).__name__}, not a str")
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2, include_template: bool = True) -> Tokenizer:
    """Byte-level BPE trained on `texts` (plus the prompt template); at most vocab_size tokens.

    `<|endoftext|>` gets id 0 and is never split or merged; fewer than vocab_size tokens result
    when the texts run out of pairs seen min_frequency times.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainingError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes, "
                                     f"{EOS_TOKEN}, merges), got {vocab_size}")
    if min_frequency < 1:
        raise TokenizerTrainingError(f"min_frequency must be >= 1, got {min_frequency}")
    corpus = list(_checked(texts))
    if not any(t.strip() for t in corpus):
        raise TokenizerTrainingError("no text to train the tokenizer on")
    if include_template:
        corpus += template_texts()

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(STOP_STRING, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return Tokenizer(backend)
