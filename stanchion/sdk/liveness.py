"""A liveness file the agent reads to tell a stuck rank from one waiting on a peer.

A daemon thread rewrites ``WORKER_DIR/alive.json`` every ``interval_s`` with the collective the
rank is blocked in, if any. Collectives release the GIL, so the thread keeps writing while its rank
waits on a peer; a frozen process (SIGSTOP, a wedged interpreter) stops writing. The agent treats
"no progress, fresh file, inside a collective" as waiting on someone else, and "no progress, stale
file" as hung.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from stanchion.sdk import parallel

ALIVE_FILE = "alive.json"


def read(worker_dir: str | os.PathLike[str]) -> tuple[float, dict]:
    """(age in seconds of the file, its content); (inf, {}) when missing or unreadable."""
    path = Path(worker_dir) / ALIVE_FILE
    try:
        age = time.time() - path.stat().st_mtime
        return age, json.loads(path.read_text())
    except (OSError, ValueError):
        return float("inf"), {}


class LivenessThread(threading.Thread):
    def __init__(self, worker_dir: Path, interval_s: float = 0.5):
        super().__init__(name="liveness", daemon=True)
        self.path = Path(worker_dir) / ALIVE_FILE
        self.interval_s = interval_s
        self._stop = threading.Event()

    def start(self) -> None:
        self.beat()  # the file exists before start() returns, even if the process stops at once
        super().start()

    def beat(self) -> None:
        blocked = list(parallel.current_collective)
        state = {"pid": os.getpid(), "time": time.time()}
        if blocked:
            state["collective"], state["since"], _ = blocked[-1]
        tmp = self.path.with_name(f".{ALIVE_FILE}.tmp.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
