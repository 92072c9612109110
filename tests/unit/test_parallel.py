"""Forming a generation's group: the rendezvous never outlives the generation that asked for it."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
import torch
import torch.distributed as dist

from stanchion.sdk.contract import Assignment
from stanchion.sdk.parallel import Abandoned, CollectiveFailed, form_group


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


def peer_arrived_then_died(gen_prefix: str) -> dist.TCPStore:
    """The agent's rendezvous store, where rank 0 arrived at the counter and then died: its gloo
    address is never published."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.PrefixStore(gen_prefix, store).add("arrived", 1)
    return store


@pytest.mark.parametrize(("superseded", "error"), [(False, CollectiveFailed), (True, Abandoned)])
def test_a_peer_that_dies_after_arriving_costs_the_formation_timeout_not_the_collective_timeout(
    superseded: bool, error: type
) -> None:
    a = assignment(0)
    store = peer_arrived_then_died(f"stanchion/{a.job_id}/gen{a.generation}/")
    a = dataclasses.replace(a, master_port=store.port)
    t0 = time.monotonic()
    with pytest.raises(error):
        form_group(a, device_kind="cpu", timeout_s=300, form_timeout_s=2, abandon=lambda: superseded)
    waited = time.monotonic() - t0
    assert waited < 60, f"left after {waited:.0f}s: the formation must not wait the 300 s collective timeout"
    assert not dist.is_initialized(), "a failed formation leaves no half-made default group behind"


PEER = r"""
import dataclasses, sys
from stanchion.sdk.contract import Assignment
from stanchion.sdk.parallel import form_group
import torch, torch.distributed as dist
port = int(sys.argv[1])
a = Assignment(generation=4, rank=1, world_size=2, local_rank=0, local_world_size=1,
               master_addr="127.0.0.1", master_port=port)
form_group(a, device_kind="cpu", timeout_s=60, form_timeout_s=20)
t = torch.ones(1)
dist.all_reduce(t)
print(int(t.item()), flush=True)
# Before the interpreter's shutdown, which otherwise may meet gloo's threads still running and abort
# ("terminate called without an active exception": 2 of 8 runs here).
dist.destroy_process_group()
"""


def test_a_process_whose_formation_failed_forms_the_next_generation_with_a_fresh_peer(tmp_path) -> None:
    """The drill's wedge: the survivor of a failed formation and a new process must agree on the
    store keys of the next generation (torch's group counter must not carry over the failure)."""
    import subprocess
    import sys

    from support import env

    a = assignment(0)
    store = peer_arrived_then_died(f"stanchion/{a.job_id}/gen{a.generation}/")
    with pytest.raises(CollectiveFailed):
        form_group(
            dataclasses.replace(a, master_port=store.port), device_kind="cpu", timeout_s=60, form_timeout_s=1
        )
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(store.port)], env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        nxt = dataclasses.replace(a, generation=4, rank=0, master_port=store.port)
        form_group(nxt, device_kind="cpu", timeout_s=60, form_timeout_s=20)
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 2.0
        out, _ = peer.communicate(timeout=60)
        assert peer.returncode == 0 and out.strip() == "2"
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
