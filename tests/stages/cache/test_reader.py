"""stages/cache/reader.py: opening a cache (and refusing one it cannot trust), reading rows and
chunks, and streaming them in shuffled whole chunks."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import zarr

from stages.cache import SCHEMA_VERSION, CacheReader, batch_bounds, prefetch
from stages.errors import CacheDamagedError, CacheMismatchError, InputError
from tests.stages.cache.conftest import _complete_cache, _write, as_schema, reseal


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


def test_a_schema_3_cache_without_shard_rows_reads_as_unsharded(cache_path, tmp_path):
    from tests.conftest import invoke_json

    old = tmp_path / "schema3.zarr"
    shutil.copytree(cache_path, old)
    group = zarr.open_group(str(old), mode="r+")
    del group.attrs["shard_rows"]
    as_schema(old, 3, tool={"name": "pipeline", "version": "0.2.0"})
    reader = CacheReader(old)
    assert reader.layout.shard_rows is None and reader.layout.write_grid == reader.grid
    np.testing.assert_array_equal(reader.read_chunk(3)["logits"], CacheReader(cache_path).read_chunk(3)["logits"])
    report = invoke_json("verify", old)
    assert report["ok"] and "10 chunks readable" in next(c["detail"] for c in report["checks"] if c["check"] == "chunks")


@pytest.mark.parametrize("name", ["schema_version", "kind", "temperature", "num_classes", "num_samples", "row_shape",
                                  "chunk_rows", "dtype", "teachers", "dataset", "complete"])
def test_a_cache_missing_a_required_attribute_is_refused_as_damage_naming_it(tmp_path, name):
    _complete_cache(tmp_path)
    del zarr.open_group(str(tmp_path / "c.zarr"), mode="r+").attrs[name]
    with pytest.raises(CacheDamagedError, match=f"attributes missing or malformed: {name}=None; run pipeline verify"):
        CacheReader(tmp_path / "c.zarr")


def test_a_kind_this_version_does_not_know_is_a_mismatch_not_damage(tmp_path):
    _complete_cache(tmp_path)
    zarr.open_group(str(tmp_path / "c.zarr"), mode="r+").attrs["kind"] = "sparse"
    with pytest.raises(CacheMismatchError, match="cache kind 'sparse' is not supported by this tool version"):
        CacheReader(tmp_path / "c.zarr")


def test_an_incomplete_cache_opens_when_completeness_is_not_required_and_its_gap_reads_as_damage(tmp_path):
    writer, logits, labels = _write(tmp_path)
    writer.write_rows(0, {"logits": logits[:64], "index": np.arange(64), "labels": labels[:64]})
    writer.close()  # chunks 0 and 1 written, 2-9 never
    with pytest.raises(CacheMismatchError, match="incomplete"):
        CacheReader(tmp_path / "c.zarr")
    reader = CacheReader(tmp_path / "c.zarr", require_complete=False)
    np.testing.assert_array_equal(reader.read_chunks(0, 1)["logits"], logits[:64])
    with pytest.raises(CacheDamagedError, match=r"chunk 2 holds non-finite logits in rows \[64, 65, 66, 67, 68\]"):
        reader.read_chunk(2)


def test_a_non_finite_value_is_named_by_chunk_and_row_and_the_other_chunks_still_read(tmp_path):
    _, logits = _complete_cache(tmp_path)
    zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")["logits"][70, 2] = np.inf
    reseal(tmp_path / "c.zarr")  # as if written so: the manifest would catch the edit first
    reader = CacheReader(tmp_path / "c.zarr")
    with pytest.raises(CacheDamagedError, match=r"chunk 2 holds non-finite logits in rows \[70\]"):
        reader.read_chunk(2)
    with pytest.raises(CacheDamagedError, match=r"chunks 1-3 holds non-finite logits in rows \[70\]"):
        reader.read_chunks(1, 3)
    np.testing.assert_array_equal(reader.read_chunks(0, 1)["logits"], logits[:64])
    np.testing.assert_array_equal(reader.read_rows(96, 300)["logits"], logits[96:])


def test_the_ranks_of_an_epoch_read_disjoint_whole_chunks_that_together_cover_every_row(tmp_path):
    reader, logits = _complete_cache(tmp_path)
    world = 3

    def rows_of(rank: int, epoch: int) -> np.ndarray:
        batches = list(reader.batches(16, seed=4, epoch=epoch, rank=rank, world=world))
        index = np.concatenate([b["index"] for b in batches])
        np.testing.assert_array_equal(np.concatenate([b["logits"] for b in batches]), logits[index])
        return index

    parts = [rows_of(rank, 0) for rank in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))  # every row once, across the ranks
    for part in parts:  # whole chunks: a rank holding a row of a chunk holds all of it
        whole = [row for chunk in sorted(set(part // 32)) for row in range(*reader.grid.rows(chunk))]
        assert sorted(part.tolist()) == whole
    assert set(rows_of(0, 1) // 32) != set(parts[0] // 32)  # each epoch deals the chunks out anew


def test_a_rank_without_a_chunk_this_epoch_gets_no_batch(tmp_path):
    reader, _ = _complete_cache(tmp_path, n=40)  # two chunks, three ranks
    counts = [sum(len(b["index"]) for b in reader.batches(8, seed=0, epoch=0, rank=rank, world=3)) for rank in range(3)]
    assert sorted(counts) == [0, 8, 32]


def test_names_limit_the_arrays_read_and_batches_always_carry_the_index(tmp_path):
    reader, logits = _complete_cache(tmp_path)
    assert set(reader.read_rows(10, 20, ("labels",))) == {"labels"}
    batches = list(reader.batches(50, seed=0, epoch=0, names=("logits",)))
    assert all(set(batch) == {"index", "logits"} for batch in batches)
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(300))
    np.testing.assert_array_equal(np.concatenate([b["logits"] for b in batches]), logits[index])


def test_prefetch_gives_every_item_in_order_then_raises_the_producers_error():
    def items():
        yield from range(5)
        raise ValueError("the source failed after item 4")

    got = []
    with pytest.raises(ValueError, match="after item 4"):
        for item in prefetch(items(), depth=2):
            got.append(item)
    assert got == list(range(5))


def test_abandoning_prefetch_stops_its_producer_which_never_runs_more_than_depth_ahead():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    before = set(threading.enumerate())
    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    (producer,) = [t for t in threading.enumerate() if t not in before and t.name == "prefetch"]
    stream.close()
    producer.join(timeout=1800)
    assert not producer.is_alive()
    assert len(produced) <= 3 + 2 + 1  # consumed, queued (depth), and the one it was offering


@pytest.mark.parametrize("kind, options", [
    ("dense", {}), ("topk", {"top_k": 2}), ("qtopk", {"top_k": 2, "value_bits": 4}), ("sampled", {"samples": 5, "sample_seed": 3}),
])
def test_a_schema_4_cache_with_its_kinds_options_as_attributes_of_their_own_reads_trains_and_resumes(
        tmp_path, teacher_weights, kind, options):
    """Before schema 5, a cache kept `top_k` (null for other kinds), `value_bits`, `samples` and
    `sample_seed` as attributes of their own; they are read as the kind's options."""
    from tests.conftest import cache_with_cli, invoke_json

    flags = [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    old = cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--format", kind, *flags)["cache"]
    group = zarr.open_group(str(old), mode="r+")
    assert group.attrs["kind_options"] == options
    del group.attrs["kind_options"]
    as_schema(old, 4, top_k=options.get("top_k"), samples=options.get("samples"), **{
        name: value for name, value in options.items() if name in ("value_bits", "sample_seed")})
    group = zarr.open_group(str(old), mode="r+")
    assert CacheReader(old).layout.options.attributes() == options
    assert invoke_json("verify", old)["ok"]
    assert invoke_json("train-student", "--cache", old, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run")["mode"] == "distilled"
    group["chunk_done"][0] = 0  # an unfinished schema 4 cache: the same command resumes it
    group.attrs["complete"] = False
    assert cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--format", kind, *flags)["chunks_computed"] == 1
