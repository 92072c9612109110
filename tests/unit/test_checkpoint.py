"""How a failed checkpoint is described in its event."""

import traceback

from torch.distributed.checkpoint import CheckpointException

from trainer.checkpoint import describe_error


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
