"""Phi-2 tokenizer loading (byte-level BPE, as GPT-2/CodeGen) on the `tokenizers` library alone.

The stop token is always looked up in the vocabulary: some LLaVA-Phi configs carry a wrong
`eos_token_id: 2`, so nothing here reads token ids from a model config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
LEGACY_FILES = ("vocab.json", "merges.txt")
# transformers' clean_up_tokenization (applied by 4.x when clean_up_tokenization_spaces is true)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class TokenizerError(ValueError):
    """Missing, corrupt or unusable tokenizer files."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel alphabet), in byte order."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_level(
    backend: tokenizers.Tokenizer, add_prefix_space: bool = False
) -> tokenizers.Tokenizer:
    """Attach GPT-2's byte-level pre-tokenizer, post-processor and decoder (as Phi-2 has)."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=add_prefix_space, use_regex=True
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A `tokenizers.Tokenizer` that encodes as HF `tokenizer(text).input_ids`, plus LLaVA-Phi's
    special tokens."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = EOS_TOKEN,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        # Phi-2's tokenizer_config says true: transformers 4.x applied it in decode, 5.x ignores
        # it for BPE. Kept for callers that want reference-era text; decode() defaults to exact.
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerError(
                f"the vocabulary has no {EOS_TOKEN!r} token; LLaVA-Phi stops on it"
            )
        self._eos_token_id: int = eos

    @property
    def eos_token_id(self) -> int:
        """Id of `<|endoftext|>` in the vocabulary (50256 for Phi-2)."""
        return self._eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        """Id of the configured BOS token (Phi-2: `<|endoftext|>`, never prepended), or None."""
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added ones included (Phi-2: 50295; its embedding has 51200 rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token post-processing included (Phi-2 adds no BOS)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Text of token ids; ids beyond the vocabulary decode to nothing, as in transformers."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise TokenizerError(
                f"cannot decode negative token id {min(ids)} (an image placeholder?)"
            )
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (AutoTokenizer)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / TOKENIZER_FILE))
        special = {"bos_token": self.bos_token, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            # transformers 4 and 5 both load tokenizer.json as it is for this class
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "added_tokens_decoder": added,
        }
        (d / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return d


def build_byte_tokenizer() -> Tokenizer:
    """A tiny deterministic byte-level tokenizer: ids 0..255 = bytes (no merges), 256 = EOS."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    backend = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])))
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return Tokenizer(backend)


def _read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a TokenizerError that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _load_legacy(d: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt + added tokens, as GPT2Converter does."""
    vocab, merges = (d / f for f in LEGACY_FILES)
    _read_json(vocab)  # a clear error for a corrupt vocab.json
    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"cannot build a BPE from {vocab} and {merges}: {e}") from e
    _byte_level(backend, add_prefix_space=bool(config.get("add_prefix_space", False)))

    specials = {EOS_TOKEN} | {
        _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    } - {None}
    added: dict[int, AddedToken] = {}  # id -> token
    try:
        if (d / "added_tokens.json").is_file():
            for content, i in _read_json(d / "added_tokens.json").items():
                special = content in specials
                added[int(i)] = AddedToken(content, special=special, normalized=not special)
        for i, t in config.get("added_tokens_decoder", {}).items():
            flags = ("lstrip", "rstrip", "single_word", "special")
            added[int(i)] = AddedToken(t["content"], normalized=t.get("normalized", True),
                                       **{f: bool(t.get(f, False)) for f in flags})
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"malformed added tokens in {d}: {e!r}") from e
    for content in specials - {t.content for t in added.values()}:
        i = backend.token_to_id(content)
        if i is not None:
            added[i] = AddedToken(content, special=True, normalized=False)
    for i, t in sorted(added.items()):  # new tokens get the next free id, so add them in id order
        (backend.add_special_tokens if t.special else backend.add_tokens)([t])
        if backend.token_to_id(t.content) != i:
            raise TokenizerError(
                f"added token {t.content!r} should have id {i} but got "
                f"{backend.token_to_id(t.content)} (added token ids in {d} are not contiguous)"
            )

    bos = _token_content(config.get("bos_token", EOS_TOKEN))
    if config.get("add_bos_token", False) and bos is not None:
        bos_id = backend.token_to_id(bos)
        if bos_id is None:
            raise TokenizerError(
                f"add_bos_token is set but bos token {bos!r} is not in the vocabulary of {d}"
            )
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bos_id)]
        )
    return backend


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load a Phi-2 tokenizer from tokenizer.json, else from vocab.json + merges.txt (+ added)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {d}")
    config: dict[str, Any] = {}
    if (d / "tokenizer_config.json").is_file():
        config = _read_json(d / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise TokenizerError(f"{d / 'tokenizer_config.json'} is not a JSON object")
    if (d / TOKENIZER_FILE).is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"corrupt {d / TOKENIZER_FILE}: {e}") from e
    elif all((d / f).is_file() for f in LEGACY_FILES):
        backend = _load_legacy(d, config)
    else:
        raise TokenizerError(
            f"no tokenizer files in {d}: looked for {TOKENIZER_FILE}, or "
            f"{' + '.join(LEGACY_FILES)}"
        )
    try:
        return Tokenizer(
            backend,
            bos_token=_token_content(config.get("bos_token", EOS_TOKEN)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces")),
        )
    except TokenizerError as e:
        raise TokenizerError(f"{d}: {e}") from e
