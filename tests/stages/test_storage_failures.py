"""A full disk and a read-only file system, on a real (tmpfs) mount: one-line errors, and the
cache stays resumable. Skipped where this process may not mount (needs root, as in CI)."""

from __future__ import annotations

import subprocess
import uuid

import numpy as np
import pytest
import zarr

from tests.conftest import invoke, invoke_json

DATASET = "synthetic:n=20000,test=100,features=8,classes=16,seed=1"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; yields (mount point, remount function)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def teacher(tmp_path):
    run = invoke_json("train-teacher", "--model", "mlp-64", "--dataset", DATASET, "--epochs", "1",
                      "--augment", "none", "--out", tmp_path / "t.safetensors")
    return run["weights"]


def _cache_args(teacher, out):
    return ["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher, "--dataset", DATASET,
            "--out", out, "--dtype", "float32", "--chunk-rows", "1000"]


def test_full_disk_is_one_line_and_the_cache_resumes(small_disk, teacher, tmp_path):
    mount, remount = small_disk
    reference = invoke_json(*_cache_args(teacher, tmp_path / "reference.zarr"))
    code, _, err = invoke(*_cache_args(teacher, mount / "c.zarr"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    done = zarr.open_group(str(mount / "c.zarr"), mode="r")["chunk_done"][:]
    assert 0 < done.sum() < len(done)

    remount("size=16m")
    resumed = invoke_json(*_cache_args(teacher, mount / "c.zarr"))
    assert resumed["chunks_computed"] == len(done) - done.sum()
    a, b = zarr.open_group(str(mount / "c.zarr"), mode="r"), zarr.open_group(reference["cache"], mode="r")
    np.testing.assert_array_equal(a["logits"][:], b["logits"][:])
    assert a.attrs["complete"] and a.attrs["teacher_metrics"] == b.attrs["teacher_metrics"]


def test_read_only_file_system(small_disk, teacher):
    mount, remount = small_disk
    remount("size=16m")
    cache = invoke_json(*_cache_args(teacher, mount / "c.zarr"))["cache"]
    remount("ro")
    # reading a complete cache needs no write access
    run = invoke_json("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--out", mount.parent / "run")
    assert run["test_samples"] == 100
    code, _, err = invoke(*_cache_args(teacher, mount / "c.zarr"), "--overwrite")
    assert code == 1 and err.strip().splitlines() == [f"error: cannot lock cache {mount / 'c.zarr'} for writing: Read-only file system"]
    code, _, err = invoke("train-student", "--cache", cache, "--student", "mlp-64", "--out", mount / "run")
    assert code == 1 and err.strip().splitlines() == [f"error: cannot lock run folder {mount / 'run'} for writing: Read-only file system"]
    assert zarr.open_group(cache, mode="r").attrs["complete"]


def test_a_run_folder_on_a_full_disk_is_one_line_and_keeps_its_last_checkpoint(small_disk):
    """The checkpoint of an mlp-400 (about 2 MB with Adam's state) does not fit in 256 KiB. torch.save
    into a full disk used to report only "unexpected pos"; the checkpoint is now written whole or not
    at all, and the error says what happened."""
    mount, _ = small_disk
    code, _, err = invoke("train-student", "--student", "mlp-400", "--dataset", DATASET, "--epochs", "2",
                          "--out", mount / "run")
    assert code == 1 and err.strip().splitlines() == [
        f"error: cannot write {mount / 'run' / 'checkpoint.pt'}: No space left on device"], err
    assert not (mount / "run" / "checkpoint.pt.partial").exists() and not (mount / "run" / "checkpoint.pt").exists()
    assert (mount / "run" / "config.json").is_file()
