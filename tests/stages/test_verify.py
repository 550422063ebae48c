"""`verify` passes a sound cache and names what is wrong with a damaged one."""

from __future__ import annotations

import json
import shutil

import zarr

from pipeline.models import resolve_model
from stages.verify import verify
from stages.weights import save_weights
from tests.conftest import invoke, invoke_json


def _damaged_copy(cache_path, tmp_path, name="broken.zarr"):
    broken = tmp_path / name
    shutil.copytree(cache_path, broken)
    return broken


def test_a_sound_cache_passes_every_check(cache_path, teacher_weights):
    report = invoke_json("verify", cache_path, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--samples", "40")
    assert report["ok"] is True
    assert [c["check"] for c in report["checks"]] == ["metadata", "schema", "arrays", "complete", "chunks", "index", "labels", "teacher"]
    assert 0 <= report["max_abs_diff"] < 5e-3  # float16 rounding of logits/T


def test_damaged_chunks_are_each_named(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    (broken / "logits" / "c" / "2" / "0").write_bytes(b"\x00garbage")
    (broken / "logits" / "c" / "5" / "0").unlink()  # reads back as NaN: a gap never passes as data
    report = verify(broken)
    assert not report.ok
    chunks = next(c for c in report.checks if c["check"] == "chunks")
    assert "chunk 2: unreadable" in chunks["detail"] and "chunk 5: non-finite logits in rows [320" in chunks["detail"]
    code, _, err = invoke("verify", broken)
    assert code == 4 and err.strip().splitlines() == [f"error: cache {broken} failed verification: chunks"]


def test_incomplete_cache_fails_completeness(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    zarr.open_group(str(broken), mode="r+")["chunk_done"][3] = 0
    failed = {c["check"] for c in verify(broken).checks if not c["ok"]}
    assert failed == {"complete"}


def test_tampered_index_and_labels_are_caught(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    group = zarr.open_group(str(broken), mode="r+")
    index = group["index"][:]
    group["index"][:2] = index[1::-1]  # swap two rows' dataset indices
    labels = group["labels"][:]
    group["labels"][10] = (labels[10] + 1) % 4
    failed = {c["check"] for c in verify(broken).checks if not c["ok"]}
    assert failed == {"index", "labels"}


def test_another_teachers_weights_fail_the_teacher_check(cache_path, tmp_path):
    other = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    save_weights(other, tmp_path / "other.safetensors")
    code, out, err = invoke("verify", cache_path, "--teacher", "mlp-64", "--teacher-weights", tmp_path / "other.safetensors", "--json")
    assert code == 4 and "teacher" in err
    report = json.loads(out)
    assert report["max_abs_diff"] > 0.05 and not next(c for c in report["checks"] if c["check"] == "teacher")["ok"]


def test_missing_attributes_fail_metadata(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    attrs = zarr.open_group(str(broken), mode="r+").attrs
    del attrs["temperature"]
    report = verify(broken)
    assert [c["check"] for c in report.checks] == ["metadata"] and not report.ok
    assert "temperature" in report.checks[0]["detail"]
