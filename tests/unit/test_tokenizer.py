"""The byte-level BPE: no token crosses a character category, training is deterministic, and
decoding gives back the exact text."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.tokenizer import (
    EOT,
    MIN_VOCAB_SIZE,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    train_tokenizer,
)

FIXTURE_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "corpus"
VOCAB = 512


def _texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(FIXTURE_CORPUS.glob("*.txt"))]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_texts(), VOCAB)


def category(ch: str) -> str:
    """The pre-tokenizer's categories, spelled with unicodedata."""
    major = unicodedata.category(ch)[0]
    if major in "LM":
        return "letter"
    if major == "N":
        return "digit"
    if ch.isspace():
        return "space"
    return "punct"


def test_vocabulary_is_full_and_eot_is_id_0(tokenizer) -> None:
    assert tokenizer.get_vocab_size() == VOCAB
    assert tokenizer.token_to_id(EOT) == 0
    # Every byte is a token of its own, so any byte string can be encoded.
    singles = {token_bytes(tokenizer, i) for i in range(1, VOCAB) if len(token_bytes(tokenizer, i)) == 1}
    assert singles == {bytes([b]) for b in range(256)}


def test_no_learned_token_mixes_categories(tokenizer) -> None:
    merged = 0
    for token_id in range(1, tokenizer.get_vocab_size()):
        raw = token_bytes(tokenizer, token_id)
        # A token may hold part of a multi-byte character; the whole characters in it decide.
        text = raw.decode("utf-8", errors="ignore")
        kinds = {category(ch) for ch in text}
        assert len(kinds) <= 1, f"token {token_id} {raw!r} mixes {sorted(kinds)}"
        if kinds == {"digit"}:
            assert len(text) == 1, f"token {token_id} {raw!r}: digits are split one by one"
        merged += len(raw) > 1
    assert merged > 200  # merges were learned at all


def test_encoding_splits_at_category_boundaries(tokenizer) -> None:
    text = "In 1862, Lincoln wrote:--the Union's 34 states...\n\nThe end."
    enc = tokenizer.encode(text)
    for token, (start, end) in zip(enc.tokens, enc.offsets, strict=True):
        piece = text[start:end]
        assert len({category(ch) for ch in piece}) == 1, (token, piece)
    assert tokenizer.encode("1862").ids == [tokenizer.token_to_id(d) for d in "1862"]


def test_training_is_deterministic(tokenizer) -> None:
    again = train_tokenizer(_texts(), VOCAB)
    assert again.to_str() == tokenizer.to_str()


def test_fixture_text_round_trips(tokenizer) -> None:
    for text in _texts()[:3]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_end_of_text_in_the_input_is_plain_text(tokenizer, tmp_path: Path) -> None:
    text = f"one{EOT}two"
    save_tokenizer(tokenizer, tmp_path / "t.json")
    for tok in (tokenizer, load_tokenizer(tmp_path / "t.json")):
        ids = tok.encode(text).ids
        assert tok.token_to_id(EOT) not in ids
        assert tok.decode(ids) == text


def test_save_and_load(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    assert load_tokenizer(path).to_str() == tokenizer.to_str()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


def test_vocabulary_must_hold_every_byte() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], MIN_VOCAB_SIZE - 1)
