"""The heartbeat (stanchion/sdk/liveness.py) and the agent's hang decisions (agent/hangs.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_worker_states import fake_proc

from agent import hangs
from agent.config import AgentConfig
from agent.workers import Worker, WorkerGroup
from protos.stanchion.v1 import types_pb2
from stanchion import procs
from stanchion.sdk import liveness, parallel
from stanchion.sdk.contract import WorkerPaths
from stanchion.sdk.liveness import COLLECTIVE, PAUSED, RUNNING, Beat
from stanchion.waiting import wait_until

LIMITS = hangs.Limits(frozen_after_s=0.25, wedged_after_s=3.0)
PID = 4242
NOW = 1_000_000.0


def states(state: str):
    return lambda _pid: state


def test_a_beat_round_trips_and_a_torn_or_short_record_is_refused() -> None:
    beat = Beat(PID, NOW, 17, COLLECTIVE, "gradient all-reduce", NOW - 0.5, usual_s=0.125)
    raw = beat.encode()
    assert Beat.decode(raw) == beat
    torn = bytearray(raw)
    torn[20] ^= 0x01  # a byte of the step changed under the reader: the CRC no longer matches
    assert Beat.decode(bytes(torn)) is None
    assert Beat.decode(raw[:-1]) is None


def test_the_thread_beats_what_the_rank_is_doing(tmp_path: Path) -> None:
    step = [3]
    t = liveness.LivenessThread(tmp_path, step=lambda: step[0])
    t.beat()
    first = liveness.read(tmp_path)
    assert first is not None and (first.doing, first.step, first.pid) == (RUNNING, 3, t._pid)
    step[0] = 4
    with liveness.pause("evaluation"):
        t.beat()
        paused = liveness.read(tmp_path)
        with parallel.collective("evaluation all-reduce"):
            t.beat()
            blocked = liveness.read(tmp_path)
    assert paused is not None and (paused.doing, paused.what, paused.step) == (PAUSED, "evaluation", 4)
    # a collective says whom the rank waits on: it comes first, inside a pause too
    assert blocked is not None and (blocked.doing, blocked.what) == (COLLECTIVE, "evaluation all-reduce")
    assert blocked.t >= paused.t >= first.t
    t.beat()
    after = liveness.read(tmp_path)
    assert after is not None and after.doing == RUNNING


def test_frozen_needs_both_a_silent_heartbeat_and_a_process_stopped_by_a_signal() -> None:
    beat = Beat(PID, NOW, 40)
    assert "process state T" in hangs.frozen(PID, beat, NOW + 0.3, states("T"), LIMITS)
    assert "at step 40" in hangs.frozen(PID, beat, NOW + 0.3, states("T"), LIMITS)
    # silent for less than the limit: not yet
    assert hangs.frozen(PID, beat, NOW + 0.2, states("T"), LIMITS) == ""
    # runnable but starved of CPU on a busy machine, or asleep: never frozen, however long
    assert hangs.frozen(PID, beat, NOW + 30, states("R"), LIMITS) == ""
    assert hangs.frozen(PID, beat, NOW + 30, states("S"), LIMITS) == ""
    # stopped by a debugger (tracing stop): left alone
    assert hangs.frozen(PID, beat, NOW + 30, states("t"), LIMITS) == ""
    # no beat yet, or the beat of an earlier process in the same directory: nothing to judge by
    assert hangs.frozen(PID, None, NOW + 30, states("T"), LIMITS) == ""
    assert hangs.frozen(PID + 1, beat, NOW + 30, states("T"), LIMITS) == ""


def test_a_rank_without_steps_is_hung_unless_it_waits_on_a_peer_or_announced_a_pause() -> None:
    def verdict(beat: Beat | None, *, idle: float = 5.0, now: float = NOW) -> str:
        return hangs.not_stepping(PID, beat, now, idle, 2.0, LIMITS)

    assert verdict(Beat(PID, NOW, 9), idle=1.9) == ""  # within its step limit
    assert "outside any collective" in verdict(Beat(PID, NOW, 9))
    assert verdict(Beat(PID, NOW, 9, COLLECTIVE, "gradient all-reduce", NOW - 3.9)) == ""
    assert verdict(Beat(PID, NOW, 9, PAUSED, "evaluation", NOW - 60), idle=60) == ""
    # a wedged process (its heartbeat silent, whatever it said last) and a missing heartbeat are hung
    assert "no heartbeat for 3.5s" in verdict(Beat(PID, NOW, 9, COLLECTIVE, "x", NOW - 4), now=NOW + 3.5)
    assert "no heartbeat from its process" in verdict(None)
    assert "no heartbeat from its process" in verdict(Beat(PID + 1, NOW, 9))


def test_process_state_reads_the_kernel(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_until(lambda: procs.process_state(proc.pid) == "S", 30, "the child asleep (state S)")
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: procs.process_state(proc.pid) == "T", 30, "the child stopped (state T)")
    finally:
        proc.kill()
        proc.wait()
    assert procs.process_state(proc.pid) == ""  # reaped: no such process


BEATING = """
import sys, time
from pathlib import Path
from stanchion.sdk.liveness import LivenessThread
LivenessThread(Path(sys.argv[1])).start()
print("beating", flush=True)
time.sleep(120)
"""


@pytest.fixture
def beating(tmp_path: Path):
    """A real process whose heartbeat thread runs while its main thread sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", BEATING, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "beating"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_process_stops_beating_and_is_frozen_until_it_is_continued(
    tmp_path: Path, beating: subprocess.Popen
) -> None:
    def verdict() -> str:
        return hangs.frozen(beating.pid, liveness.read(tmp_path), time.time(), procs.process_state, LIMITS)

    def beats() -> bool:
        beat = liveness.read(tmp_path)
        return beat is not None and time.time() - beat.t < LIMITS.frozen_after_s

    wait_until(beats, 30, "fresh heartbeats from the running process")
    assert verdict() == ""
    beating.send_signal(signal.SIGSTOP)
    wait_until(lambda: "process state T" in verdict(), 30, "the stopped process judged frozen")
    beating.send_signal(signal.SIGCONT)
    wait_until(beats, 30, "heartbeats again once the process is continued")
    assert verdict() == ""


@pytest.mark.parametrize(
    ("state", "killed"),
    [
        (types_pb2.WORKER_STATE_TRAINING, True),
        # between generations (left one, joining the next): the coordinator's first-step deadline
        # judges it (a survivor frozen as it joins is the escalation ladder's case)
        (types_pb2.WORKER_STATE_WAITING, False),
        (types_pb2.WORKER_STATE_STARTING, False),
    ],
)
def test_the_agent_kills_a_frozen_rank_at_its_next_poll_long_before_any_step_limit(
    tmp_path: Path, beating: subprocess.Popen, state: int, killed: bool
) -> None:
    cfg = AgentConfig(node_id="node-0", insecure=True, run_root=str(tmp_path / "runs"), hang_floor_s=30.0)
    group = WorkerGroup(cfg)
    proc = fake_proc(beating.pid)  # the real stopped process, observed; the kill is recorded
    w = Worker(4, proc, WorkerPaths(tmp_path), 0.0, job_id="j", slot=0, rank=1, generation=2)
    group.workers.append(w)
    w.state = state
    w.assigned_at = w.last_progress_at = time.time()
    beating.send_signal(signal.SIGSTOP)
    wait_until(lambda: procs.process_state(beating.pid) == "T", 30, "the rank stopped")
    last = liveness.read(tmp_path)
    assert last is not None
    now = last.t + 0.3  # a poll 0.3 s after its last heartbeat, 29.7 s before its step limit
    group.poll(now=now)
    assert (proc.signals == [signal.SIGKILL]) is killed, proc.signals
    if killed:
        assert w.state == types_pb2.WORKER_STATE_HUNG and w.hung_at == now
        assert w.hung.startswith("stopped by a signal (process state T): no heartbeat for 0.30s"), w.hung
    else:
        assert w.hung == "" and w.state == state


def test_a_collective_past_its_deadline_is_hung_and_the_deadline_follows_its_usual_duration() -> None:
    """Blocked in one collective past max(2 x the step limit, 10 x its longest recent call): hung,
    whoever it waits on (every rank alive in a wedged collective); sooner, it waits on a peer."""

    def verdict(blocked_s: float, usual_s: float, limit_s: float = 2.0) -> str:
        beat = Beat(PID, NOW, 9, COLLECTIVE, "gradient all-reduce", NOW - blocked_s, usual_s)
        return hangs.not_stepping(PID, beat, NOW, blocked_s, limit_s, LIMITS)

    # usual calls of 10 ms: the floor, twice the step limit (4 s), decides
    assert verdict(3.9, 0.01) == ""
    why = verdict(4.1, 0.01)
    assert "blocked in 'gradient all-reduce' for 4.1s, past its deadline 4.0s" in why
    assert "its longest recent call, 0.010s" in why
    # a collective that usually takes 1.5 s: 15 s before it is called stuck
    assert verdict(14.9, 1.5) == ""
    assert "past its deadline 15.0s" in verdict(15.1, 1.5)
    # never completed here before (0: no history): the floor
    assert "past its deadline 4.0s" in verdict(4.5, 0.0)


def test_the_heartbeat_carries_the_longest_recent_call_of_the_collective_it_is_blocked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [NOW]
    monkeypatch.setattr(liveness.time, "time", lambda: clock[0])
    monkeypatch.setattr(liveness, "_recent", {})
    t = liveness.LivenessThread(tmp_path)
    for took in (0.02, 0.30, 0.05):
        entry = liveness.enter("layer norm all-reduce")
        clock[0] += took
        liveness.leave(entry, completed=True)
    failed = liveness.enter("layer norm all-reduce")
    clock[0] += 9.0
    liveness.leave(failed, completed=False)  # a call that failed teaches nothing about its duration
    entry = liveness.enter("layer norm all-reduce")
    clock[0] += 1.0
    t.beat()
    beat = liveness.read(tmp_path)
    assert beat is not None and (beat.doing, beat.since) == (COLLECTIVE, clock[0] - 1.0)
    assert beat.usual_s == pytest.approx(0.30)
    liveness.leave(entry, completed=True)
    other = liveness.enter("checkpoint commit vote")  # no history of its own
    t.beat()
    assert liveness.read(tmp_path).usual_s == 0.0
    liveness.leave(other, completed=True)
    # the window is the last RECENT calls: an old long one ages out
    for _ in range(liveness.RECENT):
        e = liveness.enter("layer norm all-reduce")
        clock[0] += 0.01
        liveness.leave(e, completed=True)
    assert liveness.usual("layer norm all-reduce") == pytest.approx(0.01)
    assert not liveness.current_collective
