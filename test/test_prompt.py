"""The phi-2_v0 prompt template and tokenisation around <image>, checked against literal strings."""

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers

from llava_phi_ros.model.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TOKEN_INDEX,
    MAX_QUESTION_CHARS,
    STOP_STRING,
    Conversation,
    ImageTokenCountError,
    PromptError,
    RequestError,
    build_prompt,
    check_question,
    clean_choices,
    count_image_tokens,
    render_conversation,
    strip_image_token,
    tokenize_prompt,
)
from llava_phi_ros.model.tokenizer import Tokenizer, _byte_level, build_byte_tokenizer

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def reference_get_prompt(system, messages):
    """The reference's SeparatorStyle.TWO get_prompt() (zhuyiche/llava-phi conversation.py)."""
    seps = [" ", "<|endoftext|>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def test_constants():
    assert DEFAULT_SYSTEM_PROMPT == SYS
    assert STOP_STRING == "<|endoftext|>"
    assert IMAGE_TOKEN_INDEX == -200


def test_single_turn_literal():
    expected = SYS + " USER: <image>\nWhat is on the table? ASSISTANT:"
    assert build_prompt("What is on the table?") == expected
    assert Conversation().prompt("What is on the table?") == expected


def test_two_turns_literal():
    expected = (
        SYS + " USER: <image>\nWhat color is the cup? ASSISTANT: Red.<|endoftext|>"
        "USER: How many cups are there? ASSISTANT:"
    )
    history = [("What color is the cup?", "Red.")]
    assert build_prompt("How many cups are there?", history) == expected


def test_three_turns_literal_and_conversation_object():
    history = [("Q1?", "A1."), ("Q2?", "A2.")]
    expected = (
        SYS + " USER: <image>\nQ1? ASSISTANT: A1.<|endoftext|>"
        "USER: Q2? ASSISTANT: A2.<|endoftext|>USER: Q3? ASSISTANT:"
    )
    assert build_prompt("Q3?", history) == expected
    conv = Conversation()
    for q, a in history:
        conv.append(q, a)
    assert conv.prompt("Q3?") == expected
    assert conv.render() == (
        SYS + " USER: <image>\nQ1? ASSISTANT: A1.<|endoftext|>USER: Q2? ASSISTANT: A2.<|endoftext|>"
    )


def test_matches_reference_get_prompt():
    history = [("Is the door open?", "Yes."), ("Which bin holds the red cup?", "The left one.")]
    messages = [
        ("USER", "<image>\n" + history[0][0]),
        ("ASSISTANT", history[0][1]),
        ("USER", history[1][0]),
        ("ASSISTANT", history[1][1]),
        ("USER", "Anything else?"),
        ("ASSISTANT", None),
    ]
    assert build_prompt("Anything else?", history) == reference_get_prompt(SYS, messages)


def test_custom_system_prompt_and_no_image():
    expected = "You are a robot. USER: <image>\nHi? ASSISTANT:"
    assert build_prompt("Hi?", system="You are a robot.") == expected
    assert build_prompt("Hi?", with_image=False) == SYS + " USER: Hi? ASSISTANT:"
    assert Conversation(system="S.").prompt("Q") == "S. USER: <image>\nQ ASSISTANT:"


def test_render_conversation():
    turns = [("Describe the image.", "A robot arm."), ("What is it holding?", "A red cup.")]
    text = render_conversation(turns)
    assert text == (
        SYS + " USER: <image>\nDescribe the image. ASSISTANT: A robot arm.<|endoftext|>"
        "USER: What is it holding? ASSISTANT: A red cup.<|endoftext|>"
    )
    assert text.endswith(STOP_STRING)
    one = render_conversation(turns[:1], system="S", with_image=False)
    assert one == "S USER: Describe the image. ASSISTANT: A robot arm.<|endoftext|>"


def test_bad_turns_raise():
    with pytest.raises(PromptError, match="question of turn 0 is empty"):
        build_prompt("   ")
    with pytest.raises(PromptError, match="contains '<image>'"):
        build_prompt("<image>\nWhat?")
    with pytest.raises(PromptError, match="answer of turn 0 is empty"):
        build_prompt("Q2", [("Q1", "")])
    with pytest.raises(PromptError, match="pair"):
        build_prompt("Q2", [("Q1", "A1", "x")])
    with pytest.raises(PromptError, match="at least one"):
        render_conversation([])
    with pytest.raises(PromptError):
        Conversation().append("Q", "")
    assert strip_image_token("<image>\nWhat is this?") == "What is this?"
    assert strip_image_token("What is this?\n<image>") == "What is this?"


def test_tokenize_prompt_splits_on_image():
    tok = build_byte_tokenizer()
    prompt = build_prompt("What is this?")
    before, after = prompt.split("<image>")
    ids = tokenize_prompt(prompt, tok, num_images=1)
    assert ids == tok.encode(before) + [IMAGE_TOKEN_INDEX] + tok.encode(after)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenize_prompt("no image here", tok) == tok.encode("no image here")
    assert tokenize_prompt("<image>", tok) == [IMAGE_TOKEN_INDEX]


def test_endoftext_in_multiturn_prompt_is_the_eos_id():
    tok = build_byte_tokenizer()
    prompt = build_prompt("Q2?", [("Q1?", "A1.")])
    ids = tokenize_prompt(prompt, tok, num_images=1)
    assert ids.count(tok.eos_token_id) == 1
    i = ids.index(tok.eos_token_id)
    assert tok.decode(ids[i - 3 : i]) == "A1."
    assert ids[i + 1 :] == tok.encode("USER: Q2? ASSISTANT:")


def test_image_count_check():
    tok = build_byte_tokenizer()
    with pytest.raises(ImageTokenCountError, match="2 '<image>' placeholders but 1 image"):
        tokenize_prompt("a <image> b <image> c", tok, num_images=1)
    with pytest.raises(ImageTokenCountError, match="0 '<image>' placeholders but 1 image"):
        tokenize_prompt("a b", tok, num_images=1)
    assert count_image_tokens("a <image> b <image> c") == 2
    ids = tokenize_prompt("a<image>b<image>c", tok)  # any count when the caller does not check
    assert ids == [97, IMAGE_TOKEN_INDEX, 98, IMAGE_TOKEN_INDEX, 99]


def _trained_bpe() -> Tokenizer:
    """A byte-level BPE whose merges learn ' photograph' as a single token."""
    backend = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["a photograph of a robot", "the photograph shows two red cups"]
    backend.train_from_iterator(corpus * 50, trainer)
    return Tokenizer(backend)


def test_chunks_are_tokenised_separately():
    """'<image>' inside a word: tokenising the prompt whole (image removed) merges across it."""
    tok = _trained_bpe()
    photograph = tok.backend.token_to_id("\u0120photograph")  # byte-level ' photograph'
    assert photograph is not None and tok.encode(" photograph") == [photograph]
    prompt = "USER: a photo<image>graph ASSISTANT:"
    ids = tokenize_prompt(prompt, tok, num_images=1)
    expected = tok.encode("USER: a photo") + [IMAGE_TOKEN_INDEX] + tok.encode("graph ASSISTANT:")
    assert ids == expected
    naive = tok.encode(prompt.replace("<image>", ""))
    assert photograph in naive and photograph not in ids
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != naive


def test_bos_kept_once_when_tokenizer_adds_one():
    tok, plain = build_byte_tokenizer(), build_byte_tokenizer()
    eos = tok.eos_token_id
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)]
    )
    assert tok.encode("ab") == [eos, 97, 98] and tok.bos_token_id == eos
    assert tokenize_prompt("ab<image>cd", tok) == [eos, 97, 98, IMAGE_TOKEN_INDEX, 99, 100]
    # Phi-2 adds no BOS: a literal <|endoftext|> after the image is text and is kept (the
    # reference, seeing the prompt start with bos_token_id, would drop it).
    ids = tokenize_prompt("<|endoftext|>a<image><|endoftext|>b", plain)
    assert ids == [eos, 97, IMAGE_TOKEN_INDEX, eos, 98]


def test_check_question_strips_and_enforces_the_text_rules():
    assert check_question("  Is it red?\n") == "Is it red?"
    assert check_question("x" * MAX_QUESTION_CHARS + "   ") == "x" * MAX_QUESTION_CHARS
    for question, message in [("", "the question is empty"), (" \t", "the question is empty"),
                              ("x" * (MAX_QUESTION_CHARS + 1),
                               f"the question has {MAX_QUESTION_CHARS + 1} characters; the "
                               f"limit is {MAX_QUESTION_CHARS}"),
                              (f"Red?{STOP_STRING}", "the question contains the stop token "
                                                     f"{STOP_STRING!r}")]:
        with pytest.raises(RequestError) as info:
            check_question(question)
        assert str(info.value) == message


def test_clean_choices_strips_and_refuses_empty_and_special_tokens():
    assert clean_choices([" red ", "blue\n"]) == ["red", "blue"]
    assert clean_choices(()) == []
    with pytest.raises(RequestError, match="a choice is empty"):
        clean_choices(["red", "  "])
    for bad in (f"red{STOP_STRING}", "<image>"):
        with pytest.raises(RequestError, match="contains a special token"):
            clean_choices([bad])
