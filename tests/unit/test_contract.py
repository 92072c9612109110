"""The trainer contract's files: assignments and requests survive JSON, atomic writes are never seen
half-written, a tail returns only complete lines, and the control directory is read newest-first."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.contract import (
    Assignment,
    JsonlTail,
    JsonlWriter,
    Request,
    WorkerPaths,
    read_json,
    write_json_atomic,
)


def assignment(generation: int, **changes) -> Assignment:
    fields = dict(
        generation=generation,
        rank=1,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="127.0.0.1",
        master_port=29500,
    )
    fields.update(changes)
    return Assignment(**fields)


def test_assignment_round_trips_through_json():
    a = assignment(
        7,
        resume="peer",
        checkpoint="/runs/x/step-00000040",
        source_rank=2,
        skip_windows=((10, 2), (30, 5)),
        rollback_to=40,
        node_id="node-b",
        job_id="job-1",
        run_dir="/runs/x",
        config="/runs/x/config.json",
        faults="/runs/x/faults.json",
        stop=True,
    )
    wire = json.loads(json.dumps(a.to_json()))
    assert wire["skip_windows"] == [[10, 2], [30, 5]]
    assert Assignment.from_json(wire) == a
    assert Assignment.from_json(json.loads(json.dumps(assignment(0).to_json()))) == assignment(0)


def test_request_round_trips_through_json():
    r = Request(id=3, kind="rollback", to_step=20, skip=((18, 2),), reason="spike at 21")
    wire = json.loads(json.dumps(r.to_json()))
    assert wire["skip"] == [[18, 2]]
    assert Request.from_json(wire) == r
    assert Request.from_json({"id": 1, "kind": "rollback"}) == Request(id=1, kind="rollback")


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})
    assert read_json(path) == {"b": [1, 2]}
    assert sorted(os.listdir(path.parent)) == ["x.json"]


def test_a_reader_never_sees_a_torn_file(tmp_path):
    """One thread rewrites a file of varying size while another reads and parses it."""
    path = tmp_path / "assign.json"
    write_json_atomic(path, {"i": 0, "pad": ""})
    writes = 40
    done = threading.Event()
    reads, problems = [0], []

    def reader() -> None:
        while not done.is_set():
            try:
                data = read_json(path)
            except Exception as e:  # a torn file shows up as a JSON error
                problems.append(repr(e))
                return
            reads[0] += 1
            if data["pad"] != "x" * (7919 * (data["i"] % 7)):
                problems.append(f"record {data['i']} has the wrong padding")
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(writes):
            write_json_atomic(path, {"i": i, "pad": "x" * (7919 * (i % 7))})
    finally:
        done.set()
        t.join()
    assert problems == []
    assert reads[0] > 0
    assert read_json(path)["i"] == writes - 1
    assert sorted(os.listdir(tmp_path)) == ["assign.json"]


def test_tail_returns_only_complete_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # no file yet
    with path.open("ab") as f:
        f.write(b'{"step": 1}\n{"step": 2, "lo')
    assert tail.read() == [{"step": 1}]
    assert tail.read() == []  # the half line is held back
    with path.open("ab") as f:
        f.write(b'ss": 0.5}\n')
    assert tail.read() == [{"step": 2, "loss": 0.5}]
    with path.open("ab") as f:
        f.write(b"not json\n\n" + b'{"step": 3}\n')
    assert tail.read() == [{"step": 3}]  # a corrupt complete line is skipped, blank lines ignored


@settings(max_examples=25, deadline=None)
@given(
    records=st.lists(
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=3),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_tail_reassembles_records_written_in_arbitrary_pieces(records, cuts):
    stream = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.jsonl"
        path.touch()
        tail = JsonlTail(path)
        seen = []
        for a, b in zip(points, points[1:], strict=False):
            with path.open("ab") as f:
                f.write(stream[a:b])
            seen.extend(tail.read())
        assert seen == records


def test_writer_appends_one_line_per_record_with_a_time(tmp_path):
    w = JsonlWriter(tmp_path / "events.jsonl")
    tail = JsonlTail(tmp_path / "events.jsonl")
    w.write({"event": "started", "t": 1.0})
    w.write({"event": "spike", "value": float("nan")})
    w.close()
    first, second = tail.read()
    assert first == {"event": "started", "t": 1.0}
    assert second["event"] == "spike" and second["value"] != second["value"]  # NaN survives
    assert isinstance(second["t"], float)


def test_latest_assignment_picks_the_newest_generation_above_the_floor(tmp_path):
    paths = WorkerPaths(tmp_path / "w")
    assert paths.latest_assignment() is None  # no control directory yet
    for g in (1, 3, 2):
        write_json_atomic(paths.assignment_path(g), assignment(g, rank=g).to_json())
    (paths.control / "assign-later.json").write_text("{}")  # not a generation: ignored
    assert paths.assignment_path(3).name == "assign-00000003.json"
    assert paths.latest_assignment() == assignment(3, rank=3)
    assert paths.latest_assignment(2) == assignment(3, rank=3)
    assert paths.latest_assignment(3) is None
    assert paths.wait_for_assignment(1) == assignment(3, rank=3)
    assert paths.wait_for_assignment(3, give_up=lambda: True) is None


def test_requests_are_sorted_and_filtered_by_id(tmp_path):
    paths = WorkerPaths(tmp_path / "w")
    assert paths.requests() == []
    for rid in (5, 2, 9):
        write_json_atomic(paths.request_path(rid), Request(id=rid, kind="rollback", to_step=rid).to_json())
    (paths.control / "request-x.json").write_text("{}")
    assert [r.id for r in paths.requests()] == [2, 5, 9]
    assert paths.requests()[0] == Request(id=2, kind="rollback", to_step=2)
    assert [r.id for r in paths.requests(2)] == [5, 9]
    assert paths.requests(9) == []
