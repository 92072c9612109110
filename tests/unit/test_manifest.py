"""Checkpoint manifests: the commit marker, verification with a reason for every failure, the newest
good checkpoint, and retention that never deletes what a resume needs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stanchion.sdk import manifest
from stanchion.sdk.manifest import (
    BAD_MARKER,
    MANIFEST,
    apply_retention,
    mark_bad,
    newest_good,
    scan,
    step_dir_name,
    verify,
    write_manifest,
)


def make_ckpt(root: Path, step: int, *, committed: bool = True, **fields) -> Path:
    d = root / step_dir_name(step)
    (d / "shard").mkdir(parents=True)
    (d / "model.bin").write_bytes(bytes(range(256)) * 4 + step.to_bytes(4, "little"))
    (d / "shard" / "optim.bin").write_bytes(b"optimizer state %d" % step)
    if committed:
        write_manifest(d, {"step": step, **fields})
    return d


def test_a_written_manifest_verifies(tmp_path):
    d = make_ckpt(tmp_path, 40, replicas_agree=True)
    m = json.loads((d / MANIFEST).read_text())
    assert m["step"] == 40 and m["format"] == manifest.FORMAT
    assert sorted(m["files"]) == ["model.bin", "shard/optim.bin"]
    assert m["files"]["model.bin"]["bytes"] == 1028
    v = verify(d)
    assert (v.ok, v.reason) == (True, "committed and verified")
    assert v.manifest == m
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST, "model.bin", "shard"]  # no temporary left


def test_the_manifest_keeps_its_bytes_and_its_commit_is_durable(tmp_path, monkeypatch):
    """The shared atomic writer writes what the manifest always was (indent 1, sorted keys), so
    checkpoints committed before still verify; the directory is fsynced once the manifest is in it."""
    import stanchion.files as files

    synced: list[tuple[Path, bool]] = []
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append((Path(p), (Path(p) / MANIFEST).exists())))
    d = make_ckpt(tmp_path, 40, replicas_agree=True)
    written = json.loads((d / MANIFEST).read_text())
    assert (d / MANIFEST).read_text() == json.dumps(written, indent=1, sort_keys=True)
    assert synced == [(d, True)]
    mark_bad(d, "loss spike")
    assert [p for p, _ in synced] == [d, d]  # the verdict is as durable as the commit
    assert verify(d, allow_marked_bad=True).ok


def test_a_marker_present_at_write_time_is_not_listed(tmp_path):
    d = make_ckpt(tmp_path, 1, committed=False)
    (d / BAD_MARKER).write_text("{}")
    assert "BAD.json" not in write_manifest(d, {"step": 1})["files"]


def test_truncation_is_reported(tmp_path):
    d = make_ckpt(tmp_path, 10)
    data = (d / "model.bin").read_bytes()
    (d / "model.bin").write_bytes(data[:-1])
    v = verify(d)
    assert not v.ok
    assert v.reason == "model.bin has 1027 bytes, the manifest says 1028 (truncated?)"


def test_a_flipped_bit_is_reported(tmp_path, seed):
    d = make_ckpt(tmp_path, 10)
    rng = random.Random(seed)
    data = bytearray((d / "shard" / "optim.bin").read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (d / "shard" / "optim.bin").write_bytes(bytes(data))
    v = verify(d)
    assert (v.ok, v.reason) == (False, "shard/optim.bin fails its CRC-32 check (bit rot or a partial write)")


def test_a_missing_file_is_reported(tmp_path):
    d = make_ckpt(tmp_path, 10)
    (d / "shard" / "optim.bin").unlink()
    assert verify(d).reason == "shard/optim.bin is missing"
    assert not verify(d).ok


def test_a_missing_manifest_is_not_committed(tmp_path):
    d = make_ckpt(tmp_path, 10, committed=False)
    v = verify(d)
    assert (v.ok, v.manifest) == (False, None)
    assert v.reason == "not committed: manifest.json is missing (the save did not finish)"
    assert verify(tmp_path / "nowhere").reason.endswith("nowhere is not a directory")


@pytest.mark.parametrize("content", [b'{"files": {"model.bin": ', b"", b"\xff\xfe{}"])
def test_a_corrupt_manifest_is_reported(tmp_path, content):
    d = make_ckpt(tmp_path, 10)
    (d / MANIFEST).write_bytes(content)
    v = verify(d)
    assert not v.ok
    assert v.reason.startswith("manifest.json is corrupt: ")


def test_a_manifest_listing_no_files_is_not_ok(tmp_path):
    d = tmp_path / step_dir_name(1)
    d.mkdir()
    write_manifest(d, {"step": 1})
    assert (verify(d).ok, verify(d).reason) == (False, "manifest.json lists no files")


def test_a_manifest_that_is_not_an_object_is_not_ok(tmp_path):
    d = make_ckpt(tmp_path, 10)
    (d / MANIFEST).write_text("[1, 2]")
    assert not verify(d).ok


def test_a_checkpoint_marked_bad_is_not_ok_unless_allowed(tmp_path):
    d = make_ckpt(tmp_path, 10)
    mark_bad(d, "fingerprint mismatch at step 12")
    v = verify(d)
    assert (v.ok, v.reason) == (False, "marked bad: fingerprint mismatch at step 12")
    assert verify(d, allow_marked_bad=True).ok
    (d / BAD_MARKER).write_text("not json")
    assert (verify(d).ok, verify(d).reason) == (False, "marked bad")


def test_disagreeing_replicas_make_a_checkpoint_not_ok(tmp_path):
    d = make_ckpt(tmp_path, 10, replicas_agree=False)
    v = verify(d)
    assert (v.ok, v.reason) == (False, "replica fingerprints disagreed when it was saved")


def test_scan_lists_step_directories_oldest_first_and_ignores_the_rest(tmp_path):
    make_ckpt(tmp_path, 30)
    make_ckpt(tmp_path, 5, committed=False)
    bad = make_ckpt(tmp_path, 20)
    mark_bad(bad, "x")
    (tmp_path / "step-00000040.tmp").mkdir()
    (tmp_path / "step-abc").mkdir()
    (tmp_path / "latest").mkdir()
    (tmp_path / "step-00000050").write_text("a file, not a directory")
    entries = scan(tmp_path)
    assert [(e.step, e.committed, e.marked_bad) for e in entries] == [
        (5, False, False),
        (20, True, True),
        (30, True, False),
    ]
    assert entries[0].path == tmp_path / "step-00000005"
    assert scan(tmp_path / "missing") == []


def test_newest_good_skips_newer_bad_ones_and_says_why(tmp_path):
    make_ckpt(tmp_path, 10)
    good = make_ckpt(tmp_path, 20)
    marked = make_ckpt(tmp_path, 30)
    mark_bad(marked, "spike")
    corrupt = make_ckpt(tmp_path, 40)
    (corrupt / "model.bin").write_bytes(b"")
    unfinished = make_ckpt(tmp_path, 50, committed=False)
    path, skipped = newest_good(tmp_path)
    assert path == good
    assert skipped == [
        (unfinished, "not committed: manifest.json is missing (the save did not finish)"),
        (corrupt, "model.bin has 0 bytes, the manifest says 1028 (truncated?)"),
        (marked, "marked bad: spike"),
    ]
    assert newest_good(tmp_path, max_step=15) == (tmp_path / step_dir_name(10), [])
    assert newest_good(tmp_path / "none") == (None, [])


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_retention_keeps_the_newest_committed(tmp_path):
    for step in (10, 20, 30, 40):
        make_ckpt(tmp_path, step)
    removed = apply_retention(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-00000010", "step-00000020"]
    assert names(tmp_path) == ["step-00000030", "step-00000040"]
    assert apply_retention(tmp_path, keep=2) == []


def test_retention_never_deletes_the_newest_good_one(tmp_path):
    make_ckpt(tmp_path, 10)
    make_ckpt(tmp_path, 20)
    for step in (30, 40):  # committed, but their files rotted
        (make_ckpt(tmp_path, step) / "model.bin").write_bytes(b"rot")
    apply_retention(tmp_path, keep=1)
    assert names(tmp_path) == ["step-00000020", "step-00000040"]  # 30: neither kept nor the resume point
    assert newest_good(tmp_path)[0] == tmp_path / "step-00000020"


def test_retention_never_deletes_the_newest_good_one_when_newer_are_marked_bad(tmp_path):
    for step in (10, 20, 30, 40, 50):
        d = make_ckpt(tmp_path, step)
        if step >= 40:
            mark_bad(d, "after the spike")
    apply_retention(tmp_path, keep=1)
    # 30 is the resume point; 50 is the newest committed and is never touched; 40 (bad) goes.
    assert names(tmp_path) == ["step-00000030", "step-00000050"]


def test_retention_never_touches_anything_newer_than_the_newest_committed(tmp_path):
    for step in (10, 20):
        make_ckpt(tmp_path, step)
    make_ckpt(tmp_path, 15, committed=False)  # a failed save, older than the newest commit
    make_ckpt(tmp_path, 30, committed=False)  # being written right now
    (tmp_path / "step-00000040.tmp").mkdir()  # being written right now
    (tmp_path / "step-00000005.tmp").mkdir()  # stale: older than the newest commit
    removed = apply_retention(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["step-00000005.tmp", "step-00000010", "step-00000015"]
    assert names(tmp_path) == ["step-00000020", "step-00000030", "step-00000040.tmp"]


def test_retention_with_nothing_committed_deletes_nothing(tmp_path):
    make_ckpt(tmp_path, 10, committed=False)
    (tmp_path / "step-00000005.tmp").mkdir()
    assert apply_retention(tmp_path, keep=1) == []
    assert names(tmp_path) == ["step-00000005.tmp", "step-00000010"]


def test_a_directory_that_is_not_a_checkpoint_says_so(tmp_path):
    v = verify(tmp_path)  # say, a run directory given by mistake
    assert not v.ok and "is not a checkpoint directory" in v.reason and "step-NNNNNNNN" in v.reason
