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


def as_schema(path, version: int, **attributes) -> None:
    """Make the cache at `path` one of an older schema, as its writer left it: without the chunk
    manifest and the cache id it binds (schema 6 on), at schema `version`, with `attributes`."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    del group["chunk_manifest"]
    del group.attrs["cache_id"]
    group.attrs.update({"schema_version": version, **attributes})


def reseal(path) -> None:
    """Record the chunks of the cache at `path` as they are now in its manifest, as if its writer
    had written them: a test that edits values with plain zarr reaches the checks of the values
    themselves, past the manifest's (which would catch any edit)."""
    import zarr

    from stages.cache.manifest import unit_entries

    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    layout = Layout.from_attributes(attrs, labelled="labels" in group)
    for unit in range(layout.write_grid.num_chunks):
        group["chunk_manifest"][unit] = unit_entries(path, layout, attrs, unit)
