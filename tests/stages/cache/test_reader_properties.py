"""Property-style tests of the training reader (CacheReader.batches) over many geometries: rows,
chunk rows, buffer chunks, batch size, seed, rank and world size, drawn from a fixed seed so a
failure names its geometry and reproduces. At each: every row exactly once per epoch over the
ranks, in disjoint whole chunks; every batch full but the last, which is never under half a batch
(stages.cache.batch_bounds) unless the rank has fewer rows than that in all; the values those of
their rows; the same batches from a fresh reader (what a resumed run reads), a new order next epoch."""

from __future__ import annotations

import numpy as np
import pytest

from stages.cache import CacheReader

from .conftest import _write

GEOMETRIES = 40


def _geometries():
    draw = np.random.default_rng(20261206)
    for _ in range(GEOMETRIES):
        chunk_rows = int(draw.choice([1, 2, 3, 7, 16, 33]))
        rows = int(draw.integers(1, min(60 * chunk_rows, 500)))  # at most 60 chunks: quick to write
        yield pytest.param(
            rows, chunk_rows, int(draw.integers(1, 9)), int(draw.choice([1, 2, 5, 8, 13, 32, 64])),
            int(draw.integers(0, 2**31)), int(draw.choice([1, 1, 2, 3, 4])),
            id=f"rows{rows}-chunk{chunk_rows}",
        )


def _epoch(reader, batch, seed, epoch, buffer_chunks, world):
    """Every rank's batches of one epoch, as lists of (index, logits) arrays."""
    return [[(b["index"].copy(), b["logits"].copy())
             for b in reader.batches(batch, seed=seed, epoch=epoch, buffer_chunks=buffer_chunks, rank=rank, world=world)]
            for rank in range(world)]


@pytest.mark.parametrize(("rows", "chunk_rows", "buffer_chunks", "batch", "seed", "world"), list(_geometries()))
def test_the_reader_keeps_its_promises_at_every_geometry(tmp_path, rows, chunk_rows, buffer_chunks, batch, seed, world):
    writer, logits, labels = _write(tmp_path, n=rows, chunk_rows=chunk_rows, classes=3)
    writer.write_rows(0, {"logits": logits, "index": np.arange(rows), "labels": labels})
    writer.close()
    writer.mark_complete({})
    reader = CacheReader(tmp_path / "c.zarr")
    orders = []
    for epoch in range(2):
        ranks = _epoch(reader, batch, seed, epoch, buffer_chunks, world)
        seen = np.concatenate([index for batches in ranks for index, _ in batches] or [np.empty(0, np.int64)])
        assert np.array_equal(np.sort(seen), np.arange(rows)), "every row exactly once per epoch over the ranks"
        chunks_of = [{int(c) for index, _ in batches for c in index // chunk_rows} for batches in ranks]
        for rank, chunks in enumerate(chunks_of):
            held = sum(len(index) for index, _ in ranks[rank])
            # each row is read once, so holding as many rows as its chunks have means whole chunks
            assert held == sum(min((c + 1) * chunk_rows, rows) - c * chunk_rows for c in chunks), "whole chunks per rank"
            assert all(not chunks & other for other in chunks_of[rank + 1:]), "ranks read disjoint chunks"
            sizes = [len(index) for index, _ in ranks[rank]]
            assert all(size == batch for size in sizes[:-1]), f"rank {rank}: only the last batch may differ: {sizes}"
            if sizes:
                assert sizes[-1] >= min(batch / 2, held) and sizes[-1] < batch * 1.5, (
                    f"rank {rank}: a last batch of {sizes[-1]} rows at a batch of {batch} ({held} rows): {sizes}")
            for index, values in ranks[rank]:
                assert np.array_equal(values, logits[index]), "each row carries its own values"
        fresh = _epoch(CacheReader(tmp_path / "c.zarr"), batch, seed, epoch, buffer_chunks, world)
        assert all(len(a) == len(b) and all(np.array_equal(x[0], y[0]) for x, y in zip(a, b)) for a, b in zip(ranks, fresh)), (
            "a fresh reader (a resumed run) reads the same batches in the same order")
        orders.append(np.concatenate([index for batches in ranks for index, _ in batches]))
    if rows >= 8:
        assert not np.array_equal(orders[0], orders[1]), "each epoch has its own order"
