"""Files that other processes read while they are being written.

Two rules hold everywhere in Stanchion:

- A JSON file is replaced atomically (written beside it, fsynced, renamed over it): a reader sees the
  old content or the new, never half of either.
- A JSON-lines file is appended one whole line per ``write``. A record is a line that ends in a
  newline: an unterminated last line is torn (its writer is still appending, or died mid-write) and
  is not a record yet. A terminated line that does not parse is skipped: one damaged record must not
  hide the ones after it. :class:`JsonlTail` and :func:`read_jsonl` are the only readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = None, durable: bool = False
) -> None:
    """Write-then-rename so a reader never sees half a file.

    The content is fsynced before the rename, so the name never points at unwritten data. With
    ``durable`` the directory is fsynced after the rename too, so the new file survives a power loss
    or an OS crash (a commit marker such as a checkpoint manifest needs that). It is not the default:
    most of these files (assignments, requests, port files, error files) hand state to another
    process on the same running machine, which an OS crash would take down as well, and an agent
    writes one assignment per worker on the recovery path, where an extra journal commit per file
    would only add latency.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=indent, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path) as f:
        return json.load(f)


class JsonlWriter:
    """Append-only JSON lines, one ``write`` per record so concurrent readers never see a torn line."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("t", time.time())
        os.write(self._fd, (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _records(lines: list[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.strip():
            with contextlib.suppress(ValueError):  # a damaged record (JSONDecodeError, bad UTF-8)
                yield json.loads(line)


class JsonlTail:
    """Reads the records appended to a JSON-lines file since the last call (an agent's view of its
    worker). A torn last line is kept back and completed by the next read; a file that became
    shorter than what was read was rewritten, and is read again from its start. ``start``: begin at
    this byte offset instead, dropping the line it falls inside (a reader that wants the recent end)."""

    def __init__(self, path: str | os.PathLike[str], start: int = 0):
        self.path = Path(path)
        # From the byte before ``start``: if that is a newline, the line dropped is an empty one.
        self._offset = max(0, start - 1)
        self._partial = b""
        self._mid_line = start > 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:  # rewritten (shorter): start over
                    self._offset, self._partial, self._mid_line = 0, b"", False
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if self._mid_line and lines:  # the first line is the end of one begun before ``start``
            lines.pop(0)
            self._mid_line = False
        return list(_records(lines))


class JsonlTails:
    """The records appended since the last call to every JSON-lines file matching ``pattern`` under
    ``root`` (files appear as ranks start), in time order: one :class:`JsonlTail` per file, so
    polling a long run stays cheap."""

    def __init__(self, root: str | os.PathLike[str], pattern: str):
        self.root, self.pattern = Path(root), pattern
        self.tails: dict[Path, JsonlTail] = {}

    def read(self) -> list[dict[str, Any]]:
        for path in self.root.glob(self.pattern):
            if path not in self.tails:
                self.tails[path] = JsonlTail(path)
        new = [r for t in self.tails.values() for r in t.read()]
        new.sort(key=lambda r: r.get("t", 0))
        return new


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file (nothing if it does not exist), torn last line left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a torn line
    yield from _records(lines)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))
