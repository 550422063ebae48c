"""Reading a local cache's chunks straight from their files, without zarr-python's per-read
machinery.

zarr-python runs every read through an asyncio loop on another thread, and that costs about
0.7 ms per array read whatever its size: a student reading a cache of small rows spent 20 times
longer there than in the bytes (`pipeline bench`'s reader section measures it). A cache's
arrays use a few codecs only (stages.cache.writer creates them): `bytes`, then `zstd` for the
compressed ones, then `crc32c`; or those inside `sharding_indexed` (a shard's index: `bytes`,
`crc32c`). For an array whose metadata names exactly these and is chunked along the sample axis
only, `ChunkFiles` reads each chunk (or the byte range of a run of chunks inside a shard) with
one `pread`, checks its checksum and decodes it in numpy, in the calling thread; file reads,
crc32c and zstd release the GIL, so a prefetch thread overlaps them with the training loop.
(tensorstore reads as fast, but aborts any process forked after it started its threads, as a
DataLoader's workers are.) Any other array, and every cache behind a URL, is read by zarr.

The guarantees are zarr's: a chunk that fails its checksum, or is truncated, raises; a chunk
never written reads as the fill value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import Zstd

from stages.errors import CacheDamagedError

_NO_CHUNK = 2**64 - 1  # a shard index entry (offset, size) of an inner chunk never written
_ZSTD = Zstd()
# The codec chains read here: a chunk's (as stages.cache.writer writes them, and schema 2's without
# crc32c), and a shard index's (zarr's default).
_CHUNK_CODECS = (["bytes", "zstd", "crc32c"], ["bytes", "crc32c"], ["bytes", "zstd"], ["bytes"])
_INDEX_CODECS = (["bytes", "crc32c"],)


class ChunkFiles:
    """One local zarr v3 array of a cache, chunked along its first axis only: its rows read
    straight from the chunk files."""

    def __init__(self, folder: Path, meta: dict, chunk_rows: int, shard_rows: int | None, chunk_codecs: list[dict]):
        self.folder = folder
        self._prefix = f"{folder}/c/"  # chunk keys are joined as strings: pathlib cost 15% of reading small chunks
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = _fill_value(meta["fill_value"], self.dtype)
        self.chunk_rows, self.shard_rows = chunk_rows, shard_rows
        self.crc = any(codec["name"] == "crc32c" for codec in chunk_codecs)
        self.zstd = any(codec["name"] == "zstd" for codec in chunk_codecs)
        # The key of a chunk (or shard) holding rows from its first-axis position: c/i/0/0...
        self._key_tail = "/0" * (len(self.shape) - 1)
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    @classmethod
    def open(cls, folder: Path) -> ChunkFiles | None:
        """The array in `folder`, or None when its metadata is not of a kind this reads (zarr then reads it)."""
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers")
                or meta.get("chunk_grid", {}).get("name") != "regular"
                or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}):
            return None
        shape = meta["shape"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = meta["codecs"]
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            config = codecs[0]["configuration"]
            inner, chunk_codecs = config["chunk_shape"], config["codecs"]
            if (config.get("index_location", "end") != "end" or not _plain_codecs(config["index_codecs"], compressed=False)
                    or outer[0] % inner[0]):
                return None
            shard_rows = outer[0]
        else:
            inner, chunk_codecs, shard_rows = outer, codecs, None
        if list(inner[1:]) != list(shape[1:]) or list(outer[1:]) != list(shape[1:]) or not _plain_codecs(chunk_codecs):
            return None
        try:
            np.dtype(meta["data_type"])
        except TypeError:
            return None
        return cls(folder, meta, inner[0], shard_rows, chunk_codecs)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """Rows start..stop, into `out` (C-contiguous) when given, and whether a chunk of them
        was never written (it reads as the fill value). A whole uncompressed chunk is read
        straight into the result (its checksum into a 4-byte buffer beside it: one `preadv`,
        no copy); others are decoded."""
        out = np.empty((stop - start, *self.shape[1:]), self.dtype) if out is None else out
        gaps = False
        into = out.reshape(-1).view(np.uint8)
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        per_object = 1 if self.shard_rows is None else self.shard_rows // self.chunk_rows
        for key in range(first // per_object, last // per_object + 1):
            chunks = range(max(first, key * per_object), min(last, key * per_object + per_object - 1) + 1)
            path = f"{self._prefix}{key}{self._key_tail}"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # never written: the fill value, as zarr reads it
                out[max(chunks[0] * self.chunk_rows, start) - start : min((chunks[-1] + 1) * self.chunk_rows, stop) - start] = self.fill
                gaps = True
                continue
            try:
                for chunk, (offset, nbytes) in zip(chunks, self._extents(fd, path, key, chunks)):
                    chunk_start = chunk * self.chunk_rows
                    lo, hi = max(start, chunk_start), min(stop, chunk_start + self.chunk_rows)
                    if offset is None:
                        out[lo - start : hi - start] = self.fill
                        gaps = True
                    elif not self.zstd and hi - lo == self.chunk_rows:
                        self._read_into(fd, into[(lo - start) * self._row_bytes : (hi - start) * self._row_bytes], offset, nbytes, path)
                    else:
                        values = self._decode(_pread(fd, nbytes, offset), path)
                        out[lo - start : hi - start] = values[lo - chunk_start : hi - chunk_start]
            finally:
                os.close(fd)
        return out, gaps

    def _extents(self, fd: int, path: str, key: int, chunks: range) -> list[tuple[int | None, int]]:
        """(offset, bytes) of each of `chunks` in the object `key` open as `fd` ((None, 0): never
        written): the whole file, or the entries of a shard's index (checksummed, at its end)."""
        size = os.fstat(fd).st_size
        if self.shard_rows is None:
            return [(0, size)]
        per_shard = self.shard_rows // self.chunk_rows
        index_bytes = 16 * per_shard + 4
        if size < index_bytes:
            raise CacheDamagedError(f"{path}: a shard of {size} bytes is shorter than its index ({index_bytes})")
        index = _checked(_pread(fd, index_bytes, size - index_bytes), path).view("<u8").reshape(per_shard, 2)
        extents = []
        for offset, nbytes in index[chunks[0] - key * per_shard : chunks[-1] - key * per_shard + 1].tolist():
            if offset == _NO_CHUNK:
                extents.append((None, 0))
            elif offset + nbytes > size - index_bytes:
                raise CacheDamagedError(f"{path}: its index points past the shard's end (truncated)")
            else:
                extents.append((offset, nbytes))
        return extents

    def _read_into(self, fd: int, target: np.ndarray, offset: int, nbytes: int, path: str) -> None:
        """Read an uncompressed chunk stored at `offset` (`nbytes`, its checksum included) into `target` (uint8)."""
        expected = len(target) + (4 if self.crc else 0)
        crc = bytearray(4)
        got = os.preadv(fd, [target, crc] if self.crc else [target], offset) if nbytes == expected else -1
        if got != expected:
            raise CacheDamagedError(f"{path}: a chunk of {nbytes} bytes, expected {expected} (truncated or torn)")
        if self.crc and google_crc32c.value(target) != int.from_bytes(crc, "little"):
            raise CacheDamagedError(f"{path}: checksum mismatch (a flipped bit, or a torn or truncated write)")

    def _decode(self, data: np.ndarray, path: str) -> np.ndarray:
        """A chunk's values from its stored bytes (uint8)."""
        if self.crc:
            data = _checked(data, path)
        if self.zstd:
            data = np.frombuffer(_ZSTD.decode(data), np.uint8)
        if len(data) != self.chunk_rows * self._row_bytes:
            raise CacheDamagedError(f"{path}: a chunk of {len(data)} bytes, expected {self.chunk_rows * self._row_bytes}")
        return data.view(self.dtype).reshape(self.chunk_rows, *self.shape[1:])


def _pread(fd: int, size: int, offset: int) -> np.ndarray:
    return np.frombuffer(os.pread(fd, size, offset), np.uint8)


def _checked(data: np.ndarray, path: str) -> np.ndarray:
    """`data` (uint8) without its trailing crc32c, which must match it."""
    if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:].tobytes(), "little"):
        raise CacheDamagedError(f"{path}: checksum mismatch (a flipped bit, or a torn or truncated write)")
    return data[:-4]


def _plain_codecs(codecs: list[dict], compressed: bool = True) -> bool:
    """Whether `codecs` are `bytes` (little-endian), optionally `zstd`, optionally `crc32c`, in that order."""
    names = [codec["name"] for codec in codecs]
    allowed = _CHUNK_CODECS if compressed else _INDEX_CODECS
    return names in allowed and codecs[0].get("configuration", {}).get("endian", "little") == "little"


def _fill_value(value, dtype: np.dtype):
    if isinstance(value, str):  # "NaN", "Infinity", "-Infinity" in zarr's JSON
        return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(value, value))
    return np.array(value).astype(dtype)
