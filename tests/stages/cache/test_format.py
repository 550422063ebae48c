"""stages/cache/format.py: what cache-teacher writes, read back with plain zarr and other clients,
the attributes that describe it, the chunking, and the checks a cache's attributes, arrays and
rows must pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.cache import (
    FORMAT, SCHEMA_VERSION, CacheReader, CacheWriter, ChunkGrid, Layout, default_chunk_rows, is_cache, malformed_attributes,
)
from stages.cache.format import array_problems, row_problem
from stages.cache.layout import SHARD_ABOVE_BYTES, default_shard_rows
from stages.errors import InputError
from tests.conftest import CHUNK_ROWS, DATASET, SHARD_ROWS, TEMPERATURE
from tests.stages.cache.conftest import _complete_cache


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
    assert attrs["shard_rows"] is None  # a small cache is unsharded by default
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
    assert rows(num_samples=per_chunk * 10, kind="topk", num_classes=50_000, options={"top_k": 32}, tokens=128) == per_chunk
    for n in (1, 63, 4697, 100_001):  # chunks are even: the last one is never mostly padding
        size = rows(num_samples=n, kind="topk", num_classes=256, options={"top_k": 8}, tokens=128)
        chunks = -(-n // size)
        assert chunks * size - n < chunks


def test_default_sharding_leaves_small_caches_unsharded_and_shards_large_ones_by_64_to_128_mib():
    def sharding(num_samples, chunk_rows, **layout) -> tuple[int | None, float]:
        """Rows per shard, and MiB of the largest soft-label array per shard."""
        layout = Layout(num_samples=num_samples, chunk_rows=chunk_rows, **layout)
        largest = max(np.dtype(a.dtype).itemsize * np.prod(a.shape) for a in layout.soft_kind.arrays(layout).values())
        rows = default_shard_rows(layout)
        return rows, rows and rows * largest / 2**20

    at_threshold = SHARD_ABOVE_BYTES // 2000  # rows of 1,000 float16 classes
    assert sharding(at_threshold, 1024, kind="dense", num_classes=1000) == (None, None)
    assert sharding(at_threshold + 1, 1024, kind="dense", num_classes=1000) == (32 * 1024, 62.5)  # 64 MiB, in whole chunks
    assert sharding(10**7, 1021, kind="dense", num_classes=1000) == (65 * 1021, pytest.approx(126.6, abs=0.1))  # at most 128 MiB
    # a top-32 token cache of 20 M tokens at an 8,192 vocabulary: 2.5 GiB of soft labels, 16 KiB a row in
    # the largest arrays (values, classes), 1.2 GiB of each: a sixteenth, 76 MiB, in 17 shards of 76 chunks
    tokens = {"kind": "topk", "num_classes": 8192, "options": {"top_k": 32}, "tokens": 256}
    assert sharding(78_125, 64, **tokens) == (76 * 64, 76.0)
    assert sharding(1024, 64, **tokens) == (None, None)  # 33 MiB: unsharded
    assert sharding(10**5, 10**5, kind="dense", num_classes=10**4) == (None, None)  # one chunk is more than a shard


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
    extra = {"format": "topk", "kind_options": {"top_k": 3}} if kind == "topk" else {"augment": "shift:1", "views": 3} if kind == "views" else {}
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


def test_plain_zarr_and_xarray_read_a_sharded_cache_as_the_unsharded_one(cache_path, sharded_cache_path):
    """Sharding is the storage's business: a client that knows nothing of it (zarr's own
    indexing, xarray) reads the same values, and only the unsharded cache is a file per chunk."""
    xr = pytest.importorskip("xarray")
    plain, sharded = (zarr.open_group(str(path), mode="r") for path in (cache_path, sharded_cache_path))
    assert sharded.attrs["shard_rows"] == SHARD_ROWS and sharded["logits"].shards == (SHARD_ROWS, 4)
    for name in ("logits", "index", "labels"):
        np.testing.assert_array_equal(sharded[name][:], plain[name][:])
        np.testing.assert_array_equal(sharded[name].oindex[[5, 130, 599]], plain[name].oindex[[5, 130, 599]])
    ds = xr.open_zarr(str(sharded_cache_path), zarr_format=3, consolidated=False)
    assert ds["logits"].dims == ("sample", "class") and ds["chunk_done"].dims == ("chunk",)
    np.testing.assert_array_equal(ds["logits"].values, plain["logits"][:])
    files = {path: sum(1 for _ in (path / "logits").rglob("c/**/*") if _.is_file()) for path in (cache_path, sharded_cache_path)}
    assert files == {cache_path: 10, sharded_cache_path: 5}  # 600 rows: 10 chunks of 64, 5 shards of 128


# The attributes docs/cache-format.md says every cache has.
REQUIRED = ("format", "schema_version", "kind", "temperature", "num_classes", "num_samples", "row_shape", "chunk_rows",
            "dtype", "teachers", "dataset", "complete")


@pytest.mark.parametrize("name", REQUIRED)
def test_a_missing_required_attribute_is_named_and_a_sound_cache_has_none(tmp_path, name):
    reader, _ = _complete_cache(tmp_path)
    assert malformed_attributes(reader.attrs) == []
    assert malformed_attributes({k: v for k, v in reader.attrs.items() if k != name}) == [name]


@pytest.mark.parametrize(("name", "value"), [
    ("num_samples", True), ("temperature", False), ("chunk_rows", True),  # a JSON boolean is never a number
    ("complete", 1),  # nor a number a boolean
    ("num_classes", "5"), ("schema_version", 3.0), ("row_shape", 5), ("teachers", {}), ("dataset", []), ("kind", None),
    ("num_samples", 0), ("num_classes", 0), ("chunk_rows", 0),  # of the right type, out of range
    ("temperature", float("inf")), ("temperature", float("nan")),
])
def test_an_attribute_of_the_wrong_type_or_out_of_range_is_named(tmp_path, name, value):
    reader, _ = _complete_cache(tmp_path)
    assert malformed_attributes({**reader.attrs, name: value}) == [name]


def test_only_a_group_with_the_format_attribute_is_a_cache(tmp_path):
    _complete_cache(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    assert is_cache(tmp_path / "c.zarr")
    for text, name in (("[]", "list.zarr"), ("null", "null.zarr")):  # JSON, but no zarr document
        (tmp_path / name).mkdir()
        (tmp_path / name / "zarr.json").write_text(text)
    for name in ("missing.zarr", "empty", "file.txt", "other.zarr", "bare.zarr", "list.zarr", "null.zarr"):
        assert not is_cache(tmp_path / name), name
    assert not (tmp_path / "missing.zarr").exists()  # asking never creates anything


@pytest.mark.parametrize(("num_samples", "chunk_rows"), [(600, 64), (640, 64), (1, 64), (65, 64), (7, 1)])
def test_the_chunk_grid_tiles_every_row_once_and_only_the_last_chunk_may_be_short(num_samples, chunk_rows):
    grid = ChunkGrid(num_samples, chunk_rows)
    bounds = [grid.rows(chunk) for chunk in range(grid.num_chunks)]
    assert np.concatenate([np.arange(start, stop) for start, stop in bounds]).tolist() == list(range(num_samples))
    assert all(stop - start == chunk_rows for start, stop in bounds[:-1])
    assert 1 <= bounds[-1][1] - bounds[-1][0] <= chunk_rows


LAYOUTS = {
    "dense": {},
    "float32, zstd": {"dtype": "float32", "codec": "zstd"},
    "topk": {"kind": "topk", "options": {"top_k": 3}},
    "tokens": {"tokens": 8},
    "topk tokens": {"kind": "topk", "options": {"top_k": 2}, "tokens": 8},
    "views": {"views": 3},
    "features": {"features": 6},
    "unlabelled views with features": {"views": 3, "features": 6, "labelled": False},
    "sharded": {"shard_rows": 64},
    "sharded topk tokens, zstd": {"kind": "topk", "options": {"top_k": 2}, "tokens": 8, "codec": "zstd", "shard_rows": 96},
}


@pytest.mark.parametrize("fields", LAYOUTS.values(), ids=list(LAYOUTS))
def test_a_layout_is_read_back_from_the_cache_it_created(tmp_path, fields):
    """The writer stores a layout as attributes and arrays; what it reads back is the same layout."""
    layout = Layout(**{"kind": "dense", "num_samples": 100, "num_classes": 5, "chunk_rows": 32, **fields})
    writer = CacheWriter.create(tmp_path / "c.zarr", layout, {"temperature": 1.0, "teachers": [], "dataset": {}})
    writer.abort()
    assert CacheWriter(tmp_path / "c.zarr").layout == layout
    assert CacheReader(tmp_path / "c.zarr", require_complete=False).layout == layout


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "sparse"}, "`format` must be one of"),
    ({"dtype": "int8"}, "`dtype` must be one of"),
    ({"codec": "gzip"}, "`codec` must be one of"),
    ({"views": 2, "tokens": 8}, "augmented views of token sequences are not supported"),
    ({"features": 6, "tokens": 8}, "feature targets are per sample"),
    ({"shard_rows": 6}, r"`shard_rows` must be a multiple of `chunk_rows` \(4\), got 6"),
    ({"shard_rows": 0}, r"`shard_rows` must be a multiple of `chunk_rows` \(4\), got 0"),
])
def test_a_layout_the_format_cannot_hold_is_an_input_error(fields, message):
    with pytest.raises(InputError, match=message):
        Layout(**{"kind": "dense", "num_samples": 10, "num_classes": 5, "chunk_rows": 4, **fields})


def _replace_array(group, name, **changes):
    """Rewrite array `name` of `group` with the same values but other `changes` (chunks, dtype)."""
    old = group[name]
    spec = {"shape": old.shape, "chunks": old.chunks, "dtype": old.dtype, "fill_value": old.fill_value, "compressors": old.compressors,
            **changes}
    values = old[:]
    del group[name]
    group.create_array(name, **spec)[:] = values.astype(spec["dtype"])


@pytest.mark.parametrize(("tamper", "named"), [
    (lambda g: _replace_array(g, "labels", chunks=(16,)), "labels: chunked 16 rows (expected 32)"),
    (lambda g: _replace_array(g, "logits", dtype="float64"), "logits: dtype float64 (expected float32)"),
    (lambda g: _replace_array(g, "labels", shards=(64,)), "labels: 64 rows a shard (expected unsharded)"),
    (lambda g: g.__delitem__("index"), "index: absent (expected (300,))"),
    (lambda g: g.__delitem__("chunk_done"), "chunk_done: absent (expected (10,))"),
    (lambda g: g.attrs.update({"row_shape": [6]}), "row_shape [6] disagrees with num_classes and the kind's options ([5])"),
])
def test_arrays_that_disagree_with_the_attributes_are_named(tmp_path, tamper, named):
    reader, _ = _complete_cache(tmp_path)
    assert array_problems(reader.group, reader.attrs, reader.layout) == []
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    tamper(group)
    attrs = dict(group.attrs)
    assert array_problems(group, attrs, Layout.from_attributes(attrs, labelled=True)) == [named]


def test_row_problems_name_what_is_wrong_and_the_cache_rows_that_hold_it(tmp_path):
    reader, _ = _complete_cache(tmp_path)
    rows, size, layout = reader.read_chunk(2), reader.dataset_size, reader.layout  # cache rows 64-95
    assert row_problem(rows, layout, size, 64) is None
    logits = rows["logits"].copy()
    logits[[3, 9], 1] = [np.nan, -np.inf]
    assert row_problem({**rows, "logits": logits}, layout, size, 64) == "non-finite logits in rows [67, 73]"
    for bad in (-1, size):
        index = rows["index"].copy()
        index[5] = bad
        assert row_problem({**rows, "index": index}, layout, size, 64) == "index entries unwritten or outside the dataset"
    for bad in (-1, layout.num_classes):
        labels = rows["labels"].copy()
        labels[5] = bad
        assert row_problem({**rows, "labels": labels}, layout, size, 64) == "label entries unwritten or outside [0, num_classes)"
