"""A rank's heartbeat: what the agent reads to tell a frozen rank from a busy one or one waiting on a peer.

A daemon thread writes one fixed-size record into ``WORKER_DIR/heartbeat`` every ``interval_s``
(50 ms): its pid, the time, the step, and what the rank is doing: running, blocked in a collective
(which one, since when, and the longest that collective took in its recent completed calls) or in a
pause it announced (evaluation, a blocking checkpoint, the start-up check; :func:`pause`). The file is memory-mapped: a beat is a store into shared memory, with no
system call, no new file and no rename, so beating 20 times a second costs nothing measurable. The
agent reads the record with one ``read`` and checks its CRC (a read may overlap a write).

Collectives release the GIL, so the thread keeps beating while its rank waits on a peer; a frozen
process (SIGSTOP, a wedged interpreter) stops beating. The agent's decisions are in
:mod:`agent.hangs`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_FILE = "heartbeat"
INTERVAL_S = 0.05

RUNNING, COLLECTIVE, PAUSED = "running", "collective", "paused"
_DOINGS = (RUNNING, COLLECTIVE, PAUSED)
_WHAT_BYTES = 96
# pid, beat time, step, doing, since, usual, what; then the CRC-32 of those bytes.
_BODY = struct.Struct(f"<qdqBdd{_WHAT_BYTES}s")
RECENT = 64  # completed calls of each collective whose durations a beat's ``usual_s`` looks back on
_RECORD_BYTES = _BODY.size + 4


@dataclass(frozen=True)
class Beat:
    """One heartbeat: ``doing`` is RUNNING, COLLECTIVE (``what``, entered at ``since``; ``usual_s``:
    the longest of its last :data:`RECENT` completed calls in this process, 0 before the first) or
    PAUSED (an announced pause ``what``, begun at ``since``). Times are wall-clock seconds."""

    pid: int
    t: float
    step: int
    doing: str = RUNNING
    what: str = ""
    since: float = 0.0
    usual_s: float = 0.0

    def encode(self) -> bytes:
        what = self.what.encode()[:_WHAT_BYTES]
        doing = _DOINGS.index(self.doing)
        body = _BODY.pack(self.pid, self.t, self.step, doing, self.since, self.usual_s, what)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def decode(cls, raw: bytes) -> Beat | None:
        """The beat in ``raw``, or None when it is short or torn (its CRC does not match)."""
        if len(raw) < _RECORD_BYTES:
            return None
        body, (crc,) = raw[: _BODY.size], struct.unpack("<I", raw[_BODY.size : _RECORD_BYTES])
        if zlib.crc32(body) != crc:
            return None
        pid, t, step, doing, since, usual_s, what = _BODY.unpack(body)
        if doing >= len(_DOINGS):
            return None
        what_s = what.rstrip(b"\0").decode(errors="replace")
        return cls(pid, t, step, _DOINGS[doing], what_s, since, usual_s)


def read(worker_dir: str | os.PathLike[str], retries: int = 3) -> Beat | None:
    """The rank's newest heartbeat; None when there is none yet (or it stays unreadable)."""
    path = Path(worker_dir) / HEARTBEAT_FILE
    for _ in range(retries):
        try:
            beat = Beat.decode(path.read_bytes())
        except OSError:
            return None
        if beat is not None:
            return beat
    return None


# What this rank is blocked in, if anything (``stanchion.sdk.parallel.collective`` keeps it through
# :func:`enter` and :func:`leave`), so an agent can tell a rank waiting on a peer from a rank that is
# itself stuck. Entries are (what, since, thread): a checkpoint's commit vote runs in a background
# thread while the main thread enters and leaves its own collectives, so each thread removes exactly
# its own entry.
current_collective: list[tuple[str, float, int]] = []
# Durations of each collective's recent completed calls: how long one usually takes here, so that
# the agent can tell one that will not complete from a slow one (agent/hangs.py).
_recent: dict[str, deque[float]] = {}
_recent_lock = threading.Lock()


def enter(what: str) -> tuple[str, float, int]:
    """This thread is now blocked in the collective ``what``; returns its entry for :func:`leave`."""
    entry = (what, time.time(), threading.get_ident())
    current_collective.append(entry)
    return entry


def leave(entry: tuple[str, float, int], *, completed: bool) -> None:
    """The collective of ``entry`` returned; ``completed``: it did its work (a failed one is not a
    duration worth learning from)."""
    current_collective.remove(entry)
    if completed:
        what, since, _ = entry
        with _recent_lock:
            _recent.setdefault(what, deque(maxlen=RECENT)).append(time.time() - since)


def usual(what: str) -> float:
    """The longest of the collective's recent completed calls (0.0 before the first)."""
    with _recent_lock:
        return max(_recent.get(what, ()), default=0.0)


# Pauses this process announced, innermost last, the same way. See :func:`pause`.
_pauses: list[tuple[str, float, int]] = []


@contextlib.contextmanager
def pause(what: str) -> Iterator[None]:
    """Announce a long legitimate pause in stepping (an evaluation, a compile, a blocking save) for
    the block's duration: the agent never calls a rank hung for taking no step while it lasts. A
    frozen process is still detected (it stops beating)."""
    entry = (what, time.time(), threading.get_ident())
    _pauses.append(entry)
    try:
        yield
    finally:
        _pauses.remove(entry)


def current(pid: int, step: int, now: float) -> Beat:
    """What this process is doing now: a collective it is blocked in comes first (it says who it
    waits on), then an announced pause, else running."""
    blocked, paused = list(current_collective), list(_pauses)
    if blocked:
        what, since, _ = blocked[-1]
        return Beat(pid, now, step, COLLECTIVE, what, since, usual(what))
    if paused:
        what, since, _ = paused[-1]
        return Beat(pid, now, step, PAUSED, what, since)
    return Beat(pid, now, step, RUNNING)


class LivenessThread(threading.Thread):
    """Beats every ``interval_s`` into ``WORKER_DIR/heartbeat`` until :meth:`stop`."""

    def __init__(self, worker_dir: Path, step: Callable[[], int] = lambda: 0, interval_s: float = INTERVAL_S):
        super().__init__(name="liveness", daemon=True)
        self.path = Path(worker_dir) / HEARTBEAT_FILE
        self.step, self.interval_s = step, interval_s
        self._stop = threading.Event()
        self._pid = os.getpid()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, _RECORD_BYTES)
            self._map = mmap.mmap(fd, _RECORD_BYTES)
        finally:
            os.close(fd)

    def start(self) -> None:
        self.beat()  # the record exists before start() returns, even if the process stops at once
        super().start()

    def beat(self) -> None:
        self._map[:_RECORD_BYTES] = current(self._pid, self.step(), time.time()).encode()

    def run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
