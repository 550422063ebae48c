"""Tampered or damaged caches: every command that reads one stops with one line naming the damage
(exit 4), never trains on it and never fails with an internal error. Each case edits a real small
cache with plain zarr or plain file writes, as someone outside this tool would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

from stages import storage
from stages.cache import CacheReader
from stages.errors import CacheDamagedError
from tests.conftest import CHUNK_ROWS, assert_same_cache, cache_with_cli, invoke, invoke_json
from tests.stages.cache.conftest import reseal


def _copy(cache_path, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache_path, broken)
    return broken


# A chunk of the logits as stored: 64 rows of 4 float16 classes, then its crc32c.
CHUNK_BYTES = CHUNK_ROWS * 4 * 2 + 4


def _logits_file(cache: Path, chunk: int) -> tuple[Path, int, list[int], str]:
    """Where chunk `chunk` of the logits lies: the file holding it (its own, or its shard's), its
    offset there, the chunks that file holds, and what verify names the file by."""
    shard_rows = zarr.open_group(str(cache), mode="r").attrs["shard_rows"]
    if shard_rows is None:
        return cache / "logits" / "c" / str(chunk) / "0", 0, [chunk], f"chunk {chunk}"
    per_shard = shard_rows // CHUNK_ROWS
    shard = chunk // per_shard
    held = list(range(shard * per_shard, (shard + 1) * per_shard))
    return cache / "logits" / "c" / str(shard) / "0", (chunk % per_shard) * CHUNK_BYTES, held, f"shard {shard}"


def _set_attribute(path, name, value):
    """Edit the group's zarr.json by hand, as a user with a text editor would."""
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][name] = value
    (path / "zarr.json").write_text(json.dumps(meta))


def _commands(cache, tmp_path, teacher_weights):
    return {
        "train-student": ["train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run"],
        "verify": ["verify", cache],
        "inspect": ["inspect", cache, "--png", tmp_path / "i.png"],
        "evaluate": ["evaluate", "--model", "mlp-64", "--weights", teacher_weights, "--cache", cache],
    }


def _assert_damage_reported(cache, tmp_path, teacher_weights, *expected: str):
    for command, args in _commands(cache, tmp_path, teacher_weights).items():
        code, _, err = invoke(*args)
        lines = err.strip().splitlines()
        assert code == 4 and len(lines) == 1 and "internal error" not in err, (command, code, err)
        text = lines[0] if command != "verify" else json.dumps(invoke(*args, "--json")[1])
        assert any(e in text for e in expected), (command, lines[0])
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(("name", "value", "named"), [
    ("num_samples", 300, "shape (600, 4) (expected (300, 4))"),
    ("num_samples", 900, "shape (600, 4) (expected (900, 4))"),
    ("temperature", -3.0, "temperature=-3.0"),
    ("temperature", 0, "temperature=0"),
    ("num_classes", 5, "row_shape [4] disagrees"),
])
def test_tampered_attributes_are_damage_for_every_reader(cache_path, tmp_path, teacher_weights, name, value, named):
    broken = _copy(cache_path, tmp_path)
    _set_attribute(broken, name, value)
    _assert_damage_reported(broken, tmp_path, teacher_weights, named)


@pytest.mark.parametrize("cache", ["cache_path", "sharded_cache_path"])
def test_a_flipped_bit_in_an_uncompressed_float16_chunk_is_caught_and_named(request, cache, tmp_path, teacher_weights):
    broken = _copy(request.getfixturevalue(cache), tmp_path)
    assert zarr.open_group(str(broken), mode="r").attrs["codec"] == "none"
    path, offset, _, unit = _logits_file(broken, 3)
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0x01  # one bit of one float16 logit: still a finite number
    path.write_bytes(bytes(data))
    _assert_damage_reported(broken, tmp_path, teacher_weights, "array logits: chunk 3 cannot be read", f"{unit}: unreadable logits")
    with pytest.raises(CacheDamagedError, match="array logits: chunk 3 cannot be read.*checksum"):
        reader = CacheReader(broken)
        for _ in reader.batches(32, seed=0, epoch=0, run_chunks=4):  # chunk 3 inside a run of chunks 0-3
            pass


@pytest.mark.parametrize("cache", ["cache_path", "sharded_cache_path"])
def test_a_truncated_chunk_or_shard_is_damage_for_every_reader(request, cache, tmp_path, teacher_weights):
    """Cut short, a shard loses its index (and its checksum): every chunk in it is unreadable."""
    broken = _copy(request.getfixturevalue(cache), tmp_path)
    path, _, held, unit = _logits_file(broken, 5)
    path.write_bytes(path.read_bytes()[:37])
    _assert_damage_reported(broken, tmp_path, teacher_weights, *(f"array logits: chunk {c} cannot be read" for c in held),
                            f"{unit}: unreadable logits")


def test_permuted_index_rows_stop_training(cache_path, tmp_path, teacher_weights):
    """Two rows' dataset indices swapped: each would train on the other's soft labels."""
    broken = _copy(cache_path, tmp_path)
    index = zarr.open_group(str(broken), mode="r+")["index"]
    index[[10, 11]] = index[[11, 10]]
    reseal(broken)  # as a faulty writer would have recorded it: the index's hash, not the manifest, must catch it
    code, _, err = invoke(*_commands(broken, tmp_path, teacher_weights)["train-student"])
    assert code == 4 and err.strip().splitlines() == [
        f"error: cache {broken}: its index array differs from the recorded dataset.index_sha256 "
        "(rows reordered, repeated or replaced); run pipeline verify"]
    assert not (tmp_path / "run").exists()


def test_a_zero_byte_chunk_done_record_is_recomputed_on_resume(tmp_path, teacher_weights):
    reference = cache_with_cli(tmp_path / "reference.zarr", teacher_weights)["cache"]
    broken = _copy(reference, tmp_path)
    (broken / "chunk_done" / "c" / "2").write_bytes(b"")
    code, out, err = invoke("verify", broken, "--json")
    assert code == 4 and "internal error" not in err
    assert [c["check"] for c in json.loads(out)["checks"] if not c["ok"]] == ["chunk_done"]
    resumed = cache_with_cli(broken, teacher_weights)
    assert resumed["chunks_computed"] == 1
    assert_same_cache(broken, reference)


def test_a_chunk_marked_done_but_never_written_is_recomputed_on_resume(tmp_path, teacher_weights):
    """Its files gone (or never there) while chunk_done says 1: computed again, not an IndexError."""
    reference = cache_with_cli(tmp_path / "reference.zarr", teacher_weights)["cache"]
    broken = _copy(reference, tmp_path)
    group = zarr.open_group(str(broken), mode="r+")
    for chunk_file in ("logits/c/4/0", "index/c/4", "labels/c/4"):
        (broken / chunk_file).unlink()
    group.attrs["complete"] = False
    assert group["chunk_done"][4] == 1
    resumed = cache_with_cli(broken, teacher_weights)
    assert resumed["chunks_computed"] == 1
    assert_same_cache(broken, reference)


def test_leftover_partial_files_are_never_counted_and_are_cleaned_on_resume(tmp_path, teacher_weights):
    """What a kill in the middle of zarr's write-then-rename leaves inside a cache."""
    reference = cache_with_cli(tmp_path / "reference.zarr", teacher_weights)
    cache = reference["cache"]
    planted = [Path(cache) / "chunk_done" / "c" / "3.0123456789abcdef0123456789abcdef.partial",
               Path(cache) / "logits" / "c" / "2" / "0.fedcba9876543210fedcba9876543210.partial"]
    for path in planted:
        path.write_bytes(b"\x01" * 5000)
    assert storage.disk_usage(cache) == reference["bytes_on_disk"]
    assert invoke_json("inspect", cache, "--png", tmp_path / "i.png")["bytes_on_disk"] == reference["bytes_on_disk"]
    assert invoke_json("verify", cache)["ok"]
    resumed = cache_with_cli(cache, teacher_weights)
    assert resumed["chunks_computed"] == 0 and not any(path.exists() for path in planted)
    assert resumed["bytes_on_disk"] == reference["bytes_on_disk"]
