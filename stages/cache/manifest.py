"""The chunk manifest (schema 6 on): which chunk was written at each position of a cache.

A chunk's crc32c says that it is intact, not that it is the chunk written where it lies: two
chunks swapped, a chunk or a whole shard copied from another cache of the same geometry, a
shard index whose entries were swapped (its own crc32c recomputed) all still check. So when a
write unit is complete the writer reads back the crc32c each of its chunks was stored with and
records, in the unit's row of `chunk_manifest` (write units, per-row arrays by name, chunks per
unit; uint32),

    crc32c(key || array name || chunk number (8 bytes, little-endian) || the chunk's stored crc32c (4 bytes))

where `key` is the SHA-256 of the cache's random `cache_id` and the attributes that give its
values their meaning (`manifest_key`). A reader computes the same from the crc32c it reads a
chunk with (it checks that crc32c anyway) and compares: a chunk moved or copied from another
cache, the row of another cache's manifest, or an edited `temperature`, `kind_options`... no
longer match. It costs a reader one crc32c of about 60 bytes per chunk read, and the manifest
is read once when the cache is opened.

`StoredChunks` reads an array's stored objects raw, as the manifest needs them (local files, or
objects at a URL): every object a regular file no larger than its metadata allows, never a
symbolic link or a FIFO, and in a complete cache every one present.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable

import google_crc32c
import numpy as np

from stages import storage
from stages.cache.chunk_files import ChunkDamage, checked, max_object_bytes, open_regular, shard_extents
from stages.cache.layout import Layout
from stages.storage import CacheLocation

# Attributes that give the stored values their meaning, bound into every chunk's manifest entry
# (with `cache_id`, the dataset's fingerprint and index hash, and the teachers' weights
# fingerprints): editing one by hand is damage. `complete`, the times, `teacher_metrics` and the
# recorded config change or explain nothing of the values, and stay free.
BOUND_ATTRIBUTES = (
    "format", "schema_version", "stored_values", "kind", "kind_options", "temperature", "num_classes", "num_samples",
    "row_shape", "row_axes", "views", "features", "chunk_rows", "shard_rows", "dtype", "codec", "trained_mask", "teacher_amp",
    "augment", "combine",
)


def manifest_key(attrs: dict) -> bytes:
    """The SHA-256 that binds a cache's manifest entries to this cache and to the meaning of its values."""
    dataset = attrs.get("dataset") if isinstance(attrs.get("dataset"), dict) else {}
    bound = {
        **{name: attrs.get(name) for name in BOUND_ATTRIBUTES},
        "cache_id": attrs.get("cache_id"),
        "dataset": {name: dataset.get(name) for name in ("fingerprint", "index_sha256")},
        "teachers": [t.get("weights_sha256") if isinstance(t, dict) else t for t in attrs.get("teachers") or []],
    }
    return hashlib.sha256(json.dumps(bound, sort_keys=True, default=str).encode()).digest()


def binding(key: bytes, name: str, chunk: int, crc: int) -> int:
    """The manifest entry of chunk `chunk` of array `name` stored with crc32c `crc`."""
    return google_crc32c.value(key + name.encode() + chunk.to_bytes(8, "little") + crc.to_bytes(4, "little"))


class StoredChunks:
    """One array of a cache as stored: which of its chunks exist, and the crc32c each ends in."""

    def __init__(self, location: CacheLocation, name: str, dtype: str, row_shape: tuple[int, ...], rows: int, chunk_rows: int,
                 shard_rows: int | None):
        self.name, self.rows, self.chunk_rows = name, rows, chunk_rows
        self.per_object = 1 if shard_rows is None else shard_rows // chunk_rows
        self.sharded = shard_rows is not None
        chunk_bytes = chunk_rows * np.dtype(dtype).itemsize * math.prod(row_shape)
        self.max_bytes = max_object_bytes(chunk_bytes, self.per_object, self.sharded)
        self.local = not storage.is_url(location)
        self._fs, root = (None, str(location)) if self.local else storage.filesystem(location)
        self._prefix, self._tail = f"{root}/{name}/c/", "/0" * len(row_shape)

    @classmethod
    def of(cls, location: CacheLocation, layout: Layout) -> dict[str, StoredChunks]:
        """Every array of the cache at `location` with `layout`: the per-row ones, then those with a row per write unit."""
        arrays = {name: cls(location, name, spec.dtype, spec.shape, layout.num_samples, layout.chunk_rows, layout.shard_rows)
                  for name, spec in layout.arrays().items()}
        # A unit array's spec has its whole shape, a row per write unit, each its own object.
        arrays.update({name: cls(location, name, spec.dtype, spec.shape[1:], spec.shape[0], 1, None)
                       for name, spec in layout.unit_arrays().items()})
        return arrays

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def path(self, key: int) -> str:
        return f"{self._prefix}{key}{self._tail}"

    def crcs(self, chunks: range, whole: bool = False) -> dict[int, int | None]:
        """The crc32c each of `chunks` ends in as stored (None: never written); with `whole`, each
        chunk's bytes are read and must match it. An object that is not a regular file, is larger
        than its metadata allows or is a shard with a damaged index raises ChunkDamage, and so
        does, with `whole`, a chunk whose bytes do not match its crc32c."""
        found: dict[int, int | None] = {}
        for key in range(chunks[0] // self.per_object, chunks[-1] // self.per_object + 1):
            held = range(max(chunks[0], key * self.per_object), min(chunks[-1], (key + 1) * self.per_object - 1) + 1)
            path = self.path(key)
            opened = self._open(path, held[0])
            if opened is None:
                found.update(dict.fromkeys(held))
                continue
            read, size, close = opened
            try:
                extents = (shard_extents(read, size, path, self.per_object, held) if self.sharded
                           else [(0, size) if size >= 4 else (None, 0)])
                for chunk, (offset, nbytes) in zip(held, extents):
                    if offset is None:
                        found[chunk] = None
                    elif whole:
                        found[chunk] = checked(read(offset, nbytes), path, chunk)[1]
                    else:
                        found[chunk] = int.from_bytes(read(offset + nbytes - 4, 4).tobytes(), "little")
            finally:
                close()
        return found

    def object_problems(self, complete: bool = True) -> list[tuple[int, str, bool]]:
        """(first chunk, what, whether it is absent) for every stored object that is not a regular
        file no larger than the metadata allows, or (of a `complete` cache) absent; without
        reading any of them."""
        problems = []
        listing = None if self.local else self._listing()
        for key in range(-(-self.num_chunks // self.per_object)):
            path, chunk = self.path(key), key * self.per_object
            try:
                if self._present(path, chunk, listing):
                    continue
                if complete:
                    problems.append((chunk, f"is missing ({path} is absent; a complete cache has every chunk)", True))
            except ChunkDamage as damage:
                problems.append((chunk, damage.what, False))
        return problems

    def _present(self, path: str, chunk: int, listing: dict[str, int] | None) -> bool:
        """Whether the object at `path` is there; ChunkDamage when it is but is not a regular file of at most max_bytes."""
        if self.local:
            opened = open_regular(path, self.max_bytes, chunk)  # O_NONBLOCK: a FIFO does not wait
            if opened is not None:
                os.close(opened[0])
            return opened is not None
        if path in listing and listing[path] > self.max_bytes:
            raise ChunkDamage(chunk, f"cannot be read ({path} holds {listing[path]} bytes, more than its metadata allows ({self.max_bytes}))")
        return path in listing

    def _listing(self) -> dict[str, int]:
        folder = self._prefix.rstrip("/")
        self._fs.invalidate_cache(folder)
        if not self._fs.exists(folder):
            return {}
        return {name: int(info["size"]) for name, info in self._fs.find(folder, detail=True).items()}

    def _open(self, path: str, chunk: int) -> tuple[Callable[[int, int], np.ndarray], int, Callable[[], None]] | None:
        """(read(offset, bytes), size, close) of the object at `path`, or None when it is absent."""
        if self.local:
            opened = open_regular(path, self.max_bytes, chunk)
            if opened is None:
                return None
            fd, size = opened
            return (lambda offset, nbytes: np.frombuffer(os.pread(fd, nbytes, offset), np.uint8)), size, lambda: os.close(fd)
        # fsspec remembers listings (remove_partial_files lists the whole cache): an object written
        # since would look absent.
        self._fs.invalidate_cache(path)
        try:
            size = self._fs.size(path)
        except FileNotFoundError:
            return None
        if size > self.max_bytes:
            raise ChunkDamage(chunk, f"cannot be read ({path} holds {size} bytes, more than its metadata allows ({self.max_bytes}))")
        return (lambda offset, nbytes: np.frombuffer(self._fs.cat_file(path, start=offset, end=offset + nbytes), np.uint8)), size, lambda: None


class Manifest:
    """A complete cache's manifest, read once: checks that a chunk read is the one written at its position."""

    def __init__(self, attrs: dict, layout: Layout, values: np.ndarray):
        self.key = manifest_key(attrs)
        self.values = values
        self.per_unit = layout.chunks_per_unit
        self.position = {name: i for i, name in enumerate(layout.manifest_arrays)}

    def matches(self, name: str, chunk: int, crc: int) -> bool:
        return self.seal(name)(chunk, crc)

    def seal(self, name: str) -> Callable[[int, int], bool]:
        """`matches` for array `name`: (chunk, crc32c it was read with) -> whether it is the chunk written there."""
        return functools.partial(_matches, self.values[:, self.position[name]], self.per_unit, self.key + name.encode())


def _matches(entries: np.ndarray, per_unit: int, prefix: bytes, chunk: int, crc: int) -> bool:
    """Whether `crc` is what `entries` (one array's, by write unit) bind to chunk `chunk`: on every
    chunk a reader reads, so the key and name are joined once (`prefix`), as `binding` joins them."""
    return entries.item(chunk // per_unit, chunk % per_unit) == google_crc32c.value(
        prefix + chunk.to_bytes(8, "little") + crc.to_bytes(4, "little"))


def check_stored(stored: StoredChunks, chunks: range, manifest: Manifest | None) -> None:
    """Raise ChunkDamage for the first of `chunks` of an array that is missing (the array is of a
    complete cache) or, with a `manifest`, is not the chunk written at its position."""
    for chunk, crc in stored.crcs(chunks).items():
        if crc is None:
            raise ChunkDamage(chunk, "is missing (absent from its shard or folder; a complete cache has every chunk)")
        if manifest is not None and not manifest.matches(stored.name, chunk, crc):
            stored.crcs(range(chunk, chunk + 1), whole=True)  # a torn or truncated chunk is named as such
            raise ChunkDamage(chunk, "is not the chunk written there (moved from another position or copied from another "
                                     "cache, or an attribute the manifest binds was edited)")


def unit_entries(location: CacheLocation, layout: Layout, attrs: dict, unit: int) -> np.ndarray:
    """The manifest row of write unit `unit`, from the crc32c its chunks were stored with: for the
    writer, once every array's rows of the unit are written."""
    key = manifest_key(attrs)
    chunks = layout.chunks_of(unit)
    row = np.zeros((len(layout.manifest_arrays), layout.chunks_per_unit), np.uint32)
    for position, name in enumerate(layout.manifest_arrays):
        spec = layout.arrays()[name]
        stored = StoredChunks(location, name, spec.dtype, spec.shape, layout.num_samples, layout.chunk_rows, layout.shard_rows)
        for chunk, crc in stored.crcs(chunks).items():
            if crc is None:
                raise ChunkDamage(chunk, f"of {name} is missing right after it was written")
            row[position, chunk - chunks[0]] = binding(key, name, chunk, crc)
    return row
