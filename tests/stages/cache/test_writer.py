"""stages/cache/writer.py: writing whole chunks from a background thread, the arrays and codecs it
creates, the teacher metrics, and the lifecycle of one pass (`writing`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.cache import CacheReader, CacheWriter, Layout, writing
from stages.cache.writer import teacher_metrics
from stages.data import sha256
from stages.errors import CacheDamagedError, CacheLockedError, CacheMismatchError, InputError, PipelineError
from stages.storage import FileLock
from tests.conftest import CHUNK_ROWS, DATASET, SHARD_ROWS
from tests.stages.cache.conftest import _write


def test_teacher_metrics_match_a_direct_computation(cache_path, teacher_weights):
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights).eval()
    with torch.no_grad():
        logits = teacher(split.inputs(np.arange(len(split))))
    accuracy = float((logits.argmax(1).numpy() == split.labels).mean())
    metrics = CacheReader(cache_path).attrs["teacher_metrics"]
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=2 / 600)  # float16 can flip a near tie
    nll = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(split.labels)))
    assert metrics["nll"] == pytest.approx(nll, rel=1e-2)


@pytest.mark.parametrize("shard_rows", [None, 128])
def test_round_trip_in_uneven_batches(tmp_path, shard_rows):
    writer, logits, labels = _write(tmp_path, shard_rows=shard_rows)
    for start in range(0, 300, 45):  # batches that straddle chunk (and shard) boundaries
        stop = min(start + 45, 300)
        writer.write_rows(start, {"logits": logits[start:stop], "index": np.arange(start, stop), "labels": labels[start:stop]})
    writer.close()
    writer.mark_complete({})
    reader = CacheReader(tmp_path / "c.zarr")
    rows = [reader.read_chunk(c) for c in range(reader.grid.num_chunks)]
    np.testing.assert_array_equal(np.concatenate([r["logits"] for r in rows]), logits)
    np.testing.assert_array_equal(np.concatenate([r["labels"] for r in rows]), labels)


@pytest.mark.parametrize("shard_rows", [None, 128])
def test_unwritten_rows_read_as_nan_and_are_not_marked_done(tmp_path, shard_rows):
    """A writer writes whole write units only: a chunk, or a shard (of 4 chunks here), partly
    filled when the pass stops is never written, not even its chunks that were full."""
    writer, logits, labels = _write(tmp_path, shard_rows=shard_rows)
    unit, count = (32, 40) if shard_rows is None else (shard_rows, shard_rows + 40)
    writer.write_rows(0, {"logits": logits[:count], "index": np.arange(count), "labels": labels[:count]})
    writer.abort()  # unit 0 was full; unit 1 only partly filled (a whole chunk of it, when sharded)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group["chunk_done"][:2].tolist() == [1, 0]
    np.testing.assert_array_equal(group["logits"][:unit], logits[:unit])
    assert np.isnan(group["logits"][unit:]).all() and (group["index"][unit:] == -1).all()
    with pytest.raises(CacheMismatchError, match="incomplete"):
        CacheReader(tmp_path / "c.zarr")


@pytest.mark.parametrize("fixture", ["cache_path", "sharded_cache_path"])
def test_every_chunk_of_every_array_carries_a_crc32c_checksum(request, fixture):
    """As the arrays' zarr.json says, which any zarr v3 reader follows: crc32c last (after zstd
    where there is one), inside a shard too; a shard's index checksummed; the records per write
    unit (chunk_done, chunk_manifest) never sharded."""
    cache = request.getfixturevalue(fixture)
    group = zarr.open_group(str(cache), mode="r")
    for name in group.array_keys():
        codecs = json.loads((cache / name / "zarr.json").read_text())["codecs"]
        sharded = codecs[0]["name"] == "sharding_indexed"
        assert sharded == (fixture == "sharded_cache_path" and name not in ("chunk_done", "chunk_manifest")), name
        if sharded:
            assert len(codecs) == 1 and codecs[0]["configuration"]["chunk_shape"][0] == CHUNK_ROWS
            assert [c["name"] for c in codecs[0]["configuration"]["index_codecs"]] == ["bytes", "crc32c"], name
            assert group[name].shards[0] == SHARD_ROWS
            codecs = codecs[0]["configuration"]["codecs"]
        compressed = name in ("index", "labels")
        assert [c["name"] for c in codecs] == ["bytes", *(["zstd"] if compressed else []), "crc32c"], name


@pytest.mark.parametrize("codec", ["none", "zstd"])
@pytest.mark.parametrize("shard_rows", [0, SHARD_ROWS])
def test_the_codec_is_the_arrays_own_not_only_an_attribute(tmp_path, teacher_weights, codec, shard_rows):
    """What --codec names is what zarr writes the soft labels with (inside each shard of a sharded
    cache): their array metadata, read by plain zarr, lists the compressor (the attribute alone
    would not show it)."""
    from zarr.codecs import ZstdCodec

    from tests.conftest import invoke_json

    out = tmp_path / f"{codec}.zarr"
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                "--chunk-rows", CHUNK_ROWS, "--shard-rows", shard_rows, "--codec", codec, "--out", out)
    logits = zarr.open_group(str(out), mode="r")["logits"]
    assert (logits.shards and logits.shards[0]) == (shard_rows or None)
    zstd = [c for c in logits.compressors if isinstance(c, ZstdCodec)]
    assert [c.level for c in zstd] == ([3] if codec == "zstd" else [])


# The lifecycle of one pass (`writing`), on a dense float32 cache of N rows in chunks of ROWS.
N, CLASSES, ROWS, T = 300, 5, 32, 2.0


class _Stop(Exception):
    """What the caller of `writing` raises to end its pass early."""


def _layout(**changes) -> Layout:
    return Layout(kind="dense", num_samples=N, num_classes=CLASSES, chunk_rows=ROWS, dtype="float32", **changes)


def _pass_attrs(temperature: float = T) -> dict:
    """The attributes a teacher pass gives, as far as resuming and the teacher metrics use them."""
    return {"temperature": temperature, "teachers": [{"spec": "mlp-64", "weights_sha256": "0" * 64}],
            "dataset": {"split": "train", "fingerprint": {"num_samples": N}, "index_sha256": sha256(np.arange(N))}}


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(seed).normal(size=(N, CLASSES)).astype(np.float32), np.arange(N) % CLASSES


def _rows(logits, labels, start, stop) -> dict:
    return {"logits": logits[start:stop], "index": np.arange(start, stop), "labels": labels[start:stop]}


def _lock_file(out):
    return out.with_name(out.name + ".lock")


def test_writing_holds_the_lock_then_marks_the_cache_complete_with_its_teacher_metrics(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
        with pytest.raises(CacheLockedError, match="being written by another process"):
            with FileLock(out):
                pass
        assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
        writer.write_rows(0, _rows(logits, labels, 0, N))
    assert not _lock_file(out).exists()
    reader = CacheReader(out)
    assert reader.attrs["complete"] is True and reader.attrs["completed_at"]
    np.testing.assert_array_equal(reader.read_rows(0, N)["logits"], logits)
    # The metrics at T=1 of the stored logits / T, computed here with numpy.
    z = logits.astype(np.float64) * T
    log_probs = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    correct = int((logits.argmax(1) == labels).sum())
    metrics = reader.attrs["teacher_metrics"]
    assert metrics["accuracy"] == correct / N and metrics["errors"] == N - correct and metrics["num_samples"] == N
    assert metrics["nll"] == pytest.approx(-log_probs[np.arange(N), labels].mean(), rel=1e-5)


def _fail_part_way(out, logits, labels) -> None:
    """A pass that writes rows 0-99 (chunks 0-2 whole, chunk 3 partly), then fails."""
    with pytest.raises(_Stop):
        with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
            writer.write_rows(0, _rows(logits, labels, 0, 100))
            raise _Stop


def test_a_failure_inside_writing_keeps_the_whole_chunks_leaves_the_cache_incomplete_and_frees_the_lock(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    _fail_part_way(out, logits, labels)  # the caller's own error comes out, not another
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["complete"] is False and "teacher_metrics" not in group.attrs
    assert group["chunk_done"][:].tolist() == [1, 1, 1] + [0] * 7
    np.testing.assert_array_equal(group["logits"][:96], logits[:96])
    assert np.isnan(group["logits"][96:]).all() and (group["index"][96:] == -1).all()  # chunk 3 half-filled: not written
    assert not _lock_file(out).exists()
    with FileLock(out):  # the next writer gets the lock at once
        pass


def test_writing_again_after_a_failure_computes_only_the_missing_chunks(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    _fail_part_way(out, logits, labels)
    with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
        assert writer.missing_chunks() == list(range(3, 10))
        for chunk in writer.missing_chunks():
            writer.write_rows(chunk * ROWS, _rows(logits, labels, *writer.grid.rows(chunk)))
    reader = CacheReader(out)
    assert reader.attrs["complete"] is True
    np.testing.assert_array_equal(reader.read_rows(0, N)["logits"], logits)


def test_writing_a_complete_cache_again_leaves_it_as_it_is(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
        writer.write_rows(0, _rows(logits, labels, 0, N))
    zarr.open_group(str(out), mode="r+").attrs["completed_at"] = "2000-01-01T00:00:00+00:00"
    before = dict(zarr.open_group(str(out), mode="r").attrs)
    with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
        assert writer.missing_chunks() == []
    assert dict(zarr.open_group(str(out), mode="r").attrs) == before
    np.testing.assert_array_equal(CacheReader(out).read_rows(0, N)["logits"], logits)


def test_a_different_cache_is_refused_and_kept_and_overwrite_replaces_it_with_a_new_one(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    with writing(out, _layout(), _pass_attrs(), overwrite=False) as writer:
        writer.write_rows(0, _rows(logits, labels, 0, N))
    with pytest.raises(InputError, match=r"\(temperature: cache has 2.0, this run 1.0\); set `overwrite` to replace it"):
        with writing(out, _layout(), _pass_attrs(1.0), overwrite=False):
            pass
    assert CacheReader(out).temperature == T and not _lock_file(out).exists()
    other, _ = _data(seed=1)
    with writing(out, _layout(), _pass_attrs(1.0), overwrite=True) as writer:
        assert writer.missing_chunks() == list(range(10))
        assert writer.group.attrs["complete"] is False and writer.group.attrs["temperature"] == 1.0
        writer.write_rows(0, _rows(other, labels, 0, N))
    reader = CacheReader(out)
    assert reader.temperature == 1.0
    np.testing.assert_array_equal(reader.read_rows(0, N)["logits"], other)


def test_overwrite_never_deletes_a_folder_that_is_not_a_cache(tmp_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="exists and is not a cache; refusing to delete it"):
        with writing(out, _layout(), _pass_attrs(), overwrite=True):
            pass
    assert (out / "notes.txt").read_text() == "precious"


def test_creating_a_cache_in_a_folder_that_is_not_empty_is_refused(tmp_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="exists and is not empty; refusing to create a cache there"):
        CacheWriter.create(out, _layout(), _pass_attrs())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_closing_with_a_chunk_partly_filled_is_refused_and_leaves_it_unmarked(tmp_path):
    writer, logits, labels = _write(tmp_path)
    writer.write_rows(0, {"logits": logits[:40], "index": np.arange(40), "labels": labels[:40]})
    with pytest.raises(PipelineError, match=r"chunks \[1\] were left partly filled"):
        writer.close()
    writer.abort()
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["chunk_done"][:2].tolist() == [1, 0]


def test_a_cache_with_chunks_missing_is_never_marked_complete(tmp_path):
    writer, logits, labels = _write(tmp_path)
    writer.write_rows(0, {"logits": logits[:64], "index": np.arange(64), "labels": labels[:64]})
    writer.close()
    with pytest.raises(PipelineError, match="marking a cache complete with chunks missing"):
        writer.mark_complete({})
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["complete"] is False


def test_a_writer_that_lost_its_lock_writes_nothing_and_every_later_call_fails(tmp_path):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    with FileLock(out) as lock:
        writer = CacheWriter.create(out, _layout(), _pass_attrs(), lock=lock)
        _lock_file(out).unlink()
        _lock_file(out).write_text("another writer's")
        writer.write_rows(0, _rows(logits, labels, 0, ROWS))  # one whole chunk, handed to the writer thread
        for call in (writer.close, writer.close, lambda: writer.write_rows(ROWS, _rows(logits, labels, ROWS, 2 * ROWS))):
            with pytest.raises(CacheLockedError, match="deleted or replaced"):
                call()
    group = zarr.open_group(str(out), mode="r")
    assert group["chunk_done"][:].tolist() == [0] * 10 and np.isnan(group["logits"][:]).all()
    assert _lock_file(out).read_text() == "another writer's"


@pytest.mark.parametrize(("shard_rows", "damage", "named"), [
    (None, lambda out: zarr.open_group(str(out), mode="r+")["logits"].__setitem__((70, 2), np.nan),
     r"chunk 2 of the cache holds non-finite logits in rows \[70\]"),
    (None, lambda out: (out / "labels" / "c" / "4").write_bytes(b""), "chunk 4 of the cache cannot be read"),
    (128, lambda out: zarr.open_group(str(out), mode="r+")["logits"].__setitem__((200, 2), np.nan),
     r"shard 1 of the cache holds non-finite logits in rows \[200\]"),
    (128, lambda out: (out / "labels" / "c" / "2").write_bytes(b"\x00garbage"), "shard 2 of the cache cannot be read"),
])
def test_teacher_metrics_of_a_chunk_damaged_after_writing_are_a_damage_error_naming_it(tmp_path, shard_rows, damage, named):
    out = tmp_path / "c.zarr"
    logits, labels = _data()
    writer = CacheWriter.create(out, _layout(shard_rows=shard_rows), _pass_attrs())
    writer.write_rows(0, _rows(logits, labels, 0, N))
    writer.close()
    assert teacher_metrics(writer.group, writer.layout, T)["num_samples"] == N
    damage(out)
    with pytest.raises(CacheDamagedError, match=named):
        teacher_metrics(zarr.open_group(str(out), mode="r"), writer.layout, T)


def test_an_unlabelled_cache_is_marked_complete_without_teacher_metrics(tmp_path):
    out = tmp_path / "c.zarr"
    logits, _ = _data()
    with writing(out, _layout(labelled=False), _pass_attrs(), overwrite=False) as writer:
        writer.write_rows(0, {"logits": logits, "index": np.arange(N)})
    reader = CacheReader(out)
    assert reader.attrs["complete"] is True and reader.attrs["teacher_metrics"] is None and not reader.labelled
    np.testing.assert_array_equal(reader.read_rows(0, N)["logits"], logits)


def test_rows_past_the_end_of_the_cache_are_refused(tmp_path):
    """They once sent write_rows into an endless loop."""
    writer, logits, labels = _write(tmp_path)
    with pytest.raises(PipelineError, match=r"rows \[290, 310\) written to a cache of 300 rows"):
        writer.write_rows(290, {"logits": np.zeros((20, *logits.shape[1:]), logits.dtype), "index": np.arange(290, 310),
                                "labels": np.zeros(20, dtype=labels.dtype)})
    writer.abort()
