"""Tokenizer: byte tokenizer, save/load, transformers compatibility, legacy files, errors."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from llava_phi_ros.model.tokenizer import (
    Tokenizer,
    TokenizerError,
    _byte_level,
    build_byte_tokenizer,
    load_tokenizer,
)

TEXTS = [
    "",
    "Is the door open?",
    "  leading and trailing spaces  ",
    "héllo wörld, naïve café",
    "日本語のテキスト",
    "robot 🤖 thumbs 👍🏽",
    "e\u0301 combining accent",
    "tabs\tand\r\nnewlines\n\n",
    "nul\x00byte",
    "USER: <image>\nWhat? ASSISTANT: Red.<|endoftext|>USER: And? ASSISTANT:",
]


def trained_bpe() -> tokenizers.Tokenizer:
    """A small byte-level BPE with real merges, trained on the fly (deterministic)."""
    backend = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "Is the door open? The door is open.",
        "Which bin holds the red cup? The left bin.",
        "two red cups",
    ]
    backend.train_from_iterator(corpus * 30, trainer)
    return backend


def test_byte_tokenizer_round_trip():
    tok = build_byte_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        if "<|endoftext|>" not in text:
            assert ids == list(text.encode("utf-8"))  # id = byte value
            assert tok.decode(ids) == text
        else:
            assert tok.decode(ids, skip_special_tokens=False) == text


def test_byte_tokenizer_special_ids():
    tok = build_byte_tokenizer()
    assert tok.eos_token_id == 256 and tok.bos_token_id == 256 and tok.vocab_size == 257
    assert tok.encode("a<|endoftext|>b") == [97, 256, 98]
    assert tok.encode("") == []  # no BOS is added, as Phi-2
    assert tok.decode([97, 256, 98]) == "ab"
    assert tok.decode([97, 256, 98], skip_special_tokens=False) == "a<|endoftext|>b"
    assert tok.decode([97, 5000, 98]) == "ab"  # unused ids (Phi-2's 50295..51199) decode to nothing
    with pytest.raises(TokenizerError, match="negative token id -200"):
        tok.decode([97, -200])


def test_clean_up_tokenization_spaces_matches_transformers():
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    tok = build_byte_tokenizer()
    text = "Yes , it is red . Is n't it ? I 'm sure ' quoted ' we 're you 've it 's !"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # off by default: exact, as transformers 5 does for BPE
    cleaned = tok.decode(ids, clean_up_tokenization_spaces=True)
    assert cleaned == PreTrainedTokenizerBase.clean_up_tokenization(None, text)
    assert cleaned.startswith("Yes, it is red. Isn't it? I'm sure")


@pytest.mark.parametrize(
    "make", [build_byte_tokenizer, lambda: Tokenizer(trained_bpe())], ids=["byte", "bpe"]
)
def test_save_load_and_autotokenizer(tmp_path, make):
    from transformers import AutoTokenizer

    tok = make()
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (
        config["eos_token"] == config["bos_token"] == "<|endoftext|>"
        and config["add_bos_token"] is False
    )
    loaded = load_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.eos_token_id == hf.eos_token_id == tok.eos_token_id
    assert loaded.vocab_size == len(hf) == tok.vocab_size
    for text in TEXTS:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids
        assert hf(text).input_ids == ids
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def write_legacy(
    d, backend: tokenizers.Tokenizer, extra: list[str], config: dict | None = None
) -> None:
    """Write vocab.json, merges.txt, added_tokens.json (+ tokenizer_config.json) as Phi-2 ships."""
    model = json.loads(backend.to_str())["model"]
    (d / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    n = backend.get_vocab_size()
    (d / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(extra)}))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))


def test_legacy_vocab_merges_fallback(tmp_path):
    from transformers import AutoTokenizer

    backend = trained_bpe()
    extra = ["   ", "    "]  # like Phi-2's added whitespace tokens 50257..50294
    legacy, modern = tmp_path / "legacy", tmp_path / "modern"
    legacy.mkdir()
    write_legacy(
        legacy,
        backend,
        extra,
        {
            "tokenizer_class": "CodeGenTokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
        },
    )
    backend.add_tokens(extra)
    Tokenizer(backend).save(modern)
    from_legacy, from_json = load_tokenizer(legacy), load_tokenizer(modern)
    hf = AutoTokenizer.from_pretrained(legacy, local_files_only=True)
    assert from_legacy.vocab_size == from_json.vocab_size == backend.get_vocab_size()
    assert from_legacy.eos_token_id == from_json.eos_token_id == hf.eos_token_id
    texts = [*TEXTS, "the red    door   is open"]
    assert any(backend.token_to_id("    ") in from_legacy.encode(t) for t in texts)
    for text in texts:
        assert from_legacy.encode(text) == from_json.encode(text) == hf(text).input_ids
        assert from_legacy.decode(from_legacy.encode(text)) == from_json.decode(
            from_json.encode(text)
        )


def test_legacy_without_config_and_with_add_bos(tmp_path):
    backend = trained_bpe()
    write_legacy(tmp_path, backend, [])
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the door") == Tokenizer(backend).encode("the door")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "add_bos_token": True})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the door") == [tok.eos_token_id, *Tokenizer(backend).encode("the door")]


def test_error_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_error_no_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(
        TokenizerError, match=r"looked for tokenizer\.json, or vocab\.json \+ merges\.txt"
    ):
        load_tokenizer(tmp_path)


def test_error_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match="corrupt .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_error_corrupt_config_and_vocab(tmp_path):
    build_byte_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer_config.json"):
        load_tokenizer(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "vocab.json").write_text("[1, 2")
    (legacy / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="cannot read .*vocab.json"):
        load_tokenizer(legacy)


def test_error_no_endoftext_token(tmp_path):
    backend = _byte_level(tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no '<\\|endoftext\\|>' token"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no '<\\|endoftext\\|>' token"):
        Tokenizer(backend)


def test_error_added_token_ids_not_contiguous(tmp_path):
    backend = trained_bpe()
    write_legacy(tmp_path, backend, [])
    (tmp_path / "added_tokens.json").write_text(json.dumps({"   ": backend.get_vocab_size() + 5}))
    with pytest.raises(TokenizerError, match="should have id"):
        load_tokenizer(tmp_path)


def test_error_malformed_added_tokens(tmp_path):
    write_legacy(tmp_path, trained_bpe(), [], {"added_tokens_decoder": {"7": {"no_content": 1}}})
    with pytest.raises(TokenizerError, match="malformed added tokens"):
        load_tokenizer(tmp_path)
