"""The protocol's vocabularies: members are their plain string values wherever they travel (JSON,
protobuf, f-strings, sets of strings read back), and the values on the wire are pinned here."""

from __future__ import annotations

import json
import re

import pytest
from support import REPO

from protos.stanchion.v1 import agent_pb2, types_pb2
from stanchion.vocab import DETECTOR_RESTART_REASON, DETECTORS, FORWARDED, EventKind, RestartReason, Resume

WIRE = {
    EventKind: {
        "standby", "joining", "started", "restored", "healed", "heal_rollback", "nondeterministic",
        "nonfinite", "spike", "fingerprint_mismatch", "audit_mismatch", "rollback", "rollback_unavailable",
        "checkpoint_committed", "checkpoint_skipped", "checkpoint_failed", "checkpoint_abandoned",
        "collective_failed", "generation_change", "abandoned", "fault_injected", "eval", "finished", "stopped",
    },
    RestartReason: {
        "crash", "hang", "node_lost", "nonfinite", "spike", "fingerprint", "audit", "health", "manual",
        "drain", "collective_failed", "reconcile", "bisection", "first_step_timeout",
    },
    Resume: {"fresh", "checkpoint", "peer"},
}  # fmt: skip


@pytest.mark.parametrize("vocab", list(WIRE), ids=lambda v: v.__name__)
def test_the_values_on_the_wire_are_unchanged(vocab) -> None:
    assert {m.value for m in vocab} == WIRE[vocab]
    for m in vocab:
        assert m.name.lower() == m.value  # the name says the value


@pytest.mark.parametrize("member", [EventKind.FINGERPRINT_MISMATCH, RestartReason.NODE_LOST, Resume.PEER])
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
