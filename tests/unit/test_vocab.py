"""The protocol's vocabularies: members are their plain string values wherever they travel (JSON,
protobuf, f-strings, sets of strings read back), and the values on the wire are pinned here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import REPO

from agent.config import AgentConfig
from agent.workers import Worker, WorkerGroup
from coordinator.config import CoordinatorConfig
from coordinator.controller import Controller
from coordinator.machine import WorkerFailed
from coordinator.store import Store
from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion.sdk import contract
from stanchion.sdk.contract import WorkerPaths
from stanchion.vocab import (
    CLEAN_EXITS,
    DETECTOR_RESTART_REASON,
    DETECTORS,
    EXIT_RESTART_REASON,
    FAILED_EXITS,
    FORWARDED,
    AgentEventKind,
    CoordinatorEventKind,
    EventKind,
    ExitReason,
    RestartReason,
    Resume,
)

WIRE = {
    EventKind: {
        "standby", "joining", "started", "restored", "healed", "heal_rollback", "nondeterministic", "numerics_changed",
        "nonfinite", "spike", "fingerprint_mismatch", "audit_mismatch", "rollback", "rollback_unavailable",
        "checkpoint_committed", "checkpoint_skipped", "checkpoint_failed", "checkpoint_abandoned",
        "collective_failed", "generation_change", "abandoned", "fault_injected", "eval", "finished", "stopped",
        "straggler", "straggler_cleared",
    },
    RestartReason: {
        "crash", "hang", "node_lost", "nonfinite", "spike", "fingerprint", "audit", "health", "manual",
        "drain", "collective_failed", "reconcile", "bisection", "first_step_timeout", "straggler",
    },
    Resume: {"fresh", "checkpoint", "peer"},
    AgentEventKind: {"worker_exited", "health", "stale_directive", "directive_rejected", "directive_failed"},
    CoordinatorEventKind: {
        "decision", "node_registered", "node_lost", "node_unhealthy", "node_cordoned", "node_draining",
        "node_ready", "controller_error", "bisection_done", "ranks_adopted",
    },
    ExitReason: {"finished", "stopped", "superseded", "config", "crash", "hang", "standby_lost"},
}  # fmt: skip


@pytest.mark.parametrize("vocab", list(WIRE), ids=lambda v: v.__name__)
def test_the_values_on_the_wire_are_unchanged(vocab) -> None:
    assert {m.value for m in vocab} == WIRE[vocab]
    for m in vocab:
        assert m.name.lower() == m.value  # the name says the value


@pytest.mark.parametrize(
    "member",
    [
        EventKind.FINGERPRINT_MISMATCH,
        RestartReason.NODE_LOST,
        Resume.PEER,
        AgentEventKind.WORKER_EXITED,
        CoordinatorEventKind.NODE_LOST,
        ExitReason.STANDBY_LOST,
    ],
)
def test_a_member_is_its_string_everywhere(member) -> None:
    value = member.value
    assert member == value and value == member and hash(member) == hash(value)
    assert str(member) == value and f"{member}" == value and f"{member:>20}" == f"{value:>20}"
    assert "%s" % member == value  # noqa: UP031 - as logging formats it
    assert (
        json.dumps(member) == f'"{value}"' and json.dumps({member: [member]}) == f'{{"{value}": ["{value}"]}}'
    )
    assert type(json.loads(json.dumps(member))) is str
    # A plain string read back from a file or off the wire finds the member, and the other way round.
    assert value in frozenset({member}) and member in {value} and {value: 1}[member] == 1
    assert type(member)(value) is member


def test_protobuf_string_fields_carry_the_value() -> None:
    event = types_pb2.Event(kind=EventKind.CHECKPOINT_COMMITTED)
    start = agent_pb2.StartWorkers(resume=Resume.PEER)
    start = agent_pb2.StartWorkers.FromString(start.SerializeToString())
    event = types_pb2.Event.FromString(event.SerializeToString())
    assert (event.kind, start.resume) == ("checkpoint_committed", "peer")
    assert type(event.kind) is str and event.kind == EventKind.CHECKPOINT_COMMITTED


def test_groups() -> None:
    assert {k.value for k in DETECTORS} == {"nonfinite", "spike", "fingerprint_mismatch", "audit_mismatch"}
    # What an agent relays to the coordinator: everything but its own business (a warm standby) and
    # the trainer's internal detail (a heal's rollback, an abandoned checkpoint).
    assert set(EventKind) - FORWARDED == {
        EventKind.STANDBY,
        EventKind.HEAL_ROLLBACK,
        EventKind.CHECKPOINT_ABANDONED,
    }
    assert DETECTORS <= FORWARDED
    assert set(DETECTOR_RESTART_REASON) == DETECTORS
    assert set(DETECTOR_RESTART_REASON.values()) <= set(RestartReason)


def test_the_documented_restart_reasons_are_the_enum() -> None:
    """docs/metrics.md lists the reason label's values of stanchion_job_restarts_total."""
    line = next(
        x
        for x in (REPO / "docs/metrics.md").read_text().splitlines()
        if "`stanchion_job_restarts_total`" in x
    )
    documented = set(re.findall(r"`([a-z_]+)`", line.split("`reason`", 1)[1]))
    assert documented == {r.value for r in RestartReason}


def test_event_kinds_name_one_event_each() -> None:
    """Trainer, agent and coordinator events share the ``kind`` field of an event (and the event log)."""
    trainer, agent, coordinator = (
        {k.value for k in v} for v in (EventKind, AgentEventKind, CoordinatorEventKind)
    )
    assert not trainer & agent and not trainer & coordinator and not agent & coordinator


def test_exit_reasons() -> None:
    # Every exit is clean, a failure the coordinator acts on, or a standby's (the agent replaces it).
    assert CLEAN_EXITS | FAILED_EXITS | {ExitReason.STANDBY_LOST} == set(ExitReason)
    assert not CLEAN_EXITS & FAILED_EXITS
    # Not a subset of the restart reasons: crash and hang restart for that reason, a bad config fails.
    assert {r.value for r in ExitReason} & {r.value for r in RestartReason} == {"crash", "hang"}
    assert set(EXIT_RESTART_REASON) == FAILED_EXITS - {ExitReason.CONFIG}
    assert all(k.value == v.value for k, v in EXIT_RESTART_REASON.items())


@pytest.mark.parametrize(
    ("code", "hung", "slot", "stopping", "reason", "failed"),
    [
        (1, False, 0, False, ExitReason.CRASH, True),
        (-9, False, 0, False, ExitReason.CRASH, True),
        (-9, True, 0, False, ExitReason.HANG, True),
        (contract.EXIT_CONFIG, False, 0, False, ExitReason.CONFIG, True),
        (contract.EXIT_OK, False, 0, False, ExitReason.STOPPED, False),
        (contract.EXIT_SUPERSEDED, False, 0, False, ExitReason.SUPERSEDED, False),
        (1, False, 0, True, ExitReason.STOPPED, False),
        (1, False, None, False, ExitReason.STANDBY_LOST, False),
    ],
)
def test_the_agent_and_the_controller_agree_on_exits(
    tmp_path: Path, code: int, hung: bool, slot: int | None, stopping: bool, reason: ExitReason, failed: bool
) -> None:
    """An exit the agent classifies travels as its value in the event's JSON detail, and the controller
    turns exactly the failures into a WorkerFailed of that reason."""
    group = WorkerGroup(AgentConfig(node_id="node-a", insecure=True, run_root=str(tmp_path / "runs")))
    proc = SimpleNamespace(returncode=code, pid=4242)
    why = "stopped by a signal (process state T): no heartbeat for 0.30s" if hung else ""
    w = Worker(0, proc, WorkerPaths(tmp_path / "w00000"), 0.0, slot=slot, hung=why, stopping=stopping)  # type: ignore[arg-type]
    w.last_seen = time.time() - 30.0  # a hung rank's last sign of work: its fault's age travels along
    detail = group._classify_exit(w)
    assert detail["reason"] is reason
    event = types_pb2.Event(
        kind=AgentEventKind.WORKER_EXITED, generation=1, rank=0, detail_json=json.dumps(detail, default=str)
    )
    event = types_pb2.Event.FromString(event.SerializeToString())  # off the wire: plain strings
    assert event.kind == "worker_exited" and f'"reason": "{reason.value}"' in event.detail_json
    controller = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))
    ev = controller._machine_event("node-a", event, json.loads(event.detail_json))
    if not failed:
        assert ev is None
        return
    assert isinstance(ev, WorkerFailed) and ev.kind is reason and ev.rank == 0
    assert (ev.fault_age_s >= 30.0) is hung and why in ev.detail


@pytest.mark.parametrize(
    ("age", "seconds"), [(0.4, 0.4), (3, 3.0), ("soon", 0.0), (-1.0, 0.0), (True, 0.0), (None, 0.0)]
)
def test_a_fault_age_the_controller_cannot_read_counts_from_the_report(age: object, seconds: float) -> None:
    """An event's detail is free-form JSON: anything but a finite duration >= 0 leaves the fault at
    the time it was reported."""
    detail = {"reason": ExitReason.CRASH.value, "summary": "signal SIGKILL", "fault_age_s": age}
    event = types_pb2.Event(
        kind=AgentEventKind.WORKER_EXITED, generation=1, rank=0, detail_json=json.dumps(detail)
    )
    controller = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))
    ev = controller._machine_event("node-a", event, detail)
    assert isinstance(ev, WorkerFailed) and ev.fault_age_s == seconds


@pytest.mark.parametrize(
    ("value", "step"), [(30, 30), (0, 0), (-1, -1), ("30", -1), (2.5, -1), (True, -1), (None, -1)]
)
def test_the_step_ranks_rolled_back_to_is_read_from_a_mismatch_event_or_taken_as_none(
    value: object, step: int
) -> None:
    """Only an int >= 0 says the ranks rolled back in place; anything else leaves the rollback to
    the coordinator, as before."""
    from coordinator.machine import Detector

    detail = {"reason": "rank ? differs", "onset_window": [30, 36], "rolls_back_to": value}
    event = types_pb2.Event(
        kind=EventKind.FINGERPRINT_MISMATCH, generation=1, step=36, rank=0, detail_json=json.dumps(detail)
    )
    controller = Controller(CoordinatorConfig(insecure=True), Store(":memory:"))
    ev = controller._machine_event("node-a", event, detail)
    assert isinstance(ev, Detector) and (ev.onset_step, ev.rolls_back_to) == (30, step)
