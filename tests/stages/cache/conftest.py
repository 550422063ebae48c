"""Helpers shared by the tests of stages/cache: small caches written with the writer itself."""

from __future__ import annotations

import numpy as np

from stages.cache import CacheReader, CacheWriter, Layout
from stages.data import sha256


def _write(tmp_path, n=300, chunk_rows=32, classes=5, name="c.zarr", shard_rows=None):
    layout = Layout(kind="dense", num_samples=n, num_classes=classes, chunk_rows=chunk_rows, dtype="float32", shard_rows=shard_rows)
    # rows in order: the recorded index hash is that of 0..n-1
    writer = CacheWriter.create(tmp_path / name, layout, {"temperature": 1.0, "teachers": [],
                                                          "dataset": {"index_sha256": sha256(np.arange(n))}})
    logits = np.random.default_rng(0).normal(size=(n, classes)).astype(np.float32)
    labels = np.arange(n) % classes
    return writer, logits, labels


def _complete_cache(tmp_path, n=300, chunk_rows=32):
    writer, logits, labels = _write(tmp_path, n=n, chunk_rows=chunk_rows)
    writer.write_rows(0, {"logits": logits, "index": np.arange(n), "labels": labels})
    writer.close()
    writer.mark_complete({})
    return CacheReader(tmp_path / "c.zarr"), logits
