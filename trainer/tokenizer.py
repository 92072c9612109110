"""Byte-level BPE whose merges never cross a character category.

The pre-tokenizer cuts text into runs of one category before BPE sees it, so no learned token mixes
letters with digits, punctuation or whitespace:

- letters: ``[\\p{L}\\p{M}]+`` (combining marks stay with the letter they modify),
- digits: ``\\p{N}``, one digit per pre-token. Numbers are spelled digit by digit, as in PaLM and
  Llama: every number has one consistent segmentation (``1862`` is never one token in one place and
  ``18|62`` in another), which helps arithmetic, and a small vocabulary is not spent on years and
  page numbers,
- punctuation and symbols: ``[^\\s\\p{L}\\p{M}\\p{N}]+`` (everything else that is not whitespace),
- whitespace: ``\\s+``.

Each run is then mapped to bytes (ByteLevel without its GPT-2 regex), so every byte string is
representable and decoding is exact. Training is deterministic: the same texts and vocabulary size
give the same tokenizer JSON, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents in the token stream; id 0
MIN_VOCAB_SIZE = 256 + 1  # every byte, plus the end-of-text token

# One alternative per category; together they match every character, so "isolated" splitting
# leaves nothing between matches.
CATEGORY_PATTERN = r"[\p{L}\p{M}]+|\p{N}|[^\s\p{L}\p{M}\p{N}]+|\s+"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CATEGORY_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (fewer if the texts run out of pairs
    to merge). Id 0 is :data:`EOT`; ids 1..256 are the 256 bytes."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size: {vocab_size} is too small; need at least {MIN_VOCAB_SIZE}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is noise, not a token
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _text_only(tokenizer)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files
        raise ValueError(f"{path}: not a readable tokenizer file ({e})") from None
    return _text_only(tokenizer)


def _text_only(tokenizer: Tokenizer) -> Tokenizer:
    """Encode a literal "<|endoftext|>" in the input as text. Only the data pipeline inserts the
    end-of-text id, by id, so a document cannot forge a document boundary. The flag is not saved
    in the JSON, hence set on every load."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (decoding a single id may cut a UTF-8 character in two)."""
    token = tokenizer.id_to_token(token_id)
    if token is None:
        raise ValueError(f"token id {token_id} is out of range")
    if token == EOT:
        return b""
    return bytes(_UNICODE_TO_BYTE[ch] for ch in token)


def _byte_level_table() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which ByteLevel uses to spell bytes as characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_UNICODE_TO_BYTE = _byte_level_table()
