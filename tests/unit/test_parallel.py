"""Forming a generation's group: the rendezvous never outlives the generation that asked for it."""

from __future__ import annotations

import socket
import time

import pytest

from trainer.contract import Assignment
from trainer.parallel import Abandoned, CollectiveFailed, form_group


def dead_address() -> tuple[str, int]:
    """A loopback port nothing listens on (bound, then closed: an agent that restarted elsewhere)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", s.getsockname()[1]


def assignment(port: int) -> Assignment:
    return Assignment(
        generation=3,
        rank=1,
        world_size=2,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=port,
    )


def test_a_rank_whose_rendezvous_store_is_gone_leaves_as_soon_as_a_newer_generation_exists() -> None:
    _, port = dead_address()
    calls = []

    def superseded() -> bool:
        calls.append(time.monotonic())
        return True  # the agent already wrote a newer assignment

    t0 = time.monotonic()
    with pytest.raises(Abandoned, match="generation 3 superseded while its rendezvous store"):
        form_group(assignment(port), device_kind="cpu", timeout_s=300, abandon=superseded)
    # one short connection attempt, not the 300 s timeout
    assert calls and time.monotonic() - t0 < 60


def test_an_unreachable_rendezvous_store_fails_within_the_timeout() -> None:
    _, port = dead_address()
    t0 = time.monotonic()
    with pytest.raises(CollectiveFailed, match="unreachable for 3s"):
        form_group(assignment(port), device_kind="cpu", timeout_s=3, abandon=lambda: False)
    assert time.monotonic() - t0 < 60
