"""The trainer contract's files: assignments and requests survive JSON, atomic writes are never seen
half-written, a tail returns only complete lines, and the control directory is read newest-first."""

from __future__ import annotations

import json

from stanchion.files import write_json_atomic
from stanchion.sdk.contract import Assignment, Request, WorkerPaths
from stanchion.vocab import Resume


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
        resume=Resume.PEER,
        checkpoint="/runs/x/step-00000040",
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
    assert wire["resume"] == "peer" and type(wire["resume"]) is str
    assert Assignment.from_json(wire) == a
    assert Assignment.from_json(wire).resume is Resume.PEER
    assert Assignment.from_json(json.loads(json.dumps(assignment(0).to_json()))) == assignment(0)


def test_request_round_trips_through_json():
    r = Request(id=3, kind="rollback", to_step=20, skip=((18, 2),), reason="spike at 21")
    wire = json.loads(json.dumps(r.to_json()))
    assert wire["skip"] == [[18, 2]]
    assert Request.from_json(wire) == r
    assert Request.from_json({"id": 1, "kind": "rollback"}) == Request(id=1, kind="rollback")


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
