"""Processes known by identity: a pid and the kernel's start time of that pid.

A pid alone names a process only while it lives: once it exits the kernel may give the number to
another one. The start time (field 22 of ``/proc/PID/stat``, in clock ticks since boot) tells them
apart, so an agent that re-adopts its ranks, or a rank that watches its agent, never takes a stranger
for the process it knew.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 on); empty when there is no
    such process. The name, in parentheses, may hold anything, so split after its last ``)``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``R``, ``S``, ``D``, ``T``, ``t``, ``Z`` ...);
    empty when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


@dataclass(frozen=True)
class ProcId:
    pid: int
    start: int  # clock ticks after boot at which the process started

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ProcId | None:
        """The identity in a JSON file with ``pid`` and ``start`` (None: no file, or not one)."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(int(d["pid"]), int(d["start"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running(self) -> bool:
        """Whether this very process still runs (a zombie or a reused pid does not)."""
        fields = _stat_fields(self.pid)
        return len(fields) > 19 and fields[0] not in ("Z", "X") and int(fields[19]) == self.start


def identify(pid: int) -> ProcId | None:
    """The identity of the running process ``pid`` (None when there is none)."""
    fields = _stat_fields(pid)
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None
    return ProcId(pid, int(fields[19]))
