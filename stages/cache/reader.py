"""The cache reader: opens a cache, checks it against its attributes and its index, and streams
it in whole chunks, shuffled, on a background thread. The format is described in
stages.cache.format."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import zarr

from stages import storage
from stages.cache.format import (
    FORMAT, SCHEMA_VERSION, Layout, Rows, array_problems, dataset_size, is_cache, malformed_attributes, row_problem,
    unreadable_chunks,
)
from stages.data import Split, fingerprint, sha256
from stages.errors import CacheDamagedError, CacheMismatchError, InputError
from stages.kinds import KINDS
from stages.storage import CacheLocation


class CacheReader:
    """Opens a cache for reading, checks that it is a complete cache this tool understands,
    and streams it in whole chunks."""

    def __init__(self, path: CacheLocation, *, require_complete: bool = True):
        self.path = path
        if not storage.exists(self.path):
            raise InputError(f"cache not found: {self.path}")
        if not is_cache(self.path):
            raise InputError(f"{self.path} is not a cache written by this tool (no '{FORMAT}' format attribute)")
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
        if require_complete:
            self._check_index()

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

    def read_chunks(self, first: int, last: int, names: tuple[str, ...] | None = None) -> Rows:
        """All arrays' rows of chunks first..last (one read per array), checked as `read_rows`."""
        start, _ = self.grid.rows(first)
        _, stop = self.grid.rows(last)
        where = f"chunk{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''}"
        return self.read_rows(start, stop, names, where)

    def read_rows(self, start: int, stop: int, names: tuple[str, ...] | None = None, where: str | None = None) -> Rows:
        """Rows start..stop of the arrays in `names` (default: all). Damage is reported as such,
        never passed on as data: an undecodable chunk, non-finite values (a gap reads as NaN),
        or an entry that is unwritten or out of range."""
        where = f"cache {self.path}: {where or f'rows {start}-{stop - 1}'}"
        rows = {}
        for name, array in self.arrays.items():
            if names is None or name in names:
                try:
                    rows[name] = array[start:stop]
                except Exception as exc:
                    chunks = range(start // self.grid.chunk_rows, (stop - 1) // self.grid.chunk_rows + 1)
                    chunk = (unreadable_chunks(array, self.grid, chunks) or [chunks[-1]])[0]
                    raise CacheDamagedError(f"cache {self.path}: array {name}: chunk {chunk} "
                                            f"cannot be read ({type(exc).__name__}: {exc}); run pipeline verify") from exc
        problem = row_problem(rows, self.layout, self.dataset_size, start)
        if problem:
            raise CacheDamagedError(f"{where} holds {problem}; run pipeline verify")
        return rows

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
        prefetch_runs: int = 2, shuffle: bool = True, names: tuple[str, ...] | None = None, rank: int = 0, world: int = 1,
    ) -> Iterator[Rows]:
        """Every row once per epoch, in batches. Runs of `run_chunks` adjacent chunks are read
        whole, in shuffled order, on a background thread at most `prefetch_runs` runs ahead;
        rows are shuffled inside a buffer of at least `buffer_chunks` chunks, so memory is
        bounded by the buffer, not by the cache. The order depends only on (seed, epoch, and
        with several processes, rank).
        With shuffle=False, rows come in file order (for measuring read speed). `names` limits
        the arrays read (default: all; "index" is always read). With `world` > 1, only the
        runs of process `rank` (every world-th of the epoch's shuffled runs): the processes
        of one epoch read disjoint chunks, and each epoch deals them out anew."""
        names = None if names is None else tuple({"index", *names})
        rng = np.random.default_rng([seed, epoch, 1] if world == 1 else [seed, epoch, 1, rank])
        runs = self.runs(seed, epoch, run_chunks, shuffle)[rank::world]
        buffer: list[Rows] = []
        chunks_buffered = 0
        for (first, last), rows in zip(runs, prefetch((self.read_chunks(f, l, names) for f, l in runs), depth=prefetch_runs)):
            buffer.append(rows)
            chunks_buffered += last - first + 1
            if chunks_buffered >= buffer_chunks:
                carry = yield from _emit_batches(buffer, batch_size, rng if shuffle else None, final=False)
                buffer, chunks_buffered = ([carry] if carry else []), 0
        yield from _emit_batches(buffer, batch_size, rng if shuffle else None, final=True)


def batch_bounds(rows: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches covering `rows` rows. A last partial batch of fewer than half
    a batch joins the one before it, so no step sees a sliver (one row breaks BatchNorm)."""
    bounds = [(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_size / 2:
        bounds[-2:] = [(bounds[-2][0], rows)]
    return bounds


def _emit_batches(buffer: list[Rows], batch_size: int, rng: np.random.Generator | None, final: bool):
    """Yield batches from the buffered rows (shuffled when `rng` is given); return the rows
    held back for the next buffer: until the final flush, the partial batch and one full
    batch more, so that the last batch of the epoch can absorb a small remainder."""
    if not buffer:
        return None
    rows = {k: np.concatenate([part[k] for part in buffer]) for k in buffer[0]}
    n = len(rows["index"])
    if rng is not None:
        order = rng.permutation(n)
        rows = {k: v[order] for k, v in rows.items()}
    if final:
        emit = n
        bounds = batch_bounds(n, batch_size)
    else:
        emit = max(n // batch_size - 1, 0) * batch_size
        bounds = [(b, b + batch_size) for b in range(0, emit, batch_size)]
    for start, stop in bounds:
        yield {k: v[start:stop] for k, v in rows.items()}
    return {k: v[emit:] for k, v in rows.items()} if emit < n else None


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

