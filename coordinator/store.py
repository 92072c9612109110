"""The coordinator's durable state in SQLite (WAL): jobs, decisions, nodes, checkpoints, events,
bisections.

Only the controller writes (one writer, decide -> persist -> act). Every decision is persisted in one
transaction with the job row it produced, so after a crash the coordinator reloads exactly the state
it last acted on.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, spec_toml TEXT NOT NULL,
    data TEXT NOT NULL, request_id TEXT, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs(request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL, event TEXT NOT NULL,
    from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL, actions TEXT NOT NULL,
    generation INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_job ON decisions(job_id, seq);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, inventory TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    registered REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, good INTEGER NOT NULL,
    reason TEXT NOT NULL, fingerprint TEXT NOT NULL DEFAULT '', time REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, node_id TEXT NOT NULL, kind TEXT NOT NULL,
    generation INTEGER NOT NULL, step INTEGER NOT NULL, rank INTEGER NOT NULL, time REAL NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS bisections (
    bisection_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL
);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # The controller is the only writer; metrics scrapes read from another thread.
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            return cur.fetchall()

    # -- meta -----------------------------------------------------------------------------------
    def meta_get(self, key: str, default: str = "") -> str:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def meta_set(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- jobs and decisions -----------------------------------------------------------------------
    def insert_job(
        self,
        job_id: str,
        name: str,
        state: str,
        spec_toml: str,
        data: dict[str, Any],
        request_id: str | None,
        now: float,
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO jobs(job_id, name, state, spec_toml, data, request_id, created, updated) VALUES(?,?,?,?,?,?,?,?)",
                (job_id, name, state, spec_toml, json.dumps(data), request_id or None, now, now),
            )

    def job_by_request(self, request_id: str) -> str | None:
        rows = self._query("SELECT job_id FROM jobs WHERE request_id = ?", (request_id,))
        return rows[0][0] if rows else None

    def record_decision(
        self,
        job_id: str,
        state: str,
        data: dict[str, Any],
        *,
        event: str,
        from_state: str,
        reason: str,
        actions: list[str],
        generation: int,
        now: float,
    ) -> int:
        """Persist the job row and the decision that produced it, atomically."""
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, data = ?, updated = ? WHERE job_id = ?",
                (state, json.dumps(data), now, job_id),
            )
            cur = c.execute(
                "INSERT INTO decisions(job_id, time, event, from_state, to_state, reason, actions, generation) "
                "VALUES(?,?,?,?,?,?,?,?)",
                (job_id, now, event, from_state, state, reason, json.dumps(actions), generation),
            )
            return int(cur.lastrowid)

    def save_job(self, job_id: str, state: str, data: dict[str, Any], now: float) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, data = ?, updated = ? WHERE job_id = ?",
                (state, json.dumps(data), now, job_id),
            )

    def jobs(self) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT job_id, name, state, spec_toml, data, created, updated FROM jobs ORDER BY created"
        )
        return [
            {
                "job_id": r[0],
                "name": r[1],
                "state": r[2],
                "spec_toml": r[3],
                "data": json.loads(r[4]),
                "created": r[5],
                "updated": r[6],
            }
            for r in rows
        ]

    def decisions(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, time, event, from_state, to_state, reason, actions, generation FROM decisions WHERE job_id = ? ORDER BY seq",
            (job_id,),
        )
        return [
            {
                "seq": r[0],
                "time": r[1],
                "event": r[2],
                "from_state": r[3],
                "to_state": r[4],
                "reason": r[5],
                "actions": json.loads(r[6]),
                "generation": r[7],
            }
            for r in rows
        ]

    # -- nodes ------------------------------------------------------------------------------------
    def upsert_node(
        self, node_id: str, inventory: dict[str, Any], state: str, reason: str, now: float
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO nodes(node_id, inventory, state, reason, registered, updated) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(node_id) DO UPDATE SET inventory = excluded.inventory, state = excluded.state, "
                "reason = excluded.reason, updated = excluded.updated",
                (node_id, json.dumps(inventory), state, reason, now, now),
            )

    def nodes(self) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT node_id, inventory, state, reason, registered, updated FROM nodes ORDER BY node_id"
        )
        return [
            {
                "node_id": r[0],
                "inventory": json.loads(r[1]),
                "state": r[2],
                "reason": r[3],
                "registered": r[4],
                "updated": r[5],
            }
            for r in rows
        ]

    # -- checkpoints ------------------------------------------------------------------------------
    def upsert_checkpoint(
        self, job_id: str, step: int, path: str, good: bool, reason: str, fingerprint: str, now: float
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO checkpoints(job_id, step, path, good, reason, fingerprint, time) VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(job_id, step) DO UPDATE SET good = excluded.good, reason = excluded.reason",
                (job_id, step, path, int(good), reason, fingerprint, now),
            )

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT step, path, good, reason, fingerprint, time FROM checkpoints WHERE job_id = ? ORDER BY step",
            (job_id,),
        )
        return [
            {
                "step": r[0],
                "path": r[1],
                "good": bool(r[2]),
                "reason": r[3],
                "fingerprint": r[4],
                "time": r[5],
            }
            for r in rows
        ]

    # -- events -----------------------------------------------------------------------------------
    def add_events(self, rows: list[tuple[str, str, str, int, int, int, float, dict[str, Any]]]) -> list[int]:
        seqs = []
        with self.tx() as c:
            for job_id, node_id, kind, gen, step, rank, t, data in rows:
                cur = c.execute(
                    "INSERT INTO events(job_id, node_id, kind, generation, step, rank, time, data) VALUES(?,?,?,?,?,?,?,?)",
                    (job_id, node_id, kind, gen, step, rank, t, json.dumps(data, default=str)),
                )
                seqs.append(int(cur.lastrowid))
        return seqs

    def events(self, job_id: str = "", after_seq: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        if job_id:
            rows = self._query(
                "SELECT seq, job_id, node_id, kind, generation, step, rank, time, data FROM events "
                "WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            )
        else:
            rows = self._query(
                "SELECT seq, job_id, node_id, kind, generation, step, rank, time, data FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
        return [
            {
                "seq": r[0],
                "job_id": r[1],
                "node_id": r[2],
                "kind": r[3],
                "generation": r[4],
                "step": r[5],
                "rank": r[6],
                "time": r[7],
                "data": json.loads(r[8]),
            }
            for r in rows
        ]

    # -- bisections -------------------------------------------------------------------------------
    def save_bisection(self, bisection_id: str, job_id: str, state: str, data: dict[str, Any]) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(
                "INSERT INTO bisections(bisection_id, job_id, state, data, created, updated) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(bisection_id) DO UPDATE SET state = excluded.state, data = excluded.data, updated = excluded.updated",
                (bisection_id, job_id, state, json.dumps(data), now, now),
            )

    def bisections(self, job_id: str = "") -> list[dict[str, Any]]:
        if job_id:
            rows = self._query(
                "SELECT bisection_id, job_id, state, data FROM bisections WHERE job_id = ? ORDER BY created",
                (job_id,),
            )
        else:
            rows = self._query("SELECT bisection_id, job_id, state, data FROM bisections ORDER BY created")
        return [{"bisection_id": r[0], "job_id": r[1], "state": r[2], "data": json.loads(r[3])} for r in rows]
