"""Waiting on a collective inside the failure boundary: bounded, given up when the generation is
over, and a backend's error surfaces as CollectiveFailed (stanchion/sdk/parallel.py ``wait``)."""

from __future__ import annotations

import pytest

from stanchion.sdk import liveness, parallel
from stanchion.sdk.parallel import CollectiveFailed


class FakeWork:
    """An asynchronous collective that completes after ``slices`` timed waits (never if None),
    with ``error`` if given, the way gloo's work behaves."""

    def __init__(self, slices: int | None, error: Exception | None = None):
        self.slices, self.error, self.waited = slices, error, 0

    def is_completed(self) -> bool:
        return self.slices is not None and self.waited >= self.slices

    def wait(self, timeout=None) -> bool:
        if not self.is_completed():
            if timeout is None:
                raise AssertionError("an unbounded wait on a collective that has not completed")
            self.waited += 1
            if not self.is_completed():
                raise RuntimeError("Operation timed out!")
        if self.error is not None:
            raise self.error
        return True


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch) -> parallel.WaitPolicy:
    p = parallel.WaitPolicy(timeout_s=60.0, grace_s=0.0)
    monkeypatch.setattr(parallel, "wait_policy", p)
    monkeypatch.setattr(parallel, "WAIT_SLICE_S", 0.001)
    return p


def test_a_collective_that_completes_is_waited_for_in_slices(policy):
    work = FakeWork(slices=3)
    parallel.wait(work, "gradient all-reduce")
    assert work.waited == 3 and not liveness.current_collective


def test_a_collective_is_given_up_when_the_generation_is_superseded(policy):
    work = FakeWork(slices=None)
    policy.abandon = lambda: "generation 4 was superseded" if work.waited >= 2 else None
    with pytest.raises(CollectiveFailed, match=r"gradient all-reduce: given up: generation 4 was superseded"):
        parallel.wait(work, "gradient all-reduce")
    assert work.waited == 2 and not liveness.current_collective  # the boundary was left


def test_a_collective_is_not_given_up_within_its_grace(policy):
    policy.grace_s = 3600.0  # a planned change is agreed at a step boundary: no wait is cut short
    work = FakeWork(slices=5)
    policy.abandon = lambda: "generation 4 was superseded"
    parallel.wait(work, "gradient all-reduce")
    assert work.waited == 5


def test_a_collective_that_never_completes_fails_at_the_jobs_timeout(policy):
    policy.timeout_s = 0.02
    with pytest.raises(CollectiveFailed, match=r"step control all-gather: not complete after 0.02 s"):
        parallel.wait(FakeWork(slices=None), "step control all-gather")


def test_a_backend_error_surfaces_as_collective_failed(policy):
    work = FakeWork(slices=1, error=RuntimeError("Connection closed by peer [127.0.0.1]:5"))
    with pytest.raises(CollectiveFailed, match=r"fingerprint all-gather: Connection closed by peer"):
        parallel.wait(work, "fingerprint all-gather")


def test_nccl_is_told_not_to_tear_a_survivor_down_unless_the_environment_says_otherwise():
    env: dict[str, str] = {}
    parallel.prepare_environment(env)
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    parallel.prepare_environment(env)
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}


def test_a_backend_failure_outside_any_collective_block_is_told_from_a_program_error():
    """FSDP's own collectives fail inside the user's forward and backward passes."""
    import torch.distributed as dist

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    )
    assert parallel.is_backend_failure(gloo)
    assert parallel.is_backend_failure(dist.DistBackendError("NCCL error: remote process exited"))
    assert not parallel.is_backend_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not parallel.is_backend_failure(ValueError("gloo/ in a message of another kind"))
