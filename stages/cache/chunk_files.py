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
never written reads as the fill value, unless the array is `strict` (its cache is complete: then
an absent chunk is damage). Beyond zarr's: every file is opened without following a symbolic link
and without blocking (a FIFO), must be a regular file, and may be no larger than its metadata
allows (`max_object_bytes`), so that a link to /dev/zero or a pipe is damage at once; and with a
`seal` (stages.cache.manifest), the checksum a chunk was read with must be the one written at
its position.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable
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


class ChunkDamage(CacheDamagedError):
    """Damage found in chunk `chunk` of an array (its reader names the array): `what` completes
    "chunk N ..." ("cannot be read (...)", "is missing ...")."""

    def __init__(self, chunk: int, what: str):
        super().__init__(f"chunk {chunk} {what}")
        self.chunk, self.what = chunk, what


def chunk_bound(chunk_bytes: int) -> int:
    """The most bytes a chunk of `chunk_bytes` bytes of values may take stored: zstd's worst case
    (a few bytes per 128 KiB block, and a frame header) plus its crc32c."""
    return chunk_bytes + chunk_bytes // 128 + 64 + 4


def max_object_bytes(chunk_bytes: int, per_object: int, sharded: bool) -> int:
    """The most bytes one stored object (a chunk, or a shard of `per_object` chunks and its index) may take."""
    return per_object * chunk_bound(chunk_bytes) + (16 * per_object + 4 if sharded else 0)


def open_regular(path: str, max_bytes: int, chunk: int) -> tuple[int, int] | None:
    """(descriptor, size) of the stored object at `path`, or None when there is none. Never
    follows a symbolic link or waits on a FIFO: anything but a regular file of at most
    `max_bytes` is damage to chunk `chunk` (a link to /dev/zero would be read without end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ChunkDamage(chunk, f"cannot be read ({path} is a symbolic link; a cache's chunks are its own files)") from None
        raise ChunkDamage(chunk, f"cannot be read ({path}: {exc.strerror})") from None
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
               else f"holds {info.st_size} bytes, more than its metadata allows ({max_bytes})" if info.st_size > max_bytes else None)
    if problem:
        os.close(fd)
        raise ChunkDamage(chunk, f"cannot be read ({path} {problem})")
    return fd, info.st_size


class ChunkFiles:
    """One local zarr v3 array of a cache, chunked along its first axis only: its rows read
    straight from the chunk files."""

    def __init__(self, folder: Path, meta: dict, chunk_rows: int, shard_rows: int | None, chunk_codecs: list[dict]):
        self.folder = folder
        self.strict = False  # set for a complete cache: an absent chunk is damage, not the fill value
        # (chunk, the crc32c it was read with) -> whether it is the chunk written there (stages.cache.manifest)
        self.seal: Callable[[int, int], bool] | None = None
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
        per_object = 1 if shard_rows is None else shard_rows // chunk_rows
        self._max_bytes = max_object_bytes(chunk_rows * self._row_bytes, per_object, shard_rows is not None)

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
            opened = open_regular(path, self._max_bytes, chunks[0])
            if opened is None:  # never written: the fill value, as zarr reads it
                if self.strict:
                    raise ChunkDamage(chunks[0], f"is missing ({path} is absent; a complete cache has every chunk)")
                out[max(chunks[0] * self.chunk_rows, start) - start : min((chunks[-1] + 1) * self.chunk_rows, stop) - start] = self.fill
                gaps = True
                continue
            fd, size = opened
            try:
                for chunk, (offset, nbytes) in zip(chunks, self._extents(fd, size, path, chunks)):
                    chunk_start = chunk * self.chunk_rows
                    lo, hi = max(start, chunk_start), min(stop, chunk_start + self.chunk_rows)
                    if offset is None:
                        if self.strict:
                            raise ChunkDamage(chunk, f"is missing (the index of {path} has no entry for it; a complete cache has every chunk)")
                        out[lo - start : hi - start] = self.fill
                        gaps = True
                    elif not self.zstd and hi - lo == self.chunk_rows:
                        self._read_into(fd, into[(lo - start) * self._row_bytes : (hi - start) * self._row_bytes], offset, nbytes, path, chunk)
                    else:
                        values = self._decode(_pread(fd, nbytes, offset), path, chunk)
                        out[lo - start : hi - start] = values[lo - chunk_start : hi - chunk_start]
            finally:
                os.close(fd)
        return out, gaps

    def _extents(self, fd: int, size: int, path: str, chunks: range) -> list[tuple[int | None, int]]:
        """(offset, bytes) of each of `chunks` in the object open as `fd` ((None, 0): never
        written): the whole file, or the entries of its shard's index."""
        if self.shard_rows is None:
            return [(0, size)]
        return shard_extents(lambda offset, nbytes: _pread(fd, nbytes, offset), size, path, self.shard_rows // self.chunk_rows, chunks)

    def _read_into(self, fd: int, target: np.ndarray, offset: int, nbytes: int, path: str, chunk: int) -> None:
        """Read an uncompressed chunk stored at `offset` (`nbytes`, its checksum included) into `target` (uint8)."""
        expected = len(target) + (4 if self.crc else 0)
        crc = bytearray(4)
        got = os.preadv(fd, [target, crc] if self.crc else [target], offset) if nbytes == expected else -1
        if got != expected:
            raise ChunkDamage(chunk, f"cannot be read ({path}: a chunk of {nbytes} bytes, expected {expected} (truncated or torn))")
        if self.crc:
            stored = int.from_bytes(crc, "little")
            if google_crc32c.value(target) != stored:
                raise ChunkDamage(chunk, f"cannot be read ({path}: checksum mismatch (a flipped bit, or a torn or truncated write))")
            self._check_seal(chunk, stored, path)

    def _decode(self, data: np.ndarray, path: str, chunk: int) -> np.ndarray:
        """A chunk's values from its stored bytes (uint8)."""
        if self.crc:
            data, stored = checked(data, path, chunk)
            self._check_seal(chunk, stored, path)
        if self.zstd:
            data = np.frombuffer(_ZSTD.decode(data), np.uint8)
        if len(data) != self.chunk_rows * self._row_bytes:
            raise ChunkDamage(chunk, f"cannot be read ({path}: a chunk of {len(data)} bytes, expected {self.chunk_rows * self._row_bytes})")
        return data.view(self.dtype).reshape(self.chunk_rows, *self.shape[1:])

    def _check_seal(self, chunk: int, stored: int, path: str) -> None:
        if self.seal is not None and not self.seal(chunk, stored):
            raise ChunkDamage(chunk, f"is not the chunk written there ({path}: moved from another position or copied from "
                                     "another cache, or an attribute the manifest binds was edited)")


def shard_extents(read: Callable[[int, int], np.ndarray], size: int, path: str, per_shard: int,
                  chunks: range) -> list[tuple[int | None, int]]:
    """(offset, bytes) of each of `chunks` (numbered in the whole array) in the shard at `path`, of
    `size` bytes, from the entries of its index (checksummed, at its end); (None, 0) for a chunk
    never written. `read(offset, bytes)` reads the shard."""
    index_bytes = 16 * per_shard + 4
    if size < index_bytes:
        raise ChunkDamage(chunks[0], f"cannot be read ({path}: a shard of {size} bytes is shorter than its index ({index_bytes}))")
    index = checked(read(size - index_bytes, index_bytes), path, chunks[0])[0].view("<u8").reshape(per_shard, 2)
    extents = []
    for chunk in chunks:
        offset, nbytes = index[chunk % per_shard].tolist()
        if offset == _NO_CHUNK:
            extents.append((None, 0))
        elif offset + nbytes > size - index_bytes or nbytes < 4:
            raise ChunkDamage(chunk, f"cannot be read ({path}: its index points past the shard's end (truncated))")
        else:
            extents.append((offset, nbytes))
    return extents


def _pread(fd: int, size: int, offset: int) -> np.ndarray:
    return np.frombuffer(os.pread(fd, size, offset), np.uint8)


def checked(data: np.ndarray, path: str, chunk: int) -> tuple[np.ndarray, int]:
    """`data` (uint8) without its trailing crc32c, which must match it, and that crc32c."""
    stored = int.from_bytes(data[-4:].tobytes(), "little") if len(data) >= 4 else None
    if stored is None or google_crc32c.value(data[:-4]) != stored:
        raise ChunkDamage(chunk, f"cannot be read ({path}: checksum mismatch (a flipped bit, or a torn or truncated write))")
    return data[:-4], stored


def _plain_codecs(codecs: list[dict], compressed: bool = True) -> bool:
    """Whether `codecs` are `bytes` (little-endian), optionally `zstd`, optionally `crc32c`, in that order."""
    names = [codec["name"] for codec in codecs]
    allowed = _CHUNK_CODECS if compressed else _INDEX_CODECS
    return names in allowed and codecs[0].get("configuration", {}).get("endian", "little") == "little"


def _fill_value(value, dtype: np.dtype):
    if isinstance(value, str):  # "NaN", "Infinity", "-Infinity" in zarr's JSON
        return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(value, value))
    return np.array(value).astype(dtype)
