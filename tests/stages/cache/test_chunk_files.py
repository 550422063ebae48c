"""stages/cache/chunk_files.py: a local array's rows read straight from its chunk files give
exactly what zarr gives, for every codec chain a cache uses (sharded or not), report damage as
zarr does, and leave every other array to zarr; and the reader built on them (values checked
once per chunk, checksums on every read, buffers reused between epochs)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from stages.cache.chunk_files import ChunkFiles
from stages.errors import CacheDamagedError
from tests.stages.cache.conftest import _complete_cache, _write

CODECS = {"plain": [], "crc32c": [Crc32cCodec()], "zstd+crc32c": [ZstdCodec(level=3), Crc32cCodec()], "zstd": [ZstdCodec(level=1)]}


def _array(tmp_path, *, dtype="float16", row_shape=(3, 4), codecs="crc32c", shard_chunks=None, rows=250, chunk_rows=16,
           written=None, fill=float("nan")):
    """A zarr array chunked along its first axis as a cache's, with rows `written` (default all) set."""
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    shards = None if shard_chunks is None else (chunk_rows * shard_chunks, *row_shape)
    array = group.create_array("a", shape=(rows, *row_shape), chunks=(chunk_rows, *row_shape), shards=shards, dtype=dtype,
                               fill_value=fill, compressors=CODECS[codecs] or None)
    values = np.random.default_rng(0).integers(0, 200, (rows, *row_shape)).astype(dtype)
    for start, stop in written or [(0, rows)]:
        array[start:stop] = values[start:stop]
    return array, tmp_path / "g.zarr" / "a"


@pytest.mark.parametrize("shard_chunks", [None, 4])
@pytest.mark.parametrize("codecs", list(CODECS))
@pytest.mark.parametrize("dtype,row_shape", [("float16", (3, 4)), ("float32", ()), ("uint16", (7,)), ("int64", ()), ("uint8", (2, 2))])
def test_reads_exactly_what_zarr_reads(tmp_path, shard_chunks, codecs, dtype, row_shape):
    # chunks 0-1 and 4-5 written, the rest never: they read as the fill value, and say so
    fill = float("nan") if dtype.startswith("float") else 0
    array, folder = _array(tmp_path, dtype=dtype, row_shape=row_shape, codecs=codecs, shard_chunks=shard_chunks,
                           written=[(0, 32), (64, 96)], fill=fill)
    files = ChunkFiles.open(folder)
    assert files is not None and files.shard_rows == (None if shard_chunks is None else 16 * shard_chunks)
    for start, stop in [(0, 250), (0, 32), (5, 27), (16, 96), (64, 96), (70, 71), (96, 250), (240, 250), (33, 40)]:
        got, gaps = files.read(start, stop)
        np.testing.assert_array_equal(got, array[start:stop])
        assert got.dtype == array.dtype
        assert gaps == (not ({*range(start, stop)} <= {*range(0, 32), *range(64, 96)})), (start, stop)


def test_reads_into_the_array_it_is_given(tmp_path):
    array, folder = _array(tmp_path)
    into = np.zeros((64, 3, 4), np.float16)
    got, _ = ChunkFiles.open(folder).read(32, 96, into)
    assert got is into
    np.testing.assert_array_equal(into, array[32:96])


@pytest.mark.parametrize("compressors", [[BloscCodec()], [Crc32cCodec(), ZstdCodec()]])
def test_leaves_other_codecs_to_zarr(tmp_path, compressors):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    group.create_array("a", shape=(10,), chunks=(5,), dtype="float32", compressors=compressors)
    assert ChunkFiles.open(tmp_path / "g.zarr" / "a") is None


def test_leaves_big_endian_and_other_chunkings_to_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    group.create_array("big", shape=(10, 4), chunks=(5, 4), dtype="float32", serializer=BytesCodec(endian="big"))
    group.create_array("cut", shape=(10, 4), chunks=(5, 2), dtype="float32")  # chunked along its rows too
    assert ChunkFiles.open(tmp_path / "g.zarr" / "big") is None
    assert ChunkFiles.open(tmp_path / "g.zarr" / "cut") is None
    assert ChunkFiles.open(tmp_path / "g.zarr" / "absent") is None


def _flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codecs", ["crc32c", "zstd+crc32c"])
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied", "grown"])
def test_damage_to_a_chunk_is_reported_as_zarr_reports_it(tmp_path, codecs, damage):
    array, folder = _array(tmp_path, codecs=codecs)
    chunk = folder / "c" / "2" / "0" / "0"
    data = chunk.read_bytes()
    if damage == "flipped byte":
        _flip_byte(chunk, len(data) // 2)
    else:
        chunk.write_bytes({"truncated": data[:-7], "emptied": b"", "grown": data + b"\0"}[damage])
    files = ChunkFiles.open(folder)
    with pytest.raises(Exception):
        array[32:48]  # zarr refuses it too
    with pytest.raises(CacheDamagedError, match="c/2/0/0"):
        files.read(32, 48)
    files.read(0, 32)  # the other chunks still read


@pytest.mark.parametrize("where", ["index", "inner chunk", "truncated"])
def test_damage_to_a_shard_is_reported(tmp_path, where):
    array, folder = _array(tmp_path, shard_chunks=4)
    shard = folder / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    if where == "index":
        _flip_byte(shard, len(data) - 10)
    elif where == "inner chunk":
        _flip_byte(shard, 5)
    else:
        shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheDamagedError, match="c/0/0/0"):
        ChunkFiles.open(folder).read(0, 16)


def test_the_reader_checks_checksums_on_every_read_and_values_once(tmp_path):
    """A reader range-checks a chunk's values on its first read only, but every read checks the
    chunk's checksum, and a chunk gone since is damage (the cache is complete): damage after the
    first epoch is still caught."""
    reader, logits = _complete_cache(tmp_path)
    np.testing.assert_array_equal(reader.read_chunk(2)["logits"], logits[64:96])
    chunk = tmp_path / "c.zarr" / "logits" / "c" / "2" / "0"
    data = chunk.read_bytes()
    _flip_byte(chunk, 40)
    with pytest.raises(CacheDamagedError, match="chunk 2 cannot be read"):
        reader.read_chunk(2)
    chunk.unlink()  # a complete cache has every chunk: never read as the fill value
    with pytest.raises(CacheDamagedError, match="array logits: chunk 2 is missing"):
        reader.read_chunk(2)
    chunk.write_bytes(data)
    np.testing.assert_array_equal(reader.read_chunk(2)["logits"], logits[64:96])


def test_a_fresh_reader_checks_values_that_pass_their_checksum(tmp_path):
    _complete_cache(tmp_path)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    group["index"][40] = 10_000  # a valid chunk (checksum and all) with an index outside the dataset
    from stages.cache import CacheReader

    with pytest.raises(CacheDamagedError):
        list(CacheReader(tmp_path / "c.zarr", require_complete=False).batches(32, seed=0, epoch=0))


def test_batches_kept_from_one_epoch_are_not_overwritten_by_the_next(tmp_path):
    """The reader reuses its buffers: every batch it gives must own its memory."""
    reader, logits = _complete_cache(tmp_path)
    for shuffle in (True, False):
        kept = [(batch["index"].copy(), batch) for batch in reader.batches(20, seed=1, epoch=0, buffer_chunks=2, shuffle=shuffle)]
        for epoch in (1, 2):  # other orders: other rows land in the reused buffers
            for _ in reader.batches(20, seed=1, epoch=epoch, buffer_chunks=2):
                pass
        for index, batch in kept:
            np.testing.assert_array_equal(batch["index"], index)
            np.testing.assert_array_equal(batch["logits"], logits[index])


def test_a_cache_zarr_writes_without_checksums_reads_the_same(tmp_path):
    """Schema 2 caches (no crc32c): read directly too, with their values checked on every read."""
    writer, logits, labels = _write(tmp_path)
    writer.write_rows(0, {"logits": logits, "index": np.arange(300), "labels": labels})
    writer.close()
    writer.mark_complete({})
    from pipeline.bench import without_checksums
    from stages.cache import CacheReader

    without_checksums(tmp_path / "c.zarr", tmp_path / "plain.zarr")
    reader = CacheReader(tmp_path / "plain.zarr")
    assert reader._files and not any(files.crc for files in reader._files.values())
    batches = list(reader.batches(50, seed=0, epoch=0))
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["logits"] for b in batches]), logits[index])
