"""The cache contract: a versioned, self-describing Zarr v3 group of softened teacher outputs.

Layout (schema version 3; the README documents every field):

    CACHE.zarr/
      zarr.json          group attributes: format, schema_version, kind, stored_values, temperature,
                         num_classes, num_samples, row_shape, row_axes, top_k, views, features, chunk_rows, dtype,
                         codec, teacher_amp, teachers, combine, dataset, complete, created_at,
                         completed_at, tool, teacher_metrics, config
      kind "dense":
        logits/          (N, [L,] C) float16|float32   teacher logits / T; unwritten rows read as NaN
      kind "topk":
        topk_values/     (N, [L,] K) float16|float32   the K largest logits / T of each row, descending
        topk_indices/    (N, [L,] K) uint8|16|32       their classes (the smallest type holding C - 1)
        logsumexp/       (N, [L]) float32              log-sum-exp of the whole row of stored logits / T
      index/             (N,)   int64            dataset index of every row; unwritten = -1
      labels/            (N, [L]) int64          hard labels (only when the split has labels)
      lengths/           (N,)   int32            valid tokens of each sequence (token-level caches)
      features/          (N, [V,] F) float16|32  the teacher's features (feature targets; optional)
      chunk_done/        (num_chunks,) uint8     1 once every array's rows of that chunk are written
    CACHE.zarr.lock      beside the group, held by the one process writing it (stages.storage)

Every array has dimension names (sample, token, view, class, rank, feature; chunk for
chunk_done), so xarray joins them, and every chunk of every array ends in a crc32c checksum
(schema 3), so damage fails to decode instead of reading as other values.

The optional L axis makes a token-level cache, for models that output logits per token (a
language model): `row_axes` names the axes after the sample axis ("token", then "class" for
dense or "rank" for top-k), and positions at or past a sequence's length hold zeros and never
count. Every per-row array is chunked along the sample axis only, with the same
`chunk_rows`, so a chunk of rows is a unit of work: a writer owns whole chunks (a
partial-chunk write would read-modify-write it), a reader decodes whole chunks. `chunk_done`
has one storage chunk per element, so marking one chunk complete never rewrites another's.

Room for later kinds without breaking readers of these: a reader dispatches on `kind`, rows
may carry further named axes (views), and `teachers` is a list with a `combine` rule for
ensembles. Schema 1 caches (dense, one row per sample, before `row_axes`) read as schema 2, and
schema 2 caches (no checksums, no dimension names) as schema 3.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from stages import __version__, storage
from stages.config import CODECS, DTYPES, KINDS
from stages.data import Split, fingerprint, sha256
from stages.errors import CacheDamagedError, CacheMismatchError, InputError, PipelineError
from stages.storage import CacheLocation

log = logging.getLogger(__name__)

FORMAT = "distill-cache"
SCHEMA_VERSION = 3
STORED_VALUES = "teacher_logits / temperature"
# The arrays holding each kind's soft labels, and those of them that hold floats (a NaN in one
# is a gap or damage, never data).
SOFT_ARRAYS = {"dense": ("logits",), "topk": ("topk_values", "topk_indices", "logsumexp")}
FLOAT_ARRAYS = ("logits", "topk_values", "logsumexp", "features")
# The soft-label arrays' codecs (stages.config.CODECS). float16 logits hardly compress losslessly (zstd: ~1.1x),
# and decoding costs the training loop CPU time, so "none" is the default; index, labels and
# lengths are always zstd-compressed (they compress well and are small).
ZSTD_LEVEL = 3
# Default chunking: about 2 MB of logits per chunk (1024 rows x 1000 classes x float16), where
# whole-chunk reads are fast, but no more than 1024 rows, so that even a cache of few classes
# has enough chunks to shuffle between, and no fewer than 64 (a chunk of very wide rows is
# then larger than 2 MB rather than a sliver of rows).
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
MAX_CHUNK_ROWS = 1024

Rows = dict[str, np.ndarray]


def default_chunk_rows(row_bytes: int, num_samples: int) -> int:
    """Rows per chunk: about DEFAULT_CHUNK_BYTES of soft labels, at most MAX_CHUNK_ROWS rows,
    then evened out over the samples: zarr stores a short last chunk at full size, so 4,697 rows
    in chunks of 585 would store 5,265; in 9 chunks of 522 they store 4,698."""
    target = int(max(64, min(MAX_CHUNK_ROWS, DEFAULT_CHUNK_BYTES // max(row_bytes, 1))))
    chunks = -(-num_samples // target)
    return -(-num_samples // chunks)


def index_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds every class number 0..C-1."""
    return next(t for t in ("uint8", "uint16", "uint32") if num_classes - 1 <= np.iinfo(t).max)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_cache(path: CacheLocation) -> bool:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, ValueError, OSError, zarr.errors.NodeTypeValidationError):
        return False


def remove_cache(path: CacheLocation) -> None:
    """Delete an existing cache for --overwrite; refuse to delete anything that is not one."""
    if not storage.is_empty(path) and not is_cache(path):
        raise InputError(f"{path} exists and is not a cache; refusing to delete it")
    storage.remove(path)


@dataclass(frozen=True)
class ChunkGrid:
    """The split of N rows into chunks of `chunk_rows` rows (the last one may be short)."""

    num_samples: int
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)


class ArraySpec(NamedTuple):
    """One array of a cache: its shape after the sample axis, dtype, fill value, whether it is
    compressed, and its dimension names (the sample axis first)."""

    shape: tuple[int, ...]
    dtype: str
    fill: object
    compressed: bool
    dimensions: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """What a cache holds and how it is laid out: its kind, shapes, dtypes and chunking.

    The one place that knows which arrays each kind has; writers create them from it, readers
    rebuild it from the attributes, and a resumed write must find the same layout."""

    kind: str  # "dense" or "topk"
    num_samples: int
    num_classes: int
    chunk_rows: int
    dtype: str = "float16"
    codec: str = "none"  # of the soft-label arrays (see CODECS)
    top_k: int | None = None  # kind "topk": entries kept per row
    tokens: int | None = None  # token-level caches: positions per sample (L)
    views: int | None = None  # view caches: augmented views per sample (V)
    labelled: bool = True
    features: int | None = None  # feature targets: the teacher's feature vector per sample (or view) has F values

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"cache format must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise InputError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.kind == "topk" and not (self.top_k is not None and 1 <= self.top_k <= self.num_classes):
            raise InputError(f"--top-k must be between 1 and the number of classes ({self.num_classes}), got {self.top_k}")
        if self.views is not None and self.tokens is not None:
            raise InputError("augmented views of token sequences are not supported: a view cache needs per-sample outputs")
        if self.features is not None and self.tokens is not None:
            raise InputError("feature targets are per sample: a teacher with logits per token cannot have them cached")

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.num_samples, self.chunk_rows)

    @property
    def position_shape(self) -> tuple[int, ...]:
        """The axes between the sample axis and the class (or rank) axis: (V,), (L,) or ()."""
        return (self.views,) if self.views is not None else (self.tokens,) if self.tokens is not None else ()

    @property
    def label_shape(self) -> tuple[int, ...]:
        """A sample's labels: one per token, else one (every view of a sample has its label)."""
        return () if self.tokens is None else (self.tokens,)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (*self.position_shape, self.num_classes if self.kind == "dense" else self.top_k)

    @property
    def position_axes(self) -> list[str]:
        """The names of `position_shape`'s axes."""
        return ["view"] if self.views is not None else ["token"] if self.tokens is not None else []

    @property
    def row_axes(self) -> list[str]:
        return [*self.position_axes, "class" if self.kind == "dense" else "rank"]

    def arrays(self) -> dict[str, ArraySpec]:
        """Per-row arrays, by name; their dimension names let xarray and other clients join them."""
        soft = self.codec != "none"
        position = self.position_axes
        if self.kind == "dense":
            arrays = {"logits": ArraySpec(self.row_shape, self.dtype, float("nan"), soft, ("sample", *self.row_axes))}
        else:
            ranked = ("sample", *self.row_axes)
            arrays = {
                "topk_values": ArraySpec(self.row_shape, self.dtype, float("nan"), soft, ranked),
                "topk_indices": ArraySpec(self.row_shape, index_dtype(self.num_classes), 0, soft, ranked),
                "logsumexp": ArraySpec(self.position_shape, "float32", float("nan"), soft, ("sample", *position)),
            }
        arrays["index"] = ArraySpec((), "int64", -1, True, ("sample",))
        if self.labelled:
            arrays["labels"] = ArraySpec(self.label_shape, "int64", -1, True, ("sample", *(["token"] if self.tokens is not None else [])))
        if self.tokens is not None:
            arrays["lengths"] = ArraySpec((), "int32", -1, True, ("sample",))
        if self.views is not None:
            arrays["view_seeds"] = ArraySpec((self.views,), "uint64", 0, True, ("sample", "view"))
        if self.features is not None:
            arrays["features"] = ArraySpec((*self.position_shape, self.features), self.dtype, float("nan"), soft,
                                           ("sample", *position, "feature"))
        return arrays

    @property
    def row_bytes(self) -> int:
        """Bytes of soft labels per sample, uncompressed."""
        return sum(np.dtype(spec.dtype).itemsize * math.prod(spec.shape) for name, spec in self.arrays().items()
                   if name in SOFT_ARRAYS[self.kind])

    def attributes(self) -> dict:
        return {
            "kind": self.kind, "num_samples": self.num_samples, "num_classes": self.num_classes,
            "row_shape": list(self.row_shape), "row_axes": self.row_axes, "top_k": self.top_k, "views": self.views,
            "features": self.features, "chunk_rows": self.chunk_rows, "dtype": self.dtype,
            "codec": "none" if self.codec == "none" else f"zstd(level={ZSTD_LEVEL})",
        }

    @classmethod
    def from_attributes(cls, attrs: dict, labelled: bool) -> Layout:
        """The layout a cache's attributes describe (schema 1 caches: dense, one row per sample)."""
        row_shape = attrs["row_shape"]
        axes = attrs.get("row_axes") or ["class"]
        return cls(
            kind=attrs["kind"], num_samples=attrs["num_samples"], num_classes=attrs["num_classes"],
            chunk_rows=attrs["chunk_rows"], dtype=attrs["dtype"],
            codec="none" if attrs.get("codec", "none") == "none" else "zstd", top_k=attrs.get("top_k"),
            tokens=row_shape[axes.index("token")] if "token" in axes else None,
            views=row_shape[axes.index("view")] if "view" in axes else None, labelled=labelled,
            features=attrs.get("features"),
        )


def teacher_outputs(teacher: torch.nn.Module, inputs: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits for a batch, and its features (B, F) when `layout` caches them."""
    if layout.features is None:
        return teacher(inputs), None
    return teacher.logits_and_features(inputs)


def stored_rows(logits_over_t: torch.Tensor, layout: Layout, lengths: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The soft-label arrays a cache of `layout` stores for a batch of teacher logits / T
    ((B, C), or (B, L, C) for a token-level cache), computed on the logits' device, and the
    teacher's `features` (B, F) as they are (not divided by T), for a layout with features.

    Values are rounded to the cache dtype first, and a top-k row's log-sum-exp is taken over the
    whole rounded row: so exp(value - logsumexp) is exactly the probability a dense cache of the
    same teacher gives that class, and a top-k cache with K = C is the dense one, sorted. On
    a token-level cache, positions at or past a sequence's length are zeroed: what a teacher
    says about padding is not part of the cache (and would differ between teachers' masks)."""
    rounded = logits_over_t.to(getattr(torch, layout.dtype))
    if layout.kind == "dense":
        rows = {"logits": rounded}
    else:
        values, indices = rounded.float().topk(layout.top_k, dim=-1)
        rows = {
            "topk_values": values.to(rounded.dtype),
            "topk_indices": indices.to(getattr(torch, index_dtype(layout.num_classes))),
            "logsumexp": torch.logsumexp(rounded.float(), dim=-1),
        }
    if lengths is not None:
        padding = torch.arange(rounded.shape[1], device=rounded.device) >= lengths.to(rounded.device).unsqueeze(1)
        for array in rows.values():
            array[padding] = 0
    if layout.features is not None:
        if features is None:
            raise PipelineError("internal: a layout with features, but no features given")
        rows["features"] = features.to(rounded.dtype)
    return rows


class CacheWriter:
    """Creates a cache and writes whole chunks of rows from a background thread.

    Rows arrive in any batch size through `write_rows`; they are buffered until a chunk is
    full, then handed to the writer thread, so the caller (the teacher loop) never waits on
    storage unless more than `max_pending_chunks` chunks are queued. A chunk's `chunk_done`
    record is set only after all of its arrays are written.
    """

    def __init__(self, path: CacheLocation, *, max_pending_chunks: int = 4, lock=None):
        self.path = path
        self._lock = lock  # a stages.storage lock: checked before each chunk, a lost lease stops the writes
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.layout = Layout.from_attributes(dict(self.group.attrs), labelled="labels" in self.group)
        self.grid = self.layout.grid
        # zarr by default compares every chunk written with the fill value, to skip storing
        # "empty" chunks; a cache never writes one, and the check was 60% of the writer's CPU.
        arrays = {name: self.group[name].with_config({"write_empty_chunks": True}) for name in self.group.array_keys()}
        self._done = arrays.pop("chunk_done")
        self._arrays = arrays
        self._buffers: dict[int, dict[str, list[np.ndarray]]] = {}
        self._filled: dict[int, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_chunks)
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
        zstd, crc = ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()
        n, rows = layout.num_samples, layout.chunk_rows
        for name, spec in layout.arrays().items():
            group.create_array(name, shape=(n, *spec.shape), chunks=(rows, *spec.shape), dtype=spec.dtype, fill_value=spec.fill,
                               compressors=[zstd, crc] if spec.compressed else [crc], dimension_names=spec.dimensions)
        group.create_array("chunk_done", shape=(layout.grid.num_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                           compressors=[crc], dimension_names=("chunk",))
        return cls(path, lock=lock)

    def missing_chunks(self) -> list[int]:
        return [int(c) for c in np.flatnonzero(self._done[:] == 0)]

    def forget_damaged_chunks(self) -> None:
        """Before resuming: remove the temporary files a killed zarr write leaves (`*.partial`),
        and unmark the chunks whose `chunk_done` record cannot be read (a 0-byte file) or whose
        rows were never written (`index` holds -1, or cannot be read) although marked done, so
        that they are computed again. Such damage comes from outside this tool (a writer marks a
        chunk only after writing all of it); recomputing costs one chunk, refusing would cost
        the whole pass."""
        storage.remove_partial_files(self.path)
        done, unreadable = _read_tolerant(self._done, ChunkGrid(self.grid.num_chunks, 1), 0)
        index, _ = _read_tolerant(self._arrays["index"], self.grid, -1)
        unwritten = [c for c in map(int, np.flatnonzero(done)) if (index[slice(*self.grid.rows(c))] < 0).any()]
        damaged = sorted({*unreadable, *unwritten})
        if damaged:
            log.warning("%s: chunks %s were marked done but their record is damaged or their rows were never written; "
                        "computing them again", self.path, damaged[:10])
            for chunk in damaged:
                self._done[chunk] = 0
            self.group.attrs["complete"] = False

    def write_rows(self, start: int, rows: Rows) -> None:
        """Buffer rows [start, start + len) of every array; full chunks go to the writer thread.
        Rows of one chunk must not straddle another chunk's range within one call."""
        self._raise_writer_error()
        count = len(next(iter(rows.values())))
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
        """Wait for every queued chunk to be written; re-raise a failure of the writer thread."""
        if self._buffers:
            raise PipelineError(f"internal: chunks {sorted(self._buffers)} were left partly filled")
        self._put(None)
        self._thread.join()
        self._raise_writer_error()

    def abort(self) -> None:
        """Stop after the chunks already queued (at most max_pending_chunks); chunks not fully
        written stay unmarked. Waits for the thread: the caller releases the writer lock next,
        and no write may outlive it."""
        self._buffers.clear()
        self._filled.clear()
        self._queue.put(None)
        self._thread.join()

    def mark_complete(self, extra_attrs: dict) -> None:
        if self.missing_chunks():
            raise PipelineError("internal: marking a cache complete with chunks missing")
        if self._lock is not None:  # a writer that lost its lock must not declare another's cache finished
            self._lock.check_held()
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
                if self._lock is not None:
                    self._lock.check_held()
                start, stop = self.grid.rows(chunk)
                for name, values in rows.items():
                    self._arrays[name][start:stop] = values
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


def unreadable_chunks(array: zarr.Array, grid: ChunkGrid, chunks: range) -> list[int]:
    """Those of `chunks` of `array` (chunked as `grid`) that cannot be decoded."""
    bad = []
    for chunk in chunks:
        try:
            array[slice(*grid.rows(chunk))]
        except Exception:  # noqa: BLE001 - a checksum mismatch, a torn or truncated chunk: any decoding failure
            bad.append(chunk)
    return bad


def _read_tolerant(array: zarr.Array, grid: ChunkGrid, unreadable) -> tuple[np.ndarray, list[int]]:
    """The whole of `array` (chunked as `grid`), with the rows of chunks that cannot be decoded
    set to `unreadable`, and those chunks."""
    try:
        return array[:], []
    except Exception:  # noqa: BLE001 - located chunk by chunk below
        bad = unreadable_chunks(array, grid, range(grid.num_chunks))
        values = np.full(array.shape, unreadable, array.dtype)
        for chunk in sorted(set(range(grid.num_chunks)) - set(bad)):
            values[slice(*grid.rows(chunk))] = array[slice(*grid.rows(chunk))]
        return values, bad


# What must agree between an existing cache and a new writer for it to resume it.
RESUME_KEYS = ("kind", "num_samples", "num_classes", "row_shape", "top_k", "views", "features", "chunk_rows", "dtype", "codec",
               "temperature", "teacher_amp", "augment", "combine")


def open_writer(path: CacheLocation, layout: Layout, attrs: dict, *, overwrite: bool, lock=None) -> CacheWriter:
    """A writer on a new cache at `path`, or on the existing one when it was started with this
    layout from the same teachers and data (it is then resumed: only its missing chunks are
    left to write). A different cache there is refused unless `overwrite`. Call it with the
    writer lock held."""
    group = zarr.open_group(str(path), mode="r") if is_cache(path) else None
    if group is not None and not overwrite:
        differences = _differences(dict(group.attrs), {**layout.attributes(), **attrs})
        if differences:
            raise InputError(
                f"{path} holds a different cache ({'; '.join(differences)}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        # The same cache: resume it, unless its arrays were never all created (killed right
        # after its attributes), when it holds no finished chunk and is simply made again.
        if {*layout.arrays(), "chunk_done"} <= set(group.array_keys()):
            writer = CacheWriter(path, lock=lock)
            writer.forget_damaged_chunks()
            return writer
    remove_cache(path)
    return CacheWriter.create(path, layout, attrs, lock=lock)


def _differences(existing: dict, expected: dict) -> list[str]:
    """Human-readable differences that forbid resuming the `existing` cache with this writer."""
    found = [f"{k}: cache has {existing.get(k)}, this run {expected.get(k)}" for k in RESUME_KEYS if existing.get(k) != expected.get(k)]
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
    sample, view or valid token. A top-k cache gives the accuracy only: its NLL at T=1 would need
    the dropped logits."""
    if "labels" not in group:
        return None
    correct, nll, count = 0, 0.0, 0
    names = ("labels", *(("lengths",) if layout.tokens is not None else ()), "logits" if layout.kind == "dense" else "topk_indices")
    size = dataset_size(dict(group.attrs))
    for chunk in range(layout.grid.num_chunks):
        start, stop = layout.grid.rows(chunk)
        # Every chunk is marked done here, yet may be damaged from outside: say so, never crash on it.
        try:
            rows = {name: group[name][start:stop] for name in names}
        except Exception as exc:
            raise CacheDamagedError(f"chunk {chunk} of the cache cannot be read ({type(exc).__name__}: {exc}); run pipeline verify") from exc
        problem = row_problem(rows, layout, size, start)
        if problem:
            raise CacheDamagedError(f"chunk {chunk} of the cache holds {problem}; run pipeline verify")
        labels = torch.from_numpy(rows["labels"])
        if layout.views is not None:  # every view of a sample has the sample's label
            labels = labels.unsqueeze(1).expand(-1, layout.views)
        valid = (torch.ones(labels.shape, dtype=torch.bool) if layout.tokens is None
                 else torch.arange(layout.tokens) < torch.from_numpy(rows["lengths"]).unsqueeze(1))
        labels = labels[valid]
        if layout.kind == "dense":
            logits = torch.from_numpy(rows["logits"]).float()[valid] * temperature
            predicted = logits.argmax(-1)
            nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        else:
            predicted = torch.from_numpy(rows["topk_indices"]).long()[valid][:, 0]
        correct += int((predicted == labels).sum())
        count += len(labels)
    metrics = {"accuracy": correct / count, "errors": count - correct,
               "nll": nll / count if layout.kind == "dense" else None, "num_samples": layout.num_samples}
    if layout.tokens is not None:
        metrics["num_tokens"] = count
    if layout.views is not None:
        metrics["num_views"] = count
    return metrics


# Attributes every cache has, with their JSON types: a reader refuses a cache without them.
REQUIRED_ATTRS = {
    "format": str, "schema_version": int, "kind": str, "temperature": (int, float), "num_classes": int,
    "num_samples": int, "row_shape": list, "chunk_rows": int, "dtype": str, "teachers": list,
    "dataset": dict, "complete": bool,
}


# Exponent bits of IEEE floats: all ones means infinity or NaN.
_EXPONENT_MASKS = {np.dtype("float16"): (np.uint16, 0x7C00), np.dtype("float32"): (np.uint32, 0x7F800000)}


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite; for float16/32, by the exponent bits (4x faster than
    np.isfinite on float16, which matters on every chunk a student reads)."""
    if values.dtype not in _EXPONENT_MASKS:
        return bool(np.isfinite(values).all())
    bits, mask = _EXPONENT_MASKS[values.dtype]
    return not ((values.view(bits) & bits(mask)) == mask).any()


def dataset_size(attrs: dict) -> int:
    """Samples in the split a cache was made from: its `index` entries point into it."""
    return int(attrs["dataset"].get("fingerprint", {}).get("num_samples", attrs["num_samples"]))


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """Positions of the rows (first axis) holding a NaN or an infinity."""
    if all_finite(values):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))


# Values a required attribute may take, beyond its type: a temperature of 0 would divide by zero,
# a negative one turn every distribution upside down.
ATTR_RANGES = {
    "temperature": lambda t: math.isfinite(t) and t > 0, "num_classes": lambda c: c >= 1, "num_samples": lambda n: n >= 1,
    "chunk_rows": lambda r: r >= 1,
}


def malformed_attributes(attrs: dict) -> list[str]:
    """Names of required attributes that are missing, of the wrong type, or out of range."""
    return [name for name, kind in REQUIRED_ATTRS.items()
            if not _has_type(attrs.get(name), kind) or not ATTR_RANGES.get(name, lambda _: True)(attrs[name])]


def array_problems(group: zarr.Group, attrs: dict, layout: Layout) -> list[str]:
    """How the arrays of `group` disagree with the `layout` its attributes describe (absent, or
    of another shape, chunking or dtype), and the attributes with themselves (a `row_shape`
    that num_classes, top_k, views and tokens do not give): tampering or damage either way."""
    n, rows = layout.num_samples, layout.chunk_rows
    expected = {name: ((n, *spec.shape), spec.dtype) for name, spec in layout.arrays().items()}
    expected["chunk_done"] = ((layout.grid.num_chunks,), "uint8")
    problems = [] if attrs["row_shape"] == list(layout.row_shape) else [
        f"row_shape {attrs['row_shape']} disagrees with num_classes and top_k ({list(layout.row_shape)})"]
    problems += [
        f"{name}: {'absent' if name not in group else f'shape {group[name].shape}'} (expected {shape})"
        for name, (shape, _) in expected.items()
        if name not in group or group[name].shape != shape
    ]
    present = [name for name in layout.arrays() if name in group]
    problems += [f"{name}: chunked {group[name].chunks[0]} rows (expected {rows})" for name in present if group[name].chunks[0] != rows]
    problems += [f"{name}: dtype {group[name].dtype} (expected {expected[name][1]})" for name in present
                 if str(group[name].dtype) != expected[name][1]]
    return problems


def _has_type(value, kind) -> bool:
    # JSON booleans load as Python bools, which are ints too: never let one pass for a number.
    return kind is bool if isinstance(value, bool) else isinstance(value, kind)


def row_problem(rows: Rows, layout: Layout, dataset_size: int, first_row: int = 0) -> str | None:
    """What is wrong with rows read from a cache (the first at `first_row`), or None: non-finite
    values (an unwritten gap reads as NaN), or entries unwritten or out of range. Checks the
    arrays present."""
    for name in FLOAT_ARRAYS:
        if name in rows and not all_finite(rows[name]):
            return f"non-finite {name} in rows {(first_row + nonfinite_rows(rows[name])[:5]).tolist()}"
    if "index" in rows and (rows["index"].min() < 0 or rows["index"].max() >= dataset_size):
        return "index entries unwritten or outside the dataset"
    if "labels" in rows and (rows["labels"].min() < 0 or rows["labels"].max() >= layout.num_classes):
        return "label entries unwritten or outside [0, num_classes)"
    if "topk_indices" in rows and rows["topk_indices"].max() >= layout.num_classes:
        return "top-k class indices outside [0, num_classes)"
    if "lengths" in rows and (rows["lengths"].min() < 1 or rows["lengths"].max() > layout.tokens):
        return f"sequence lengths unwritten or outside [1, {layout.tokens}]"
    return None


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
        """The arrays holding this cache's soft labels (by kind)."""
        return SOFT_ARRAYS[self.layout.kind]

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
