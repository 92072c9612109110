"""The kernel's file rules: atomic JSON replacement, and JSON lines whose torn last line is never a record."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.files import JsonlTail, JsonlWriter, iter_jsonl, read_json, write_json_atomic


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


def test_every_reader_applies_one_rule_to_a_torn_last_line_and_a_damaged_record(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n{"a": 2}\n\n{"a": 3')  # damaged line 2, torn last line
    assert list(iter_jsonl(path)) == [{"a": 1}, {"a": 2}]
    tail = JsonlTail(path)
    assert tail.read() == [{"a": 1}, {"a": 2}]
    with path.open("ab") as f:
        f.write(b"}\n")  # the writer completes the torn line
    assert tail.read() == [{"a": 3}]
    assert list(iter_jsonl(path)) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert list(iter_jsonl(tmp_path / "missing.jsonl")) == []


def test_write_json_atomic_indents_on_request_and_fsyncs_the_directory_only_when_durable(
    tmp_path, monkeypatch
):
    import stanchion.files as files

    synced: list[Path] = []
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append(Path(p)))
    path = tmp_path / "m.json"
    write_json_atomic(path, {"b": 1, "a": [2]}, indent=1)
    assert path.read_text() == json.dumps({"b": 1, "a": [2]}, indent=1, sort_keys=True)
    assert synced == []  # the default: a rename visible to other processes, not a durable one
    write_json_atomic(path, {"c": 3}, durable=True)
    assert read_json(path) == {"c": 3}
    assert synced == [tmp_path]
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_tail_starts_over_when_the_file_was_rewritten_shorter(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')
    tail = JsonlTail(path)
    assert tail.read() == [{"step": 1}, {"step": 2}]
    path.write_bytes(b'{"step": 7}\n')  # replaced by a shorter file
    assert tail.read() == [{"step": 7}]  # neither stuck past the end nor glued to the old torn line


def test_tails_read_new_records_of_every_matching_file_in_time_order(tmp_path):
    from stanchion.files import JsonlTails

    tails = JsonlTails(tmp_path, "ranks/*/progress.jsonl")
    assert tails.read() == []
    a, b = JsonlWriter(tmp_path / "ranks/0/progress.jsonl"), JsonlWriter(tmp_path / "ranks/1/progress.jsonl")
    a.write({"step": 1, "t": 3.0})
    b.write({"step": 1, "t": 2.0})
    assert tails.read() == [{"step": 1, "t": 2.0}, {"step": 1, "t": 3.0}]
    assert tails.read() == []  # only what is new
    c = JsonlWriter(tmp_path / "ranks/2/progress.jsonl")  # a rank that starts later
    c.write({"step": 2, "t": 5.0})
    a.write({"step": 2, "t": 4.0})
    JsonlWriter(tmp_path / "ranks/2/events.jsonl").write({"t": 1.0})  # not matched
    assert tails.read() == [{"step": 2, "t": 4.0}, {"step": 2, "t": 5.0}]
