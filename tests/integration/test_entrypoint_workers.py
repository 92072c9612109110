"""An agent's standby pool with a user's program built on the SDK: the agent starts it with the job's
args, it announces itself as a warm standby exactly as the trainer does, and when the node switches
to another program the agent stops it with SIGTERM, it exits 0 while waiting, and the exit is a stop
the agent asked for (nothing to report, nothing to replace)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.workers import Worker, WorkerGroup
from stanchion.sdk import contract
from stanchion.vocab import AgentEventKind, ExitReason

# The smallest program on the SDK: it records its argv, then joins (as a standby: waits there).
PROGRAM = """\
import json, os, sys
from pathlib import Path
Path(os.environ["STANCHION_WORKER_DIR"], "argv.json").write_text(json.dumps(sys.argv))
import stanchion
stanchion.join()
raise SystemExit("assigned: this test never assigns a rank")
"""


async def until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def test_an_sdk_program_is_a_standby_and_stops_cleanly_when_the_program_changes(tmp_path: Path) -> None:
    own = tmp_path / "own_loop.py"
    own.write_text(PROGRAM)
    other = tmp_path / "other.py"
    other.write_text(PROGRAM)
    cfg = AgentConfig(
        node_id="node-1",
        insecure=True,
        run_root=str(tmp_path / "runs"),
        entrypoints=(f"own={own}", f"other={other}"),
        standby=1,
        stop_grace_s=60.0,
    )
    group = WorkerGroup(cfg)
    exits: list[tuple[Worker, dict[str, Any]]] = []

    def poll() -> None:
        exits.extend((w, rec) for kind, w, rec in group.poll() if kind == AgentEventKind.WORKER_EXITED)

    async def main() -> None:
        try:
            group._use_program(group.resolve_program("own", ["--lr", "3e-4"]))
            await group.ensure_standbys()
            (w,) = group.workers
            assert w.program == (str(own), "--lr", "3e-4")

            def warm() -> bool:
                poll()
                assert not exits, [rec for _, rec in exits]
                return w.ready

            await until(warm, 120, "the SDK program's standby event")
            assert json.loads((w.paths.root / "argv.json").read_text()) == [str(own), "--lr", "3e-4"]

            group._use_program(group.resolve_program("other"))
            assert w.stopping

            def gone() -> bool:
                poll()
                return any(x is w for x, _ in exits)

            await until(gone, 60, "the old program's standby to exit")
            (rec,) = [rec for x, rec in exits if x is w]
            assert rec["exit_code"] == contract.EXIT_OK and rec["reason"] == ExitReason.STOPPED, rec
            assert w not in group.workers
            await group.ensure_standbys()  # what the agent does after a standby's exit
            (new,) = [x for x in group.workers if x.alive]
            assert new.program == (str(other),) and not new.stopping
        finally:
            await group.shutdown(30.0)  # SIGTERM: a waiting standby exits 0

    asyncio.run(main())
