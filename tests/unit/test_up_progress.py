"""`stanchion up` follows the job's progress through the kernel's JSON-lines tail: records of other
jobs ignored, rank 0's newest kept, the newest generation of any rank, a torn last line held back
until its writer completes it."""

from __future__ import annotations

import json
from pathlib import Path

from diagnostics.up import _ProgressTail


def append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)


def line(**r: object) -> bytes:
    return json.dumps(r).encode() + b"\n"


def test_progress_tail_follows_rank_0_and_the_newest_generation(tmp_path: Path) -> None:
    tail = _ProgressTail(tmp_path)
    assert tail.poll("job-1") is None  # no worker has written yet
    rank0 = tmp_path / "workers" / "n1" / "w00000" / "progress.jsonl"
    rank1 = tmp_path / "workers" / "n2" / "w00000" / "progress.jsonl"
    append(
        rank0,
        line(job_id="job-1", rank=0, step=1, generation=0, t=1.0)
        + line(job_id="job-0", rank=0, step=9, t=2.0),
    )
    append(rank1, line(job_id="job-1", rank=1, step=1, generation=0, t=1.0))
    assert tail.poll("job-1") == {"job_id": "job-1", "rank": 0, "step": 1, "generation": 0, "t": 1.0}
    append(
        rank1, line(job_id="job-1", rank=1, step=2, generation=1, t=3.0)
    )  # only rank 1 saw generation 1 yet
    torn = line(job_id="job-1", rank=0, step=2, generation=1, t=3.0)
    append(rank0, torn[:20])  # rank 0 is mid-write
    assert tail.poll("job-1")["step"] == 1  # type: ignore[index]
    assert tail.generation == 1
    append(rank0, torn[20:])
    assert tail.poll("job-1") == {"job_id": "job-1", "rank": 0, "step": 2, "generation": 1, "t": 3.0}
    assert tail.poll("job-1")["step"] == 2  # type: ignore[index]  # nothing new: each record is read once
