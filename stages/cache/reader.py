"""The cache reader: opens a cache, checks it against its attributes and its index, and streams
it in whole chunks, shuffled, on a background thread. The format is described in
stages.cache.format.

How it keeps up with the disk (`pipeline bench --only reader` compares it with a memory map of
the same bytes): a local cache's chunks are read straight from their files into the shuffle
buffer (stages.cache.chunk_files), the buffers are reused, and the values of a chunk are
range-checked on its first read in a process only; its checksum, and in a cache with a chunk
manifest that it is the chunk written at its position (stages.cache.manifest), on every read.
In a complete cache every chunk must be there: an absent one is damage, never the fill value."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from stages import storage
from stages.cache.chunk_files import ChunkDamage, ChunkFiles
from stages.cache.format import (
    SCHEMA_VERSION, Rows, array_problems, dataset_size, malformed_attributes, require_cache, row_problem,
    unreadable_chunks,
)
from stages.cache.layout import Layout
from stages.cache.manifest import Manifest, StoredChunks, check_stored
from stages.data import Split, fingerprint, sha256
from stages.errors import CacheDamagedError, CacheMismatchError, InputError
from stages.kinds import KINDS
from stages.storage import CacheLocation


class CacheReader:
    """Opens a cache for reading, checks that it is a complete cache this tool understands,
    and streams it in whole chunks."""

    def __init__(self, path: CacheLocation, *, require_complete: bool = True):
        self.path = path
        require_cache(self.path)
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        version = self.attrs.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise CacheMismatchError(
                f"cache {self.path} has schema version {version}, newer than this tool reads "
                f"({SCHEMA_VERSION}); upgrade the tool (pip install -U kd-pipeline) to read it"
            )
        malformed = malformed_attributes(self.attrs)
        if malformed:
            raise CacheDamagedError(f"cache {self.path}: attributes missing or malformed: "
                                    f"{', '.join(f'{name}={self.attrs.get(name)!r}' for name in malformed)}; run pipeline verify")
        if self.attrs["kind"] not in KINDS:
            raise CacheMismatchError(f"cache kind {self.attrs['kind']!r} is not supported by this tool version")
        if require_complete and not self.attrs["complete"]:
            raise CacheMismatchError(
                f"cache {self.path} is incomplete; re-run the same cache-teacher command to finish it"
            )
        try:
            self.layout = Layout.from_attributes(self.attrs, labelled="labels" in self.group)
        except (InputError, TypeError, IndexError) as exc:
            raise CacheDamagedError(f"cache {self.path}: its layout attributes are inconsistent ({exc}); run pipeline verify") from exc
        self.grid = self.layout.grid
        try:
            problems = array_problems(self.group, self.attrs, self.layout)
            self.arrays = {name: self.group[name] for name in self.layout.arrays() if name in self.group}
        except Exception as exc:
            raise CacheDamagedError(f"cache {self.path}: an array cannot be opened ({type(exc).__name__}); run pipeline verify") from exc
        if problems:
            raise CacheDamagedError(f"cache {self.path}: its attributes and arrays disagree: {'; '.join(problems)}; run pipeline verify")
        # Every chunk a regular file (or object) of bounded size, and in a complete cache every one
        # there: checked before anything reads one (zarr would read a link to /dev/zero without end).
        self.complete = bool(self.attrs["complete"])
        self._stored = StoredChunks.of(self.path, self.layout)
        for name, stored in self._stored.items():
            problems = stored.object_problems(self.complete)
            if problems:
                chunk, what, _ = problems[0]
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CacheDamagedError(f"cache {self.path}: array {name}: chunk {chunk} {what}{more}; run pipeline verify")
        # A local cache's arrays are read from their chunk files directly (stages.cache.chunk_files), others by zarr.
        self._files = {} if storage.is_url(self.path) else {
            name: files for name in self.arrays if (files := ChunkFiles.open(Path(self.path) / name)) is not None}
        self.manifest = self._read_manifest() if self.complete and self.layout.manifest else None
        if self.manifest is not None and not storage.is_url(self.path):
            self._check_positions()
        for name, files in self._files.items():
            files.strict = self.complete
            if self.manifest is not None and files.crc:
                files.seal = self.manifest.seal(name)
        # Chunks of those arrays whose values passed row_problem in this process, by array: the
        # checksum, checked on every read, then vouches that a later read gives the same bytes,
        # so each value is range-checked once per process rather than once per epoch.
        self._values_checked: dict[str, set[int]] = {name: set() for name, files in self._files.items() if files.crc}
        self._buffers = BufferPool()
        if require_complete:
            self._check_index()

    def _read_manifest(self) -> Manifest:
        """The manifest of a complete cache (its chunks' checksums bound to their positions), read whole."""
        files = None if storage.is_url(self.path) else ChunkFiles.open(Path(self.path) / "chunk_manifest")
        try:
            if files is None:
                values = self.group["chunk_manifest"][:]
            else:
                files.strict = True
                values = files.read(0, files.shape[0])[0]
        except ChunkDamage as exc:
            raise CacheDamagedError(f"cache {self.path}: array chunk_manifest: chunk {exc.chunk} {exc.what}; run pipeline verify") from exc
        except Exception as exc:
            raise CacheDamagedError(f"cache {self.path}: array chunk_manifest cannot be read ({type(exc).__name__}: {exc}); "
                                    "run pipeline verify") from exc
        return Manifest(self.attrs, self.layout, values)

    def _check_positions(self) -> None:
        """Every chunk of every array is the one written at its position, from the checksums it was
        stored with (4 bytes read per chunk, no values): also the arrays a caller never reads
        (train-student takes labels from its dataset), which would otherwise pass as sound. Each
        read checks its chunks again."""
        chunks = range(self.grid.num_chunks)
        for name in self.layout.manifest_arrays:
            try:
                check_stored(self._stored[name], chunks, self.manifest)
            except ChunkDamage as exc:
                raise CacheDamagedError(f"cache {self.path}: array {name}: chunk {exc.chunk} {exc.what}; run pipeline verify") from exc

    def _check_index(self) -> None:
        """Rows are joined to their inputs by `index`: a permuted or duplicated one would pair soft
        labels with other samples, so it must hash as recorded (N int64s: cheap)."""
        index = self.read_rows(0, self.num_samples, ("index",), "index")["index"]
        if sha256(index) != self.attrs["dataset"].get("index_sha256"):
            raise CacheDamagedError(f"cache {self.path}: its index array differs from the recorded dataset.index_sha256 "
                                    "(rows reordered, repeated or replaced); run pipeline verify")

    @property
    def num_samples(self) -> int:
        return self.grid.num_samples

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def temperature(self) -> float:
        return float(self.attrs["temperature"])

    @property
    def labelled(self) -> bool:
        return "labels" in self.arrays

    @property
    def soft_arrays(self) -> tuple[str, ...]:
        """The arrays holding this cache's soft labels (its kind's)."""
        return self.layout.soft_kind.soft_arrays

    @property
    def dataset_size(self) -> int:
        return dataset_size(self.attrs)

    def check_split(self, split: Split, dataset_spec: str) -> None:
        """Refuse a split other than the one this cache was made from: its fingerprint (sample
        count, labels, lengths, sampled inputs) must match, or rows would join the wrong data."""
        recorded = self.attrs["dataset"]["fingerprint"]
        actual = fingerprint(split)
        differ = [k for k in recorded if recorded[k] != actual.get(k)]
        if differ:
            raise CacheMismatchError(
                f"dataset {dataset_spec} split {split.name!r} does not match the cache "
                f"(made from {self.attrs['dataset']['spec']} split {self.attrs['dataset']['split']!r}): "
                f"{', '.join(differ)} differ"
            )

    def read_chunks(self, first: int, last: int, names: tuple[str, ...] | None = None, into: Rows | None = None) -> Rows:
        """All arrays' rows of chunks first..last (one read per array), checked as `read_rows`."""
        start, _ = self.grid.rows(first)
        _, stop = self.grid.rows(last)
        where = f"chunk{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''}"
        return self.read_rows(start, stop, names, where, into)

    def read_rows(self, start: int, stop: int, names: tuple[str, ...] | None = None, where: str | None = None,
                  into: Rows | None = None) -> Rows:
        """Rows start..stop of the arrays in `names` (default: all), into the arrays of `into`
        when given. Damage is reported as such, never passed on as data: an undecodable chunk,
        non-finite values (a gap reads as NaN), or an entry that is unwritten or out of range."""
        where = f"cache {self.path}: {where or f'rows {start}-{stop - 1}'}"
        rows = {}
        gaps = False
        for name, array in self.arrays.items():
            if names is None or name in names:
                target = None if into is None else into[name]
                try:
                    files = self._files.get(name)
                    if files is not None:
                        rows[name], gap = files.read(start, stop, target)
                        gaps |= gap
                    else:
                        if self.complete:  # what ChunkFiles checks, before zarr reads the chunks
                            check_stored(self._stored[name], range(start // self.grid.chunk_rows, (stop - 1) // self.grid.chunk_rows + 1),
                                         self.manifest)
                        if target is None:
                            rows[name] = array[start:stop]
                        else:
                            target[...] = array[start:stop]
                            rows[name] = target
                except ChunkDamage as exc:  # located already: never read again through zarr
                    raise CacheDamagedError(f"cache {self.path}: array {name}: chunk {exc.chunk} {exc.what}; run pipeline verify") from exc
                except Exception as exc:
                    chunks = range(start // self.grid.chunk_rows, (stop - 1) // self.grid.chunk_rows + 1)
                    chunk = (unreadable_chunks(array, self.grid, chunks) or [chunks[-1]])[0]
                    raise CacheDamagedError(f"cache {self.path}: array {name}: chunk {chunk} "
                                            f"cannot be read ({type(exc).__name__}: {exc}); run pipeline verify") from exc
        chunk_rows = self.grid.chunk_rows
        whole = range(start // chunk_rows, -(-stop // chunk_rows)) if start % chunk_rows == 0 and (
            stop % chunk_rows == 0 or stop == self.num_samples) else None  # the chunks read, when read whole
        if gaps or whole is None or not all(self._values_checked.get(name, set()).issuperset(whole) for name in rows):
            problem = row_problem(rows, self.layout, self.dataset_size, start)
            if problem:
                raise CacheDamagedError(f"{where} holds {problem}; run pipeline verify")
            if not gaps and whole is not None:
                for name in rows:
                    if name in self._values_checked:
                        self._values_checked[name].update(whole)
        return rows

    def read_runs(self, runs: list[tuple[int, int]], names: tuple[str, ...] | None = None) -> Rows:
        """The rows of the (first, last) chunk `runs`, one after another, each array in one
        buffer that the runs are read straight into (checked as `read_rows`)."""
        sizes = [self.grid.rows(last)[1] - self.grid.rows(first)[0] for first, last in runs]
        into = self._buffers.take({name: ((sum(sizes), *array.shape[1:]), array.dtype)
                                   for name, array in self.arrays.items() if names is None or name in names})
        offset = 0
        for (first, last), size in zip(runs, sizes):
            self.read_chunks(first, last, names, {name: values[offset : offset + size] for name, values in into.items()})
            offset += size
        return into

    def read_chunk(self, chunk: int) -> Rows:
        return self.read_chunks(chunk, chunk)

    def runs(self, seed: int, epoch: int, run_chunks: int = 1, shuffle: bool = True) -> list[tuple[int, int]]:
        """(first, last) chunk runs of `run_chunks` adjacent chunks, in shuffled or file order."""
        runs = [(c, min(c + run_chunks, self.grid.num_chunks) - 1) for c in range(0, self.grid.num_chunks, run_chunks)]
        if shuffle:
            runs = [runs[i] for i in np.random.default_rng([seed, epoch]).permutation(len(runs))]
        return runs

    def batches(
        self, batch_size: int, *, seed: int, epoch: int, buffer_chunks: int = 8, run_chunks: int = 1,
        shuffle: bool = True, names: tuple[str, ...] | None = None, rank: int = 0, world: int = 1,
    ) -> Iterator[Rows]:
        """Every row once per epoch, in batches. Runs of `run_chunks` adjacent chunks are read
        whole, in shuffled order, into buffers of at least `buffer_chunks` chunks, on a
        background thread one buffer ahead; rows are shuffled inside a buffer, so memory is
        bounded by the buffer, not by the cache. The order depends only on (seed, epoch, and
        with several processes, rank).
        With shuffle=False, rows come in file order (for measuring read speed). `names` limits
        the arrays read (default: all; "index" is always read). With `world` > 1, only the
        runs of process `rank` (every world-th of the epoch's shuffled runs): the processes
        of one epoch read disjoint chunks, and each epoch deals them out anew."""
        names = None if names is None else tuple({"index", *names})
        rng = np.random.default_rng([seed, epoch, 1] if world == 1 else [seed, epoch, 1, rank])
        buffers = _buffers(self.runs(seed, epoch, run_chunks, shuffle)[rank::world], buffer_chunks)
        held = None
        for number, rows in enumerate(prefetch((self.read_runs(runs, names) for runs in buffers), depth=1)):
            held = yield from _emit_batches(held, rows, batch_size, rng if shuffle else None, final=number == len(buffers) - 1)
            self._buffers.give(rows)  # every batch and held row is a copy: the buffer can take the next rows


def _buffers(runs: list[tuple[int, int]], buffer_chunks: int) -> list[list[tuple[int, int]]]:
    """`runs` in order, grouped into buffers of at least `buffer_chunks` chunks (the last one may hold fewer)."""
    buffers: list[list[tuple[int, int]]] = [[]]
    chunks = 0
    for first, last in runs:
        if chunks >= buffer_chunks:
            buffers.append([])
            chunks = 0
        buffers[-1].append((first, last))
        chunks += last - first + 1
    return buffers if buffers[0] else []


def batch_bounds(rows: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches covering `rows` rows. A last partial batch of fewer than half
    a batch joins the one before it, so no step sees a sliver (one row breaks BatchNorm)."""
    bounds = [(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_size / 2:
        bounds[-2:] = [(bounds[-2][0], rows)]
    return bounds


def _emit_batches(held: Rows | None, rows: Rows, batch_size: int, rng: np.random.Generator | None, final: bool):
    """Yield batches of the rows held back from the previous buffer (first: they were drawn
    already) and a buffer's `rows` (shuffled when `rng` is given); return the rows held back
    for the next buffer: until the final flush, the partial batch and one full batch more, so
    that the last batch of the epoch can absorb a small remainder. A batch is gathered from
    the buffer in one copy (a slice, without shuffling); only the batches that take held rows
    are joined from two parts."""
    count = len(rows["index"])
    held_count = 0 if held is None else len(held["index"])
    order = np.arange(count) if rng is None else rng.permutation(count)
    total = held_count + count
    if final:
        emit = total
        bounds = batch_bounds(total, batch_size)
    else:
        emit = max(total // batch_size - 1, 0) * batch_size
        bounds = [(b, b + batch_size) for b in range(0, emit, batch_size)]

    def take(start: int, stop: int) -> Rows:
        """Positions start..stop of (held rows, then the buffer's in `order`)."""
        if start >= held_count:
            start, stop = start - held_count, stop - held_count
            if rng is None:
                return {k: v[start:stop].copy() for k, v in rows.items()}
            return {k: v[order[start:stop]] for k, v in rows.items()}
        chosen = order[: max(stop - held_count, 0)]
        return {k: np.concatenate([held[k][start:stop], v[chosen]]) for k, v in rows.items()}

    for start, stop in bounds:
        yield take(start, stop)
    return take(emit, total) if emit < total else None


class BufferPool:
    """Arrays for the reader's buffers, kept for the next ones: a buffer filled by reads
    straight into fresh memory paid a page fault per 4 KiB (15% of reading a token cache), and
    a training loop asks for buffers of the same shapes all the time. Keeps at most
    `keep` sets, so a reader holds a few buffers' memory between epochs."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._free: list[Rows] = []
        self._lock = threading.Lock()

    def take(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> Rows:
        """Arrays of these shapes and dtypes (uninitialised), by name."""
        with self._lock:
            for position, free in enumerate(self._free):
                if free.keys() == shapes.keys() and all(
                        free[name].dtype == dtype and free[name].shape[1:] == shape[1:] and len(free[name]) >= shape[0]
                        for name, (shape, dtype) in shapes.items()):
                    del self._free[position]
                    return {name: free[name][: shape[0]] for name, (shape, _) in shapes.items()}
        return {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}

    def give(self, arrays: Rows) -> None:
        """Arrays from `take`, no longer used."""
        whole = {name: values if values.base is None else values.base for name, values in arrays.items()}
        with self._lock:
            if len(self._free) < self.keep and all(isinstance(values, np.ndarray) for values in whole.values()):
                self._free.append(whole)


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Produce `items` on a background thread, at most `depth` ahead of the consumer.
    An exception in the producer is re-raised in the consumer; abandoning the iterator
    stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    finished = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((finished, None))
        except BaseException as exc:
            offer((finished, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is finished:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()

