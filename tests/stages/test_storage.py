"""The writer lock and the files the tool writes: a lock deleted under a live writer stops it, and
no file is ever written through a symbolic link someone planted."""

from __future__ import annotations

import json

import pytest

from stages.errors import CacheLockedError
from stages.storage import FileLock
from tests.conftest import DATASET, invoke, invoke_json
from tests.stages.test_crash_safety import _cache_args, _pipeline, _same_cache, _wait_for, slow_teacher  # noqa: F401 - a fixture


def test_a_lock_file_deleted_or_replaced_under_its_holder_is_noticed(tmp_path):
    out = tmp_path / "c.zarr"
    lock_file = tmp_path / "c.zarr.lock"
    with FileLock(out) as lock:
        lock.check_held()
        lock_file.unlink()
        with pytest.raises(CacheLockedError, match="deleted or replaced"):
            lock.check_held()
        lock_file.write_text("another writer's")  # a new file at the path: still not ours
        with pytest.raises(CacheLockedError, match="deleted or replaced"):
            lock.check_held()
    assert lock_file.read_text() == "another writer's"  # letting go never removes another's lock


def test_a_deleted_lock_stops_the_first_writer_and_the_second_one_wins(slow_teacher):  # noqa: F811 - the fixture imported above
    """Deleting NAME.zarr.lock while cache-teacher runs, then starting another with --overwrite:
    the first stops (exit 5, one line) instead of both reporting a complete cache."""
    spec, _, tmp = slow_teacher
    invoke_json(*_cache_args(spec, tmp / "reference.zarr"))
    cache = tmp / "c.zarr"
    with _pipeline(*_cache_args(spec, cache)) as first:
        _wait_for(lambda: any(cache.glob("chunk_done/c/*")), first)
        cache.with_name("c.zarr.lock").unlink()
        with _pipeline(*_cache_args(spec, cache), "--overwrite") as second:
            _, first_err = first.communicate(timeout=1800)  # bounds against a hang only
            _, second_err = second.communicate(timeout=1800)
    errors = [line for line in first_err.splitlines() if line.startswith("error:")]  # the others are log lines
    assert first.returncode == 5 and len(errors) == 1 and "was deleted or replaced while this process was writing" in errors[0], first_err
    assert second.returncode == 0, second_err
    _same_cache(cache, tmp / "reference.zarr")
    assert invoke_json("verify", cache)["ok"]


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path, teacher_weights):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "c.zarr.lock").symlink_to(victim)
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--out", tmp_path / "c.zarr")
    assert code == 2 and err.strip().splitlines() == [
        f"error: refusing to write {tmp_path / 'c.zarr.lock'}: it is a symbolic link (remove it; this tool never writes through one)"]
    assert victim.read_text() == "precious" and (tmp_path / "c.zarr.lock").is_symlink()
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize(("planted", "checkpoint", "target_exists"), [
    ("metrics.jsonl", True, True), ("model.safetensors.partial", True, True), ("checkpoint.pt.partial", False, True),
])
def test_run_folder_files_are_never_written_through_a_symlink(tmp_path, planted, checkpoint, target_exists):
    """A resumed run writes each of these; a planted symlink is refused and its target neither
    changed nor created."""
    run = tmp_path / "run"
    args = ["train-student", "--dataset", DATASET, "--student", "mlp-64", "--alpha", "0", "--epochs", "1", "--out", run]
    invoke_json(*args)
    (run / "summary.json").unlink()
    if not checkpoint:
        (run / "checkpoint.pt").unlink()
    victim = tmp_path / "victim.txt"
    if target_exists:
        victim.write_text("precious")
    (run / planted).unlink(missing_ok=True)
    (run / planted).symlink_to(victim)
    code, _, err = invoke(*args, "--resume")
    assert code == 2 and err.strip().splitlines() == [
        f"error: refusing to write {run / planted}: it is a symbolic link (remove it; this tool never writes through one)"], err
    assert victim.read_text() == "precious" if target_exists else not victim.exists()


def test_a_file_written_whole_replaces_a_planted_symlink_and_leaves_its_target(tmp_path):
    """summary.json (like config.json, checkpoint.pt and the weights) is written to a .partial file
    and renamed over its name: a symlink planted there is replaced, its target neither changed nor
    created. (An existing summary would mean a finished run: the link dangles instead.)"""
    run = tmp_path / "run"
    args = ["train-student", "--dataset", DATASET, "--student", "mlp-64", "--alpha", "0", "--epochs", "1", "--out", run]
    invoke_json(*args)
    (run / "summary.json").unlink()
    victim = tmp_path / "victim.txt"
    (run / "summary.json").symlink_to(victim)
    invoke_json(*args, "--resume")
    assert not (run / "summary.json").is_symlink() and json.loads((run / "summary.json").read_text())["test_errors"] >= 0
    assert not victim.exists()


def test_inspect_never_writes_its_png_through_a_symlink(cache_path, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "plot.png").symlink_to(victim)
    code, _, err = invoke("inspect", cache_path, "--png", tmp_path / "plot.png")
    assert code == 2 and "refusing to write" in err and "symbolic link" in err
    assert victim.read_text() == "precious"


def test_a_writer_whose_lock_was_replaced_does_not_mark_the_cache_complete(tmp_path):
    """The last chunk written, then the lock file replaced: the cache stays incomplete."""
    import numpy as np
    import zarr

    from stages.cache import CacheWriter, Layout

    out = tmp_path / "c.zarr"
    with FileLock(out) as lock:
        writer = CacheWriter.create(out, Layout(kind="dense", num_samples=64, num_classes=3, chunk_rows=32),
                                    {"temperature": 1.0, "teachers": [], "dataset": {}}, lock=lock)
        writer.write_rows(0, {"logits": np.zeros((64, 3), np.float16), "index": np.arange(64), "labels": np.arange(64) % 3})
        writer.close()
        (tmp_path / "c.zarr.lock").unlink()
        (tmp_path / "c.zarr.lock").write_text("another writer's")
        with pytest.raises(CacheLockedError, match="deleted or replaced"):
            writer.mark_complete({})
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
