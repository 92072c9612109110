"""Checkpoint manifests: the commit marker, per-file checksums, verification and retention.

Layout under ``RUN_DIR/checkpoints/``::

    step-00000040.g3.tmp/  being written by generation 3 (never read; a generation never
                           writes into the directory of a checkpoint an older one abandoned)
    step-00000040/       files fsynced and renamed into place; not yet committed
    step-00000040/manifest.json   written last: the commit marker
    step-00000040/BAD.json        optional: the coordinator judged it bad (with the reason)

A checkpoint is *committed* when its manifest exists; it *verifies* when every file the manifest
lists has the recorded size and CRC-32. CRC-32 (zlib, standard library) detects every single-bit
flip and every truncation at ~3 GB/s; it is an integrity check against storage faults, not a
defence against tampering (that is what access control on the checkpoint directory is for).

Pure standard library: the agent and the CLI verify checkpoints without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stanchion.files import write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BAD_MARKER = "BAD.json"
FORMAT = 1
_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or name.endswith(".tmp"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def file_crc32(path: Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in chunks."""
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def write_manifest(ckpt_dir: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in ``ckpt_dir`` and write the manifest last (atomically): the commit."""
    files = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, BAD_MARKER):
            size, crc = file_crc32(p)
            files[str(p.relative_to(ckpt_dir))] = {"bytes": size, "crc32": crc}
    manifest = {"format": FORMAT, "time": time.time(), **fields, "files": files}
    write_json_atomic(ckpt_dir / MANIFEST, manifest, indent=1, durable=True)  # a commit survives a crash
    return manifest


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    with (Path(ckpt_dir) / MANIFEST).open() as f:
        return json.load(f)


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str
    manifest: dict[str, Any] | None = None


def verify(ckpt_dir: str | os.PathLike[str], *, allow_marked_bad: bool = False) -> Verification:
    """Check the commit marker and every file's size and CRC-32 (and, unless ``allow_marked_bad``,
    that nobody marked it bad)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return Verification(False, f"{ckpt_dir} is not a directory")
    try:
        manifest = read_manifest(ckpt_dir)
    except FileNotFoundError:
        if parse_step(ckpt_dir) is None:
            return Verification(
                False,
                f"{ckpt_dir} is not a checkpoint directory (no {MANIFEST}, and not named like one): "
                "checkpoints are the step-NNNNNNNN directories under a run's checkpoints/",
            )
        return Verification(False, f"not committed: {MANIFEST} is missing (the save did not finish)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Verification(False, f"{MANIFEST} is corrupt: {e}")
    if not isinstance(manifest, dict):
        return Verification(False, f"{MANIFEST} is corrupt: not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return Verification(False, f"{MANIFEST} lists no files", manifest)
    for rel, expect in sorted(files.items()):
        p = ckpt_dir / rel
        if not p.is_file():
            return Verification(False, f"{rel} is missing", manifest)
        size, crc = file_crc32(p)
        if size != expect.get("bytes"):
            return Verification(
                False,
                f"{rel} has {size} bytes, the manifest says {expect.get('bytes')} (truncated?)",
                manifest,
            )
        if crc != expect.get("crc32"):
            return Verification(False, f"{rel} fails its CRC-32 check (bit rot or a partial write)", manifest)
    bad = ckpt_dir / BAD_MARKER
    if bad.exists() and not allow_marked_bad:
        reason = "marked bad"
        with contextlib.suppress(OSError, json.JSONDecodeError):
            reason = "marked bad: " + json.loads(bad.read_text()).get("reason", "")
        return Verification(False, reason, manifest)
    if not manifest.get("replicas_agree", True):
        return Verification(False, "replica fingerprints disagreed when it was saved", manifest)
    return Verification(True, "committed and verified", manifest)


def mark_bad(ckpt_dir: str | os.PathLike[str], reason: str) -> None:
    write_json_atomic(Path(ckpt_dir) / BAD_MARKER, {"reason": reason, "time": time.time()}, durable=True)


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    path: Path
    committed: bool
    marked_bad: bool


def scan(ckpt_root: str | os.PathLike[str]) -> list[CheckpointEntry]:
    """Every ``step-*`` directory under ``ckpt_root``, oldest first (no checksums read)."""
    root = Path(ckpt_root)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        step = parse_step(p)
        if step is None or not p.is_dir():
            continue
        out.append(CheckpointEntry(step, p, (p / MANIFEST).exists(), (p / BAD_MARKER).exists()))
    return sorted(out, key=lambda e: e.step)


def newest_good(
    ckpt_root: str | os.PathLike[str], *, max_step: int | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (at or before ``max_step``), and the newer ones skipped with why."""
    skipped = []
    for entry in reversed(scan(ckpt_root)):
        if max_step is not None and entry.step > max_step:
            continue
        v = verify(entry.path)
        if v.ok:
            return entry.path, skipped
        skipped.append((entry.path, v.reason))
    return None, skipped


def apply_retention(ckpt_root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete old checkpoints, keeping the newest ``keep`` that are committed and not marked bad.

    Never deletes the newest checkpoint that verifies, never touches anything newer than the newest
    committed one (it may be in the middle of being written), and removes stale ``.tmp`` directories
    only when a newer checkpoint has committed since.
    """
    root = Path(ckpt_root)
    entries = scan(root)
    committed = [e for e in entries if e.committed and not e.marked_bad]
    if not committed:
        return []
    newest_committed = max(e.step for e in entries if e.committed)
    protected = {e.path for e in committed[-keep:]}
    good, _ = newest_good(root)
    if good is not None:
        protected.add(good)
    removed = []
    for e in entries:
        if e.path in protected or e.step >= newest_committed:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    for p in root.glob("step-*.tmp"):  # step-00000040.tmp, or step-00000040.g3.tmp (generation 3)
        step = parse_step(p.with_name(p.name.split(".", 1)[0]))
        if step is not None and step < newest_committed:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
