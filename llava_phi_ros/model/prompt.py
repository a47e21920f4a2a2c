"""LLaVA-Phi prompt template (`phi-2_v0`) and prompt tokenisation around the `<image>` placeholder.

Mirrors the reference code (zhuyiche/llava-phi: `conversation.py` SeparatorStyle.TWO and
`mm_utils.tokenizer_image_token`) byte for byte:

    SYSTEM USER: <image>\\nQ1 ASSISTANT: A1<|endoftext|>USER: Q2 ASSISTANT:
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # placeholder id in token lists; the model splices image features there
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
STOP_STRING = "<|endoftext|>"
ROLES = ("USER", "ASSISTANT")
SEPS = (" ", STOP_STRING)  # after user turns, after assistant turns
MAX_QUESTION_CHARS = 4000  # the longest question (stripped) anyone may ask


class RequestError(ValueError):
    """Input the caller got wrong (question, choices, generation settings): theirs to fix.

    The service core answers these BAD_REQUEST (CONTEXT_OVERFLOW for ContextOverflowError); any
    other exception on the model path is the model's fault (MODEL_ERROR)."""


class PromptError(RequestError):
    """A question, answer or prompt that the template cannot render."""


class ImageTokenCountError(PromptError):
    """The prompt holds a different number of `<image>` placeholders than images supplied."""


class TextTokenizer(Protocol):
    """What `tokenize_prompt` needs: `encode` and `bos_token_id` (None when there is no BOS)."""

    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def strip_image_token(text: str) -> str:
    """Remove `<image>` from a message and strip whitespace, as LLaVA's data preprocessing does."""
    return text.replace(IMAGE_TOKEN, "").strip()


def check_question(question: str) -> str:
    """The question stripped; RequestError when empty, over MAX_QUESTION_CHARS or holding the
    stop token. (`<image>` in it fails when the prompt is built.)"""
    question = question.strip()
    if not question:
        raise RequestError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise RequestError(f"the question has {len(question)} characters; the limit is "
                           f"{MAX_QUESTION_CHARS}")
    if STOP_STRING in question:
        raise RequestError(f"the question contains the stop token {STOP_STRING!r}")
    return question


def clean_choices(choices: Sequence[str]) -> list[str]:
    """Choices stripped of surrounding space; RequestError for an empty one or a special token."""
    cleaned = [c.strip() for c in choices]
    for choice in cleaned:
        if not choice:
            raise RequestError("a choice is empty")
        if STOP_STRING in choice or IMAGE_TOKEN in choice:
            raise RequestError(f"the choice {choice!r} contains a special token")
    return cleaned


def _check_text(kind: str, index: int, text: str) -> None:
    """Reject non-str, empty and `<image>`-holding messages with a message naming the turn."""
    if not isinstance(text, str):
        raise PromptError(f"{kind} of turn {index} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise PromptError(f"{kind} of turn {index} is empty")
    if IMAGE_TOKEN in text:
        raise PromptError(
            f"{kind} of turn {index} contains {IMAGE_TOKEN!r}; the template places the image "
            f"itself (use strip_image_token() on LLaVA data)"
        )


def _render(system: str, messages: Sequence[tuple[str, str | None]]) -> str:
    """The reference's SeparatorStyle.TWO `get_prompt()`: an empty/None message opens a turn."""
    ret = system + SEPS[0]
    for i, (role, message) in enumerate(messages):
        ret += f"{role}: {message}{SEPS[i % 2]}" if message else f"{role}:"
    return ret


def _messages(
    turns: Sequence[tuple[str, str]], question: str | None, with_image: bool
) -> list[tuple[str, str | None]]:
    """Validate turns; lay them out as (role, message) pairs, `<image>\\n` before the first."""
    messages: list[tuple[str, str | None]] = []
    for i, turn in enumerate(turns):
        if len(turn) != 2:
            raise PromptError(f"turn {i} must be a (question, answer) pair, got {len(turn)} items")
        q, a = turn
        _check_text("question", i, q)
        _check_text("answer", i, a)
        messages += [(ROLES[0], q), (ROLES[1], a)]
    if question is not None:
        _check_text("question", len(turns), question)
        messages += [(ROLES[0], question), (ROLES[1], None)]
    if with_image and messages:
        messages[0] = (ROLES[0], IMAGE_TOKEN + "\n" + messages[0][1])
    return messages


def build_prompt(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
    with_image: bool = True,
) -> str:
    """Render the prompt for a new question after completed (question, answer) turns."""
    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    return _render(system, _messages(history, question, with_image))


def render_conversation(
    turns: Sequence[tuple[str, str]], system: str | None = None, with_image: bool = True
) -> str:
    """Render a fully answered conversation (training text); it ends with `<|endoftext|>`."""
    if not turns:
        raise PromptError("a conversation needs at least one (question, answer) turn")
    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    return _render(system, _messages(turns, None, with_image))


@dataclass
class Conversation:
    """A conversation about one image: system prompt and completed (question, answer) turns."""

    system: str = DEFAULT_SYSTEM_PROMPT
    turns: list[tuple[str, str]] = field(default_factory=list)
    with_image: bool = True

    def prompt(self, question: str) -> str:
        """Render the prompt that asks `question` after the completed turns."""
        return build_prompt(question, self.turns, self.system, self.with_image)

    def append(self, question: str, answer: str) -> None:
        """Record a completed turn."""
        _messages([(question, answer)], None, False)  # validates
        self.turns.append((question, answer))

    def render(self) -> str:
        """Render all completed turns as training text."""
        return render_conversation(self.turns, self.system, self.with_image)


def count_image_tokens(prompt: str) -> int:
    """Number of `<image>` placeholders in a prompt."""
    return prompt.count(IMAGE_TOKEN)


def tokenize_prompt(
    prompt: str, tokenizer: TextTokenizer, num_images: int | None = None
) -> list[int]:
    """Tokenise each chunk between `<image>` placeholders separately; join with IMAGE_TOKEN_INDEX.

    With `num_images` given, raise ImageTokenCountError unless the prompt has exactly that many
    placeholders. As the reference, a BOS that the tokenizer prepends to every chunk is kept once,
    at the start. Phi-2's tokenizer adds none, so its chunks are simply concatenated (unlike the
    reference, a literal leading `<|endoftext|>` is then never mistaken for an added BOS).
    """
    if num_images is not None and count_image_tokens(prompt) != num_images:
        raise ImageTokenCountError(
            f"prompt has {count_image_tokens(prompt)} {IMAGE_TOKEN!r} placeholders "
            f"but {num_images} image(s) were supplied"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer.encode("")[:1] == [bos]
    chunks = [tokenizer.encode(c) for c in prompt.split(IMAGE_TOKEN)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:] if adds_bos and chunk[:1] == [bos] else chunk)
    return ids
