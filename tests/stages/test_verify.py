"""`verify` passes a sound cache and names what is wrong with a damaged one."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import zarr

from pipeline.models import resolve_model
from stages.kinds import KINDS
from stages.verify import verify
from stages.weights import save_weights
from tests.conftest import DATASET, cache_with_cli, invoke, invoke_json
from tests.stages.cache.conftest import reseal

# A value for each kind's options (stages.kinds: each kind's Options).
KIND_OPTIONS = {"top_k": 2, "samples": 12, "value_bits": 4}


def _damaged_copy(cache_path, tmp_path, name="broken.zarr"):
    broken = tmp_path / name
    shutil.copytree(cache_path, broken)
    return broken


def test_a_sound_cache_passes_every_check(cache_path, teacher_weights):
    report = invoke_json("verify", cache_path, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "40")
    assert report["ok"] is True
    assert [c["check"] for c in report["checks"]] == ["metadata", "schema", "arrays", "stored", "complete", "chunks", "index", "labels", "teacher"]
    assert 0 <= report["max_abs_diff"] < 5e-3  # float16 rounding of logits/T


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_cache_matches_its_teacher_rerun(tmp_path, teacher_weights, kind):
    """A cache of each kind from the registry, per row (its log-sum-exp one number per row for a
    top-k cache), re-run against its teacher."""
    options = [(f"--{f.name.replace('_', '-')}", str(KIND_OPTIONS[f.name])) for f in dataclasses.fields(KINDS[kind].Options)
               if f.name in KIND_OPTIONS]
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--format", kind, *sum(options, ()))["cache"]
    report = invoke_json("verify", cache, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "40")
    assert report["ok"] and next(c for c in report["checks"] if c["check"] == "teacher")["ok"], report


def test_a_sampled_cache_whose_draws_were_altered_fails_against_its_teacher(tmp_path, teacher_weights):
    """One draw moved from one class to another (the counts still sum to S, so only the redraw from
    the recorded seed and row index can tell)."""
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--format", "sampled", "--samples", "12")["cache"]
    counts = zarr.open_group(str(cache), mode="r+")["sampled_counts"]
    row = counts[:3]
    assert (row[0, 0] >= 1) and (row[0, 1] >= 1), row  # two distinct classes drawn in row 0
    row[0, 0] += 1
    row[0, 1] -= 1
    counts[:3] = row
    reseal(cache)  # as a faulty writer would have recorded it: only the teacher's rerun can tell
    code, out, _ = invoke("verify", cache, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "10000", "--json")
    report = json.loads(out)
    failed = {c["check"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert code == 4 and set(failed) == {"teacher"} and "sampled_counts differ" in failed["teacher"], report


@pytest.mark.parametrize(("cache", "garbled", "deleted", "named"), [
    ("cache_path", 2, 5, ("chunk 2: array logits: chunk 2 cannot be read", "chunk 5: array logits: chunk 5 is missing")),
    ("sharded_cache_path", 1, 4, ("shard 1: array logits: chunk 2 cannot be read", "shard 4: array logits: chunk 8 is missing")),
])
def test_damaged_chunks_are_each_named(request, cache, garbled, deleted, named, tmp_path):
    """Each damaged file is named: a chunk's, or a shard's."""
    broken = _damaged_copy(request.getfixturevalue(cache), tmp_path)
    (broken / "logits" / "c" / str(garbled) / "0").write_bytes(b"\x00garbage")
    (broken / "logits" / "c" / str(deleted) / "0").unlink()  # a complete cache has every chunk: never read as NaN
    report = verify(broken)
    assert not report.ok
    chunks = next(c for c in report.checks if c["check"] == "chunks")
    assert all(name in chunks["detail"] for name in named), chunks["detail"]
    code, _, err = invoke("verify", broken)
    assert code == 4 and err.strip().splitlines() == [f"error: cache {broken} failed verification: stored, chunks"]


def test_incomplete_cache_fails_completeness(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    zarr.open_group(str(broken), mode="r+")["chunk_done"][3] = 0  # zarr deletes a chunk of fill values
    failed = {c["check"] for c in verify(broken).checks if not c["ok"]}
    assert failed == {"stored", "complete"}


def test_tampered_index_is_caught(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    group = zarr.open_group(str(broken), mode="r+")
    group["index"][:2] = group["index"][:2][::-1]  # swap two rows' dataset indices
    failed = {c["check"] for c in verify(broken).checks if not c["ok"]}
    assert failed == {"chunks", "index"}  # its chunk is not the one written there, and the index's hash differs


def test_tampered_labels_are_caught(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    group = zarr.open_group(str(broken), mode="r+")
    group["labels"][10] = (group["labels"][10] + 1) % 4
    failed = {c["check"] for c in verify(broken).checks if not c["ok"]}
    assert failed == {"chunks", "labels"}  # its chunk is not the one written there, and the labels differ from the dataset's


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


def test_an_index_pointing_outside_the_dataset_fails_checks_not_the_tool(cache_path, tmp_path):
    broken = _damaged_copy(cache_path, tmp_path)
    zarr.open_group(str(broken), mode="r+")["index"][5] = 2**40
    reseal(broken)  # as a faulty writer would have recorded it: the range check, not the manifest, must catch it
    report = verify(broken)
    failed = {c["check"] for c in report.checks if not c["ok"]}
    assert failed == {"chunks", "index"}  # labels are not judged through a broken index
    code, _, err = invoke("train-student", "--cache", broken, "--student", "mlp-64", "--out", tmp_path / "r")
    assert code == 4 and "outside the dataset" in err


def test_verify_with_a_teacher_on_malformed_metadata_reports_it(cache_path, tmp_path, teacher_weights):
    broken = _damaged_copy(cache_path, tmp_path)
    del zarr.open_group(str(broken), mode="r+").attrs["num_classes"]
    code, _, err = invoke("verify", broken, "--teacher", "mlp-64", "--teacher-weights", teacher_weights)
    assert code == 4 and "metadata" in err


def test_verify_replays_the_recorded_autocast(tmp_path, teacher_weights):
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                        "--out", tmp_path / "bf16.zarr", "--amp", "bf16", "--temperature", "1")["cache"]
    report = invoke_json("verify", cache, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "100")
    assert report["ok"]
