"""How a failed checkpoint is described in its event; what an asynchronous checkpoint holds."""

import datetime
import time
import traceback
from collections.abc import Iterator

import pytest
from torch.distributed.checkpoint import CheckpointException

from stanchion.sdk.checkpoint import describe_error
from stanchion.vocab import EventKind


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A gloo process group of this process alone, destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def manager(tmp_path, events: list, **kw):
    """An asynchronous CheckpointManager of rank 0 in the default group, its events into ``events``."""
    from stanchion.sdk import checkpoint as ck

    return ck.CheckpointManager(
        tmp_path,
        rank=0,
        keep=3,
        async_save=True,
        events=lambda n, f: events.append((n, f)),
        process_group=None,
        **kw,
    )


def test_dcp_failures_are_described_one_line_per_rank_with_the_cause() -> None:
    # DCP wraps each rank's failure as (exception, traceback summary)
    tb = traceback.extract_stack()
    e = CheckpointException(
        "save failed",
        {
            1: (OSError(28, "No space left on device"), tb),
            0: (RuntimeError("unexpected pos 704 vs 598\nmore"), tb),
        },
    )
    assert describe_error(e) == (
        "rank 0: RuntimeError: unexpected pos 704 vs 598; rank 1: OSError: [Errno 28] No space left on device"
    )


def test_other_errors_are_described_by_type_and_message() -> None:
    assert describe_error(RuntimeError("rank 1 failed to write its part")) == (
        "RuntimeError: rank 1 failed to write its part"
    )


def test_a_checkpoint_in_flight_when_the_group_breaks_is_abandoned_at_once_and_never_committed(
    tmp_path, monkeypatch, one_rank_group
) -> None:
    """The wedge of a recovery: a survivor's teardown waited for its checkpoint's background work,
    which was blocked in a collective with peers that had left. Abandoning must not wait, and the
    checkpoint must never commit even if its work completes later."""
    import concurrent.futures
    import threading

    import torch

    from stanchion.sdk import checkpoint as ck
    from stanchion.sdk import manifest as mf

    stuck: concurrent.futures.Future = concurrent.futures.Future()  # DCP's upload, blocked
    monkeypatch.setattr(ck.dcp, "async_save", lambda *a, **k: stuck)
    events: list[tuple[str, dict]] = []
    mgr = manager(tmp_path, events, generation=4)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr.save(10, model, opt, {"fingerprint": "x"})
    assert (tmp_path / "checkpoints" / "step-00000010.g4.tmp").is_dir()

    result: list[int | None] = []
    t = threading.Thread(target=lambda: result.append(mgr.abandon()))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "abandon() waited for the checkpoint in flight"
    assert result == [10]
    assert ck.blocked_by_abandoned_checkpoint()

    stuck.set_result(None)  # the background work completes after all: still never committed
    deadline = time.monotonic() + 10
    while ck.blocked_by_abandoned_checkpoint():
        assert time.monotonic() < deadline, "the abandoned checkpoint thread never ended"
        time.sleep(0.01)
    assert mf.scan(tmp_path / "checkpoints") == []
    assert not any(n == EventKind.CHECKPOINT_COMMITTED for n, _ in events), events


def test_a_staged_checkpoint_holds_the_state_of_its_step_though_training_writes_the_state_after_it(
    tmp_path, one_rank_group
) -> None:
    """Staging runs on a thread while the next step computes; the next write of the state waits for
    it (settle). The committed checkpoint holds the state at its step, not the state written after,
    and what training waited in that settle counts in the checkpoint's stall."""
    import threading

    import torch
    import torch.distributed.checkpoint as dcp

    from stanchion.sdk import checkpoint as ck

    stager = ck.new_stager(torch.device("cpu"))
    # The copy starts only when the gate opens, 0.2 s after the save returned: a settle that did not
    # wait for it would let the write below reach the checkpoint.
    gate = threading.Event()
    copy = stager._stage
    stager._stage = lambda *a, **k: (gate.wait(30), copy(*a, **k))[1]
    try:
        events: list[tuple[str, dict]] = []
        mgr = manager(tmp_path, events, stager=stager)
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        at_step = {k: v.clone() for k, v in model.state_dict().items()}
        for step in (10, 20):  # the second save reuses the first one's staging buffers
            gate.clear()
            call = mgr.save(step, model, opt, {"fingerprint": str(step)})
            threading.Timer(0.2, gate.set).start()
            waited = mgr.settle()  # what the next optimizer step does first
            assert gate.is_set()  # it returned only once the copy had run
            assert mgr.last_stall_s == call + waited
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)  # the next step writes the state
            mgr.wait()
            saved = {k: torch.zeros_like(v) for k, v in at_step.items()}
            dcp.load({"model": saved}, checkpoint_id=str(tmp_path / "checkpoints" / f"step-{step:08d}"))
            for k in at_step:
                assert torch.equal(saved[k], at_step[k]), (step, k)
            at_step = {k: v.clone() for k, v in model.state_dict().items()}
        assert [f["step"] for n, f in events if n == EventKind.CHECKPOINT_COMMITTED] == [10, 20]
        assert mgr.settle() == 0.0  # nothing in flight: nothing to wait for
    finally:
        stager.close()
