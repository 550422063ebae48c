"""The cache writer: creating or resuming a cache, writing whole write units (shards, or chunks
when unsharded) from a background thread, and the lifecycle of one pass (`writing`): lock, open,
write, close or abort, teacher metrics, mark complete. The format is described in
stages.cache.format."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from stages import __version__, storage
from stages.cache.format import (
    FORMAT, SCHEMA_VERSION, STORED_VALUES, Rows, dataset_size, is_cache, now_iso, row_problem, unreadable_chunks,
)
from stages.cache.layout import ZSTD_LEVEL, ChunkGrid, Layout, recorded_options
from stages.cache.manifest import unit_entries
from stages.errors import CacheDamagedError, InputError, PipelineError
from stages.kinds.base import valid_positions
from stages.storage import CacheLocation

log = logging.getLogger(__name__)


def remove_cache(path: CacheLocation) -> None:
    """Delete an existing cache to overwrite it; refuse to delete anything that is not one."""
    if not storage.is_empty(path) and not is_cache(path):
        raise InputError(f"{path} exists and is not a cache; refusing to delete it")
    storage.remove(path)


class CacheWriter:
    """Creates a cache and writes whole write units of rows from a background thread.

    The write units are the cache's shards, or its chunks when it is unsharded (`grid` is its
    layout's write_grid): zarr rewrites a whole shard that a write covers in part, so each
    is written with one assignment. Rows arrive in any batch size through `write_rows`; they are
    buffered until a unit is full, then handed to the writer thread, so the caller (the teacher
    loop) never waits on storage unless `max_pending` units are queued already (default: 4
    chunks, or 1 shard). Its memory is bounded by that: a sharded writer holds about three
    shards of rows (one filling, one queued, one being written), about 3 x 64-128 MiB per
    soft-label array at the default sharding. A unit's `chunk_done` record is set only after all
    of its arrays and its `chunk_manifest` row (stages.cache.manifest) are written.
    """

    def __init__(self, path: CacheLocation, *, max_pending: int | None = None, lock=None):
        self.path = path
        self.lock = lock  # a stages.storage lock: checked before each unit, a lost lease stops the writes
        self.group = zarr.open_group(str(self.path), mode="r+")
        self._attrs = dict(self.group.attrs)  # what the manifest binds: never changed by a resumed write
        self.layout = Layout.from_attributes(self._attrs, labelled="labels" in self.group)
        self.grid = self.layout.write_grid
        if max_pending is None:
            max_pending = 4 if self.layout.shard_rows is None else 1
        # zarr by default compares every chunk written with the fill value, to skip storing
        # "empty" chunks; a cache never writes one, and the check was 60% of the writer's CPU.
        arrays = {name: self.group[name].with_config({"write_empty_chunks": True}) for name in self.group.array_keys()}
        self._done = arrays.pop("chunk_done")
        self._encoding_error = arrays.pop("encoding_error", None)
        self._manifest = arrays.pop("chunk_manifest", None)  # None in a cache of an older schema, resumed
        self._arrays = arrays
        self._buffers: dict[int, dict[str, list[np.ndarray]]] = {}
        self._filled: dict[int, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="cache-writer", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, path: CacheLocation, layout: Layout, attrs: dict, lock=None) -> CacheWriter:
        """Create the group, the arrays of `layout` and the attributes (marked incomplete), and
        open a writer."""
        if not storage.is_empty(path):
            raise InputError(f"{path} exists and is not empty; refusing to create a cache there")
        # The attributes go into the group's own zarr.json from the start, so that a crash at
        # any later point leaves something recognisable as an incomplete cache.
        group = zarr.open_group(
            str(path), mode="a",
            attributes={
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "cache_id": uuid.uuid4().hex,  # bound into the chunk manifest: a chunk of another cache never matches
                "stored_values": STORED_VALUES,
                **layout.attributes(),
                "complete": False,
                "created_at": now_iso(),
                "completed_at": None,
                "tool": {"name": "pipeline", "version": __version__},
                **attrs,
            },
        )
        # Every chunk ends in a crc32c checksum (a bytes-to-bytes codec, so after zstd): a flipped
        # bit, or a torn or truncated chunk, fails to decode instead of reading as other values.
        # Inside a shard too; and zarr's default index codecs checksum a shard's index as well.
        crc = Crc32cCodec()
        n, rows, shard = layout.num_samples, layout.chunk_rows, layout.shard_rows
        for name, spec in layout.arrays().items():
            zstd = ZstdCodec(level=spec.zstd_level or ZSTD_LEVEL)
            group.create_array(name, shape=(n, *spec.shape), chunks=(rows, *spec.shape),
                               shards=None if shard is None else (shard, *spec.shape), dtype=spec.dtype, fill_value=spec.fill,
                               compressors=[zstd, crc] if spec.compressed else [crc], dimension_names=spec.dimensions)
        # Unsharded, whatever the cache: a record per write unit, so that marking one never rewrites another's.
        for name, spec in layout.unit_arrays().items():
            group.create_array(name, shape=spec.shape, chunks=(1, *spec.shape[1:]), dtype=spec.dtype, fill_value=spec.fill,
                               compressors=[crc], dimension_names=spec.dimensions)
        return cls(path, lock=lock)

    def missing_chunks(self) -> list[int]:
        """The write units (of `grid`: shards, or chunks when unsharded) not marked done."""
        return [int(c) for c in np.flatnonzero(self._done[:] == 0)]

    def forget_damaged_chunks(self) -> None:
        """Before resuming: remove the temporary files a killed zarr write leaves (`*.partial`),
        and unmark the write units whose `chunk_done` record cannot be read (a 0-byte file) or
        whose rows were never written (`index` holds -1, or cannot be read; their `chunk_manifest`
        row, or for a lossy kind their `encoding_error` record, cannot be read or was never written) although marked done,
        so that they are computed again. Such damage comes from outside this tool (a writer marks
        a unit only after writing all of it); recomputing costs one unit, refusing would cost
        the whole pass."""
        storage.remove_partial_files(self.path)
        units = ChunkGrid(self.grid.num_chunks, 1)
        done, unreadable = _read_tolerant(self._done, units, 0)
        index, _ = _read_tolerant(self._arrays["index"], self.grid, -1)
        unwritten = [c for c in map(int, np.flatnonzero(done)) if (index[slice(*self.grid.rows(c))] < 0).any()]
        if self._encoding_error is not None:  # a unit's record of what it lost, unreadable or never written
            error, torn = _read_tolerant(self._encoding_error, units, np.nan)
            unwritten += [c for c in map(int, np.flatnonzero(done)) if c in torn or np.isnan(error[c]).any()]
        if self._manifest is not None:  # a unit's manifest row, unreadable or never written
            entries, torn = _read_tolerant(self._manifest, units, 0)
            unwritten += [c for c in map(int, np.flatnonzero(done)) if c in torn or not entries[c].any()]
        damaged = sorted({*unreadable, *unwritten})
        if damaged:
            log.warning("%s: %ss %s were marked done but their record is damaged or their rows were never written; "
                        "computing them again", self.path, self.layout.write_unit, damaged[:10])
            for chunk in damaged:
                self._done[chunk] = 0
            self.group.attrs["complete"] = False

    def write_rows(self, start: int, rows: Rows) -> None:
        """Buffer rows [start, start + len) of every array; full write units go to the writer thread.
        Rows of one unit must not straddle another unit's range within one call."""
        self._raise_writer_error()
        count = len(next(iter(rows.values())))
        if start < 0 or start + count > self.grid.num_samples:  # else the loop below would never end
            raise PipelineError(f"internal: rows [{start}, {start + count}) written to a cache of {self.grid.num_samples} rows")
        position = start
        while position < start + count:
            chunk = position // self.grid.chunk_rows
            chunk_start, chunk_stop = self.grid.rows(chunk)
            take = min(chunk_stop, start + count) - position
            offset = position - start
            parts = self._buffers.setdefault(chunk, {name: [] for name in rows})
            for name, values in rows.items():
                parts[name].append(values[offset : offset + take])
            self._filled[chunk] = self._filled.get(chunk, 0) + take
            if self._filled[chunk] == chunk_stop - chunk_start:
                full = {name: np.concatenate(pieces) for name, pieces in self._buffers.pop(chunk).items()}
                del self._filled[chunk]
                self._put((chunk, full))
            position += take

    def close(self) -> None:
        """Wait for every queued unit to be written; re-raise a failure of the writer thread."""
        if self._buffers:
            raise PipelineError(f"internal: {self.layout.write_unit}s {sorted(self._buffers)} were left partly filled")
        if self._thread.is_alive():  # closing twice is allowed: a distributed pass closes before its workers write
            self._put(None)
            self._thread.join()
        self._raise_writer_error()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Close after the writes; abort on any failure, an interrupt included."""
        if error_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Stop after the units already queued (at most max_pending); units not fully written
        stay unmarked. Waits for the thread: the caller releases the writer lock next,
        and no write may outlive it."""
        self._buffers.clear()
        self._filled.clear()
        self._queue.put(None)
        self._thread.join()

    def mark_complete(self, extra_attrs: dict) -> None:
        if self.missing_chunks():
            raise PipelineError(f"internal: marking a cache complete with {self.layout.write_unit}s missing")
        if self.lock is not None:  # a writer that lost its lock must not declare another's cache finished
            self.lock.check_held()
        self.group.attrs.update({**extra_attrs, "complete": True, "completed_at": now_iso()})

    def _put(self, item) -> None:
        while True:
            self._raise_writer_error()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            chunk, rows = item
            try:
                if self.lock is not None:
                    self.lock.check_held()
                start, stop = self.grid.rows(chunk)
                error = rows.pop("encoding_error", None)
                for name, values in rows.items():
                    self._arrays[name][start:stop] = values
                if self._encoding_error is not None:
                    if error is None:
                        raise PipelineError(f"internal: rows of a {self.layout.kind} cache without their encoding_error")
                    self._encoding_error[chunk] = _unit_encoding_error(error, valid_positions(rows, self.layout.tokens or 0))
                if self._manifest is not None:
                    self._manifest[chunk] = unit_entries(self.path, self.layout, self._attrs, chunk)
                self._done[chunk] = 1
            except BaseException as exc:  # surfaced to the caller by _raise_writer_error
                self._error = exc

    def _raise_writer_error(self) -> None:
        """Re-raise the writer thread's failure. It stays set: the thread writes nothing after
        its first failure, and every later call fails the same way."""
        error = self._error
        if error is not None:
            if isinstance(error, OSError):
                raise PipelineError(f"writing the cache failed: {error}") from error
            raise error


def _unit_encoding_error(error: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """A write unit's row of `encoding_error` from its rows' per-position (sum of absolute
    errors, largest, KL) (..., 3): its positions (valid tokens, for a token cache: `valid`), the
    two sums and the largest. Padding positions hold zeros."""
    positions = error[..., 0].size if valid is None else int(valid.sum())
    flat = error.reshape(-1, 3).astype(np.float64)
    return np.array([positions, flat[:, 0].sum(), flat[:, 1].max(initial=0.0), flat[:, 2].sum()])


def _read_tolerant(array: zarr.Array, grid: ChunkGrid, unreadable) -> tuple[np.ndarray, list[int]]:
    """The whole of `array` (in the units of `grid`), with the rows of units that cannot be
    decoded set to `unreadable`, and those units."""
    try:
        return array[:], []
    except Exception:  # noqa: BLE001 - located chunk by chunk below
        bad = unreadable_chunks(array, grid, range(grid.num_chunks))
        values = np.full(array.shape, unreadable, array.dtype)
        for chunk in sorted(set(range(grid.num_chunks)) - set(bad)):
            values[slice(*grid.rows(chunk))] = array[slice(*grid.rows(chunk))]
        return values, bad


# What must agree between an existing cache and a new writer for it to resume it.
RESUME_KEYS = ("kind", "num_samples", "num_classes", "row_shape", "views", "features", "chunk_rows", "shard_rows", "dtype", "codec",
               "temperature", "teacher_amp", "augment", "combine")


def open_writer(path: CacheLocation, layout: Layout, attrs: dict, *, overwrite: bool, lock=None) -> CacheWriter:
    """A writer on a new cache at `path`, or on the existing one when it was started with this
    layout from the same teachers and data (it is then resumed: only its missing write units
    are left to write). A different cache there is refused unless `overwrite`. Call it with the
    writer lock held."""
    group = zarr.open_group(str(path), mode="r") if is_cache(path) else None
    if group is not None and not overwrite:
        differences = _differences(dict(group.attrs), {**layout.attributes(), **attrs})
        if differences:
            raise InputError(
                f"{path} holds a different cache ({'; '.join(differences)}); "
                "set `overwrite` to replace it, or choose another `out`"
            )
        # The same cache: resume it, unless its arrays were never all created (killed right
        # after its attributes), when it holds no finished unit and is simply made again.
        # A cache of an older schema is resumed as it is (without a chunk manifest, if it had none).
        existing = replace(layout, manifest=Layout.from_attributes(dict(group.attrs), labelled=layout.labelled).manifest)
        if {*existing.arrays(), *existing.unit_arrays()} <= set(group.array_keys()):
            writer = CacheWriter(path, lock=lock)
            writer.forget_damaged_chunks()
            return writer
    remove_cache(path)
    return CacheWriter.create(path, layout, attrs, lock=lock)


@contextlib.contextmanager
def writing(path: CacheLocation, layout: Layout, attrs: dict, *, overwrite: bool) -> Iterator[CacheWriter]:
    """The lifecycle of one pass that writes a cache: take the writer lock, open a writer (a new
    cache, or the same one resumed: see open_writer), hand it to the caller to write the missing
    write units, close it (or abort it on any failure, and let the lock go), then compute the teacher
    metrics and mark the cache complete. A cache already complete is left as it is; either way its
    `teacher_metrics` attribute holds the metrics afterwards."""
    with storage.writer_lock(path) as lock:
        with open_writer(path, layout, attrs, overwrite=overwrite, lock=lock) as writer:
            yield writer
        if not writer.group.attrs["complete"]:
            metrics = teacher_metrics(writer.group, writer.layout, attrs["temperature"])
            writer.mark_complete({"teacher_metrics": metrics})


def _differences(existing: dict, expected: dict) -> list[str]:
    """Human-readable differences that forbid resuming the `existing` cache with this writer."""
    found = [f"{k}: cache has {existing.get(k)}, this run {expected.get(k)}" for k in RESUME_KEYS if existing.get(k) != expected.get(k)]
    # The kind's options whole, as recorded by any schema (before 5, as attributes of their own), each named.
    have, want = recorded_options(existing), expected["kind_options"]
    found += [f"{k}: cache has {have.get(k)}, this run {want.get(k)}" for k in sorted({*have, *want}) if have.get(k) != want.get(k)]
    if _teacher_identities(existing) != _teacher_identities(expected):
        found.append("teacher: another model spec or other weights")
    have, want = existing.get("dataset") or {}, expected["dataset"]
    if have.get("split") != want["split"]:
        found.append(f"split: cache has {have.get('split')!r}, this run {want['split']!r}")
    if have.get("fingerprint") != want["fingerprint"] or have.get("index_sha256") != want["index_sha256"]:
        found.append("dataset: other samples, labels or ordering")
    return found


def _teacher_identities(attrs: dict) -> list[tuple]:
    return [(t.get("spec"), t.get("weights_sha256")) for t in attrs.get("teachers") or []]


def teacher_metrics(group: zarr.Group, layout: Layout, temperature: float) -> dict | None:
    """Top-1 accuracy and mean NLL at T=1 of the stored values against the stored labels, per
    sample, view or valid token. The NLL only where the kind knows it (not top-k: its NLL at T=1
    would need the dropped logits). Read a write unit at a time: a shard is one fetch of its index
    and its chunks."""
    if "labels" not in group:
        return None
    kind = layout.soft_kind
    correct, nll, count = 0, 0.0, 0
    names = ("labels", *layout.position_arrays, *kind.soft_arrays)
    size = dataset_size(dict(group.attrs))
    unit, grid = layout.write_unit, layout.write_grid
    for chunk in range(grid.num_chunks):
        start, stop = grid.rows(chunk)
        # Every unit is marked done here, yet may be damaged from outside: say so, never crash on it.
        try:
            rows = {name: group[name][start:stop] for name in names}
        except Exception as exc:
            raise CacheDamagedError(f"{unit} {chunk} of the cache cannot be read ({type(exc).__name__}: {exc}); "
                                    "run pipeline verify") from exc
        problem = row_problem(rows, layout, size, start)
        if problem:
            raise CacheDamagedError(f"{unit} {chunk} of the cache holds {problem}; run pipeline verify")
        labels = torch.from_numpy(rows["labels"])
        if layout.views is not None:  # every view of a sample has the sample's label
            labels = labels.unsqueeze(1).expand(-1, layout.views)
        valid = (torch.ones(labels.shape, dtype=torch.bool) if layout.tokens is None
                 else torch.from_numpy(valid_positions(rows, layout.tokens)))
        labels = labels[valid]
        predicted = torch.from_numpy(kind.top1(rows))[valid]
        chunk_nll = kind.label_nll({name: torch.from_numpy(rows[name])[valid] for name in kind.soft_arrays}, labels, temperature)
        nll = None if chunk_nll is None else nll + chunk_nll
        correct += int((predicted == labels).sum())
        count += len(labels)
    metrics = {"accuracy": correct / count, "errors": count - correct,
               "nll": None if nll is None else nll / count, "num_samples": layout.num_samples}
    if layout.tokens is not None:
        metrics["num_tokens"] = count
    if layout.views is not None:
        metrics["num_views"] = count
    return metrics


