"""The cache contract: what cache-teacher writes, read back with plain zarr and with the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.cache import FORMAT, SCHEMA_VERSION, CacheReader, CacheWriter, Layout, batch_bounds, default_chunk_rows
from stages.data import sha256
from stages.errors import CacheMismatchError, InputError
from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE


def test_plain_zarr_gives_the_teachers_softened_probabilities(cache_path, teacher_weights):
    """No project code on the read side: zarr + numpy, against softmax(teacher(x)/T) computed here."""
    group = zarr.open_group(str(cache_path), mode="r")
    assert group.attrs["format"] == FORMAT and group.attrs["complete"] is True
    T = group.attrs["temperature"]
    stored = group["logits"][:].astype(np.float64)
    index = group["index"][:]
    probs = np.exp(stored - stored.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)

    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights).eval()
    with torch.no_grad():
        expected = torch.softmax(teacher(split.inputs(index)).double() / T, dim=1).numpy()
    assert stored.dtype == np.float64 and group["logits"].dtype == np.float16
    np.testing.assert_allclose(probs, expected, atol=2e-3)
    np.testing.assert_array_equal(index, np.arange(600))
    np.testing.assert_array_equal(group["labels"][:], split.labels)


def test_attributes_describe_the_cache(cache_path, teacher_weights):
    attrs = dict(zarr.open_group(str(cache_path), mode="r").attrs)
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["kind"] == "dense" and attrs["stored_values"] == "teacher_logits / temperature"
    assert attrs["temperature"] == TEMPERATURE and attrs["num_classes"] == 4 and attrs["num_samples"] == 600
    assert attrs["chunk_rows"] == CHUNK_ROWS and attrs["dtype"] == "float16" and attrs["codec"] == "none"
    (teacher,) = attrs["teachers"]
    assert teacher["spec"] == "mlp-64" and teacher["weights"] == str(teacher_weights)
    assert teacher["num_parameters"] == 8 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4
    assert len(teacher["weights_sha256"]) == 64
    assert attrs["dataset"]["spec"] == DATASET and attrs["dataset"]["split"] == "train"
    assert attrs["dataset"]["fingerprint"]["num_samples"] == 600
    metrics = attrs["teacher_metrics"]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["errors"] == round(600 * (1 - metrics["accuracy"]))
    assert attrs["tool"]["name"] == "pipeline" and attrs["created_at"] and attrs["completed_at"]
    assert attrs["config"]["chunk_rows"] == CHUNK_ROWS
    json.dumps(attrs)  # every attribute is plain JSON


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


def _write(tmp_path, n=300, chunk_rows=32, classes=5, name="c.zarr"):
    layout = Layout(kind="dense", num_samples=n, num_classes=classes, chunk_rows=chunk_rows, dtype="float32")
    # rows in order: the recorded index hash is that of 0..n-1
    writer = CacheWriter.create(tmp_path / name, layout, {"temperature": 1.0, "teachers": [],
                                                          "dataset": {"index_sha256": sha256(np.arange(n))}})
    logits = np.random.default_rng(0).normal(size=(n, classes)).astype(np.float32)
    labels = np.arange(n) % classes
    return writer, logits, labels


def test_round_trip_in_uneven_batches(tmp_path):
    writer, logits, labels = _write(tmp_path)
    for start in range(0, 300, 45):  # batches that straddle chunk boundaries
        stop = min(start + 45, 300)
        writer.write_rows(start, {"logits": logits[start:stop], "index": np.arange(start, stop), "labels": labels[start:stop]})
    writer.close()
    writer.mark_complete({})
    reader = CacheReader(tmp_path / "c.zarr")
    rows = [reader.read_chunk(c) for c in range(reader.grid.num_chunks)]
    np.testing.assert_array_equal(np.concatenate([r["logits"] for r in rows]), logits)
    np.testing.assert_array_equal(np.concatenate([r["labels"] for r in rows]), labels)


def test_unwritten_rows_read_as_nan_and_are_not_marked_done(tmp_path):
    writer, logits, labels = _write(tmp_path)
    writer.write_rows(0, {"logits": logits[:40], "index": np.arange(40), "labels": labels[:40]})
    writer.abort()  # chunk 0 (rows 0-31) was full; chunk 1 only partly filled
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group["chunk_done"][:2].tolist() == [1, 0]
    assert np.isnan(group["logits"][32:]).all() and (group["index"][32:] == -1).all()
    with pytest.raises(CacheMismatchError, match="incomplete"):
        CacheReader(tmp_path / "c.zarr")


def _complete_cache(tmp_path, n=300, chunk_rows=32):
    writer, logits, labels = _write(tmp_path, n=n, chunk_rows=chunk_rows)
    writer.write_rows(0, {"logits": logits, "index": np.arange(n), "labels": labels})
    writer.close()
    writer.mark_complete({})
    return CacheReader(tmp_path / "c.zarr"), logits


@pytest.mark.parametrize("batch_size", [1, 17, 64, 1000])
def test_reader_visits_every_row_once_per_epoch(tmp_path, batch_size):
    reader, logits = _complete_cache(tmp_path)
    orders = []
    for epoch in range(3):
        batches = list(reader.batches(batch_size, seed=5, epoch=epoch, buffer_chunks=3))
        assert all(len(b["index"]) == batch_size for b in batches[:-1])
        assert batch_size / 2 <= len(batches[-1]["index"]) < 1.5 * batch_size or len(batches) == 1
        index = np.concatenate([b["index"] for b in batches])
        assert sorted(index.tolist()) == list(range(300))
        got = np.concatenate([b["logits"] for b in batches])
        np.testing.assert_array_equal(got, logits[index])  # rows keep their own logits
        orders.append(index)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    assert not np.array_equal(orders[0], np.arange(300))


def test_reader_streams_whole_chunks_in_shuffled_order(tmp_path):
    """The first batches come only from the first `buffer_chunks` chunks of the epoch's order."""
    reader, _ = _complete_cache(tmp_path)
    order = [first for first, _ in reader.runs(seed=5, epoch=0)]
    assert sorted(order) == list(range(reader.grid.num_chunks)) and order != sorted(order)
    batches = reader.batches(32, seed=5, epoch=0, buffer_chunks=3)
    # a buffer of 3 chunks (96 rows) gives 2 batches; one batch's worth is held for the next
    first_rows = np.concatenate([next(batches)["index"] for _ in range(2)])
    expected = np.concatenate([np.arange(*reader.grid.rows(c)) for c in order[:3]])
    assert set(first_rows.tolist()) <= set(expected.tolist()) and len(first_rows) == 64
    assert first_rows.tolist() != sorted(first_rows.tolist())  # rows shuffled inside the buffer


@pytest.mark.parametrize("run_chunks", [1, 2, 4])
def test_runs_of_chunks_cover_every_chunk_once(tmp_path, run_chunks):
    reader, logits = _complete_cache(tmp_path)
    runs = reader.runs(seed=1, epoch=0, run_chunks=run_chunks)
    covered = sorted(c for first, last in runs for c in range(first, last + 1))
    assert covered == list(range(reader.grid.num_chunks))
    assert all(last - first + 1 <= run_chunks for first, last in runs)
    index = np.concatenate([b["index"] for b in reader.batches(40, seed=1, epoch=0, run_chunks=run_chunks)])
    assert sorted(index.tolist()) == list(range(300))


def test_sequential_order_reads_rows_in_file_order(tmp_path):
    reader, _ = _complete_cache(tmp_path)
    index = np.concatenate([b["index"] for b in reader.batches(50, seed=1, epoch=0, shuffle=False)])
    assert index.tolist() == list(range(300))


@pytest.mark.parametrize(("rows", "batch", "sizes"), [(300, 64, [64] * 4 + [44]), (280, 64, [64, 64, 64, 88]), (300, 100, [100, 100, 100]),
                                                     (300, 17, [17] * 17 + [11]), (5, 64, [5]), (130, 64, [64, 66])])
def test_a_small_last_batch_joins_the_one_before(rows, batch, sizes):
    assert [b - a for a, b in batch_bounds(rows, batch)] == sizes


def test_reader_order_is_reproducible(tmp_path):
    reader, _ = _complete_cache(tmp_path)
    a = np.concatenate([b["index"] for b in reader.batches(50, seed=1, epoch=2)])
    b = np.concatenate([b["index"] for b in reader.batches(50, seed=1, epoch=2)])
    np.testing.assert_array_equal(a, b)


def test_schema_from_the_future_is_refused_with_an_upgrade_hint(tmp_path):
    _complete_cache(tmp_path)
    zarr.open_group(str(tmp_path / "c.zarr"), mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CacheMismatchError, match="upgrade"):
        CacheReader(tmp_path / "c.zarr")


def test_missing_and_foreign_paths_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        CacheReader(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(InputError, match="not a cache"):
        CacheReader(tmp_path / "other.zarr")


def test_default_chunking_targets_about_two_megabytes_in_even_chunks():
    def rows(num_samples=100_000, **layout):
        return default_chunk_rows(Layout(num_samples=10, chunk_rows=1, **layout).row_bytes, num_samples)

    assert rows(kind="dense", num_classes=1000) == 1021  # 98 chunks of at most 1024 rows, evened out
    assert rows(num_samples=1024 * 50, kind="dense", num_classes=1000) == 1024
    assert rows(num_samples=131 * 40, kind="dense", num_classes=8000) == 131
    assert rows(num_samples=6400, kind="dense", num_classes=32000) == 64  # floor: a chunk is never tiny in rows
    assert rows(num_samples=600, kind="dense", num_classes=10) == 600  # one chunk: no padding to 1024 rows
    # top-32 of 50k classes per token of 128: (32 x (2 + 2) + 4) bytes x 128 tokens a row
    per_chunk = 2 * 1024 * 1024 // (132 * 128)
    assert rows(num_samples=per_chunk * 10, kind="topk", num_classes=50_000, top_k=32, tokens=128) == per_chunk
    for n in (1, 63, 4697, 100_001):  # chunks are even: the last one is never mostly padding
        size = rows(num_samples=n, kind="topk", num_classes=256, top_k=8, tokens=128)
        chunks = -(-n // size)
        assert chunks * size - n < chunks


def test_zstd_codec_round_trips_and_is_recorded(tmp_path, teacher_weights, cache_path):
    from pipeline.jobs import run_caching
    from stages.cache_teacher import CacheTeacherConfig

    zstd = run_caching(CacheTeacherConfig(teacher="mlp-64", teacher_weights=teacher_weights, dataset=DATASET,
                                          out=tmp_path / "z.zarr", temperature=TEMPERATURE, chunk_rows=CHUNK_ROWS, codec="zstd"))
    plain, packed = zarr.open_group(str(cache_path), mode="r"), zarr.open_group(str(zstd.cache), mode="r")
    assert packed.attrs["codec"] == "zstd(level=3)"
    np.testing.assert_array_equal(plain["logits"][:], packed["logits"][:])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_all_finite_by_exponent_bits(dtype):
    from stages.cache import all_finite

    values = np.random.default_rng(0).normal(size=(50, 7)).astype(dtype) * 100
    assert all_finite(values)
    for bad in (np.nan, np.inf, -np.inf):
        broken = values.copy()
        broken[13, 4] = bad
        assert not all_finite(broken)
    assert all_finite(np.array([np.finfo(dtype).max, np.finfo(dtype).tiny, 0.0], dtype=dtype))


def test_teacher_pass_reports_rows_done(tmp_path, teacher_weights):
    from stages import cache_teacher

    calls = []
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "p.zarr",
                                              chunk_rows=CHUNK_ROWS, batch_size=100, device="cpu")
    cache_teacher.run(config, teacher, split, progress=lambda done, total: calls.append((done, total)))
    # A teacher batch never crosses a chunk (stages.cache_teacher.chunk_batches): batches of 100
    # over chunks of 64 rows are the chunks themselves.
    assert calls == [(min(done, 600), 600) for done in range(64, 704, 64)]


def _teacher_cache(tmp_path, kind: str):
    """A small cache of `kind` (dense, topk, tokens, views) with its teacher, the teacher's inputs
    for every stored row (views replayed from their seeds), and T."""
    from stages import cache_teacher
    from stages.augment import parse_augment

    if kind == "tokens":
        dataset, spec, shape, classes = "stdlib-bytes:seq=8,train=200,test=20", "bytelm:dim=16,layers=1,heads=2", (8,), 256
    elif kind == "views":
        dataset, spec, shape, classes = "digits", "cnn", (1, 8, 8), 10
    else:
        dataset, spec, shape, classes = DATASET, "mlp-64", (8,), 4
    split = resolve_dataset(dataset).split("train")
    torch.manual_seed(0)
    teacher = resolve_model(spec, num_classes=classes, input_shape=shape).eval()
    extra = {"format": "topk", "top_k": 3} if kind == "topk" else {"augment": "shift:1", "views": 3} if kind == "views" else {}
    config = cache_teacher.CacheTeacherConfig(teacher=spec, dataset=dataset, out=tmp_path / f"{kind}.zarr", temperature=2.0,
                                              chunk_rows=128, batch_size=64, device="cpu", **extra)
    path = cache_teacher.run(config, teacher, split).cache
    group = zarr.open_group(str(path), mode="r")
    inputs = split.inputs(group["index"][:])
    if kind == "views":
        inputs = parse_augment("shift:1")(inputs.repeat_interleave(3, dim=0), group["view_seeds"][:].reshape(-1))
    with torch.no_grad():
        probs = torch.softmax(teacher(inputs).double() / 2.0, dim=-1).numpy()
    return path, probs.reshape(*group["index"].shape, *probs.shape[1:]) if kind != "views" else probs.reshape(-1, 3, classes)


@pytest.mark.parametrize(("kind", "dims"), [
    ("dense", {"logits": ("sample", "class")}),
    ("topk", {"topk_values": ("sample", "rank"), "topk_indices": ("sample", "rank"), "logsumexp": ("sample",)}),
    ("tokens", {"logits": ("sample", "token", "class"), "labels": ("sample", "token"), "lengths": ("sample",)}),
    ("views", {"logits": ("sample", "view", "class"), "view_seeds": ("sample", "view"), "labels": ("sample",)}),
])
def test_xarray_reads_every_kind_with_named_dimensions(tmp_path, kind, dims):
    """xarray (a client this project did not write) opens each kind of cache and its softmax is
    the teacher's at T."""
    xr = pytest.importorskip("xarray")
    path, expected = _teacher_cache(tmp_path, kind)
    ds = xr.open_zarr(str(path), zarr_format=3, consolidated=False)
    for name, names in {**dims, "index": ("sample",), "chunk_done": ("chunk",)}.items():
        assert ds[name].dims == names, name
    if kind == "topk":
        kept = np.exp(ds["topk_values"].astype("float64") - ds["logsumexp"]).values
        np.testing.assert_allclose(kept, np.take_along_axis(expected, ds["topk_indices"].values.astype(np.int64), -1), atol=2e-3)
        return
    logits = ds["logits"].astype("float64")
    probs = (np.exp(logits - logits.max("class")) / np.exp(logits - logits.max("class")).sum("class")).values
    if kind == "tokens":  # padding positions hold zeros, not the teacher's outputs
        valid = np.arange(8)[None, :] < ds["lengths"].values[:, None]
        probs, expected = probs[valid], expected[valid]
    np.testing.assert_allclose(probs, expected, atol=2e-3)


def test_every_chunk_of_every_array_carries_a_crc32c_checksum(cache_path):
    group = zarr.open_group(str(cache_path), mode="r")
    for name in group.array_keys():
        assert type(group[name].metadata.codecs[-1]).__name__ == "Crc32cCodec", name  # last: after zstd where there is one


def test_a_schema_2_cache_without_checksums_still_reads_and_trains(cache_path, tmp_path):
    from pipeline.bench import without_checksums
    from tests.conftest import invoke_json

    old = tmp_path / "schema2.zarr"
    without_checksums(cache_path, old)
    zarr.open_group(str(old), mode="r+").attrs.update({"schema_version": 2, "tool": {"name": "pipeline", "version": "0.1.0"}})
    assert not any(type(c).__name__ == "Crc32cCodec" for c in zarr.open_group(str(old), mode="r")["logits"].metadata.codecs)
    reader = CacheReader(old)
    np.testing.assert_array_equal(reader.read_chunk(3)["logits"], CacheReader(cache_path).read_chunk(3)["logits"])
    run = invoke_json("train-student", "--cache", old, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run")
    assert run["test_samples"] == 200
    assert invoke_json("verify", old)["ok"]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_the_codec_is_the_arrays_own_not_only_an_attribute(tmp_path, teacher_weights, codec):
    """What --codec names is what zarr writes the soft labels with: their array metadata, read by
    plain zarr, lists the compressor (the attribute alone would not show it)."""
    from zarr.codecs import ZstdCodec

    from tests.conftest import invoke_json

    out = tmp_path / f"{codec}.zarr"
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                "--chunk-rows", CHUNK_ROWS, "--codec", codec, "--out", out)
    logits = zarr.open_group(str(out), mode="r")["logits"]
    zstd = [c for c in logits.compressors if isinstance(c, ZstdCodec)]
    assert [c.level for c in zstd] == ([3] if codec == "zstd" else [])
