"""The local cluster's wait for a process's port file: the file's content once it is there, at once
an error naming the exit code when the process died first, and a timeout that says what it waited
for. Real child processes, no fixed sleeps."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from diagnostics.localcluster import LocalCluster, Proc
from stanchion.waiting import wait_until


def spawn(tmp_path: Path, name: str, code: str) -> Proc:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, p, log, [])


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Proc]:
    proc = spawn(
        tmp_path, "agent-n1", "import sys, time; print('listening soon', flush=True); time.sleep(120)"
    )
    yield proc
    proc.popen.kill()
    proc.popen.wait()


def test_the_port_file_is_returned_once_written(tmp_path: Path, sleeper: Proc) -> None:
    cluster = LocalCluster(tmp_path / "c")
    port_file = tmp_path / "agent.json"
    port_file.write_text(json.dumps({"port": 5, "metrics_port": 6}))
    assert cluster._wait_file(port_file, sleeper, 30.0) == {"port": 5, "metrics_port": 6}


def test_a_process_that_exits_first_fails_at_once_with_its_code_and_log(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    proc = spawn(tmp_path, "coordinator", "print('bad flag'); raise SystemExit(3)")
    proc.popen.wait()
    with pytest.raises(RuntimeError, match=r"coordinator exited with 3: bad flag"):
        cluster._wait_file(tmp_path / "never.json", proc, 600.0)  # not the 600 s: it gave up at once


def test_a_timeout_names_the_process_and_its_port_file_and_shows_its_log(
    tmp_path: Path, sleeper: Proc
) -> None:
    cluster = LocalCluster(tmp_path / "c")
    wait_until(lambda: "listening soon" in sleeper.log.read_text(), 60, "the child's first log line")
    with pytest.raises(
        TimeoutError, match=r"waiting for agent-n1 to start \(its port file never\.json\)"
    ) as e:
        cluster._wait_file(tmp_path / "never.json", sleeper, 0.2)
    assert sleeper.alive()
    assert str(e.value).endswith(": listening soon")  # the tail of its log
