"""The cache contract: a versioned, self-describing Zarr v3 group of softened teacher outputs.

The README's "The cache format" section is the one description of the format: every array (its
shape, dimension names, dtype and fill), every attribute, the checksums and the schema history.
The arrays of each kind are declared by its class in stages.kinds; this module lays them out and
checks a cache's attributes against them. What the format is built around:

The optional L axis makes a token-level cache, for models that output logits per token (a
language model): `row_axes` names the axes after the sample axis ("token", then "class" for
dense, "rank" for top-k or "draw" for sampled), and positions at or past a sequence's length hold zeros and never
count. Every per-row array is chunked along the sample axis only, on two grids. The chunks of
`chunk_rows` rows are the read unit (`Layout.grid`): a reader decodes whole chunks and
shuffles between them (stages.cache.chunk_files reads a local cache's chunks, sharded or not,
straight from their files). A large cache groups them into zarr v3 shards of `shard_rows` rows
(a multiple of chunk_rows), one object per shard and array, so that a billion rows are not a
million files while a reader still fetches only the chunks it needs (the shard's index says
where each lies). The write unit (`Layout.write_grid`) is the shard, or the chunk when the
cache is unsharded: a writer owns whole write units (zarr rewrites a whole shard, or chunk,
that a write covers in part), and `chunk_done` has one element per write unit, each its own
storage object, so marking one complete never rewrites another's.

Room for later kinds without breaking readers of these: `kind` names a class of stages.kinds, rows
may carry further named axes (views), and `teachers` is a list with a `combine` rule for
ensembles. Schema 1 caches (dense, one row per sample, before `row_axes`) read as schema 2,
schema 2 caches (no checksums, no dimension names) as schema 3, and schema 3 caches (before
`shard_rows`) as unsharded schema 4 caches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import zarr

from stages.config import CODECS, DTYPES
from stages.errors import InputError, PipelineError
from stages.kinds import KINDS, ArraySpec, Kind, Rows
from stages.runtime import autocast
from stages.storage import CacheLocation

FORMAT = "distill-cache"
SCHEMA_VERSION = 4
STORED_VALUES = "teacher_logits / temperature"
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
# Default sharding: a cache whose soft labels take more than SHARD_ABOVE_BYTES is sharded, in
# shards of 64-128 MiB (SHARD_BYTES) of its largest soft-label array: 8-16 files per GiB of an
# array instead of about 500 chunk files. Below, every chunk stays its own object: small caches
# (and the tests) keep resuming a chunk at a time. Within that range a shard is 1/MIN_SHARDS of
# the array, so that a cache just above the threshold still has about that many shards to
# resume, verify and hand to dask workers.
SHARD_ABOVE_BYTES = 2**30
SHARD_BYTES = (64 * 2**20, 128 * 2**20)
MIN_SHARDS = 16


def default_chunk_rows(row_bytes: int, num_samples: int) -> int:
    """Rows per chunk: about DEFAULT_CHUNK_BYTES of soft labels, at most MAX_CHUNK_ROWS rows,
    then evened out over the samples: zarr stores a short last chunk at full size, so 4,697 rows
    in chunks of 585 would store 5,265; in 9 chunks of 522 they store 4,698."""
    target = int(max(64, min(MAX_CHUNK_ROWS, DEFAULT_CHUNK_BYTES // max(row_bytes, 1))))
    chunks = -(-num_samples // target)
    return -(-num_samples // chunks)


def default_shard_rows(layout: Layout) -> int | None:
    """Rows per shard for `layout` (its chunk_rows set): None (unsharded) for soft labels of at
    most SHARD_ABOVE_BYTES, else the whole chunks that hold up to 1/MIN_SHARDS of the largest
    soft-label array, kept within SHARD_BYTES. None too when a single chunk is that large
    already: a shard of one chunk would only add an index."""
    if layout.row_bytes * layout.num_samples <= SHARD_ABOVE_BYTES:
        return None
    largest = max(np.dtype(spec.dtype).itemsize * math.prod(spec.shape) for spec in layout.soft_kind.arrays(layout).values())
    low, high = SHARD_BYTES
    target = min(max(largest * layout.num_samples / MIN_SHARDS, low), high)
    chunks = int(target // (largest * layout.chunk_rows))
    return chunks * layout.chunk_rows if chunks > 1 else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_cache(path: CacheLocation) -> bool:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    # TypeError, AttributeError: a zarr.json that is JSON but not a zarr document ([], null)
    except (FileNotFoundError, ValueError, OSError, TypeError, AttributeError, zarr.errors.NodeTypeValidationError):
        return False


@dataclass(frozen=True)
class ChunkGrid:
    """The split of N rows into chunks of `chunk_rows` rows (the last one may be short): the read
    chunks of a cache (Layout.grid), or its write units (Layout.write_grid)."""

    num_samples: int
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)




@dataclass(frozen=True)
class Layout:
    """What a cache holds and how it is laid out: its kind, shapes, dtypes, chunking and sharding.

    Writers create the arrays from it, readers rebuild it from the attributes, and a resumed
    write must find the same layout. Its kind's arrays are the kind's own (`soft_kind`)."""

    kind: str  # a name in stages.kinds.KINDS
    num_samples: int
    num_classes: int
    chunk_rows: int
    dtype: str = "float16"
    codec: str = "none"  # of the soft-label arrays (see CODECS)
    top_k: int | None = None  # top-k and qtopk caches: entries kept per row
    value_bits: int | None = None  # qtopk caches: bits of each kept probability's code
    samples: int | None = None  # sampled caches: classes drawn per row (S)
    sample_seed: int = 0  # sampled caches: the seed of the draws, with each row's index
    tokens: int | None = None  # token-level caches: positions per sample (L)
    views: int | None = None  # view caches: augmented views per sample (V)
    labelled: bool = True
    features: int | None = None  # feature targets: the teacher's feature vector per sample (or view) has F values
    shard_rows: int | None = None  # rows per shard, a multiple of chunk_rows; None: unsharded (a chunk per object)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"`format` must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise InputError(f"`codec` must be one of {', '.join(CODECS)}, got {self.codec!r}")
        self.soft_kind.check(self)
        if self.views is not None and self.tokens is not None:
            raise InputError("augmented views of token sequences are not supported: a view cache needs per-sample outputs")
        if self.features is not None and self.tokens is not None:
            raise InputError("feature targets are per sample: a teacher with logits per token cannot have them cached")
        if self.shard_rows is not None and (self.shard_rows < 1 or self.shard_rows % self.chunk_rows):  # zarr's shards hold whole chunks
            raise InputError(f"`shard_rows` must be a multiple of `chunk_rows` ({self.chunk_rows}), got {self.shard_rows}")

    @property
    def soft_kind(self) -> Kind:
        """The kind of soft labels the cache stores, which owns their arrays, encoding and reading."""
        return KINDS[self.kind]

    @property
    def grid(self) -> ChunkGrid:
        """The read chunks: what a reader decodes, and shuffles between."""
        return ChunkGrid(self.num_samples, self.chunk_rows)

    @property
    def write_grid(self) -> ChunkGrid:
        """The write units: shards, or chunks when unsharded. A writer owns whole ones, and
        `chunk_done` has one element per unit."""
        return ChunkGrid(self.num_samples, self.shard_rows or self.chunk_rows)

    @property
    def write_unit(self) -> str:
        """What a write unit is called in messages."""
        return "chunk" if self.shard_rows is None else "shard"

    def chunks_of(self, unit: int) -> range:
        """The read chunks that make up write unit `unit`."""
        per_unit = self.write_grid.chunk_rows // self.chunk_rows
        return range(unit * per_unit, min((unit + 1) * per_unit, self.grid.num_chunks))

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
        return (*self.position_shape, self.soft_kind.width(self))

    @property
    def position_axes(self) -> list[str]:
        """The names of `position_shape`'s axes."""
        return ["view"] if self.views is not None else ["token"] if self.tokens is not None else []

    @property
    def row_axes(self) -> list[str]:
        return [*self.position_axes, self.soft_kind.last_axis]

    def arrays(self) -> dict[str, ArraySpec]:
        """Per-row arrays, by name; their dimension names let xarray and other clients join them."""
        soft = self.codec != "none"
        position = self.position_axes
        arrays = self.soft_kind.arrays(self)
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

    def unit_arrays(self) -> dict[str, ArraySpec]:
        """Arrays with a row per write unit (their shape is the whole array's), each row its own
        object, so that recording one unit never rewrites another's: `chunk_done`, whether the
        unit is complete, and for a lossy kind `encoding_error`, what its encoding lost there
        (positions, sum and largest absolute error in probability, summed KL; stages.kinds)."""
        units = self.write_grid.num_chunks
        arrays = {"chunk_done": ArraySpec((units,), "uint8", 0, False, ("chunk",))}
        if self.soft_kind.lossy:
            arrays["encoding_error"] = ArraySpec((units, 4), "float64", float("nan"), False, ("chunk", "statistic"))
        return arrays

    @property
    def row_bytes(self) -> int:
        """Bytes of soft labels per sample, uncompressed."""
        return sum(np.dtype(spec.dtype).itemsize * math.prod(spec.shape) for spec in self.soft_kind.arrays(self).values())

    @property
    def float_arrays(self) -> tuple[str, ...]:
        """The arrays holding floats: a NaN in one is a gap or damage, never data."""
        return tuple(name for name, spec in self.arrays().items() if np.issubdtype(spec.dtype, np.floating))

    def attributes(self) -> dict:
        return {
            "kind": self.kind, "num_samples": self.num_samples, "num_classes": self.num_classes,
            "row_shape": list(self.row_shape), "row_axes": self.row_axes, "top_k": self.top_k, "samples": self.samples,
            "views": self.views, "features": self.features, "chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows,
            "dtype": self.dtype,
            "codec": "none" if self.codec == "none" else f"zstd(level={ZSTD_LEVEL})",
            # Only where there are draws: a cache of another kind records no seed it never used.
            **({"sample_seed": self.sample_seed} if self.samples is not None else {}),
            **({"value_bits": self.value_bits} if self.value_bits is not None else {}),
        }

    @classmethod
    def from_attributes(cls, attrs: dict, labelled: bool) -> Layout:
        """The layout a cache's attributes describe (schema 1 caches: dense, one row per sample;
        before schema 4: unsharded)."""
        row_shape = attrs["row_shape"]
        axes = attrs.get("row_axes") or ["class"]
        return cls(
            kind=attrs["kind"], num_samples=attrs["num_samples"], num_classes=attrs["num_classes"],
            chunk_rows=attrs["chunk_rows"], dtype=attrs["dtype"],
            codec="none" if attrs.get("codec", "none") == "none" else "zstd", top_k=attrs.get("top_k"),
            samples=attrs.get("samples"), sample_seed=attrs.get("sample_seed", 0), value_bits=attrs.get("value_bits"),
            tokens=row_shape[axes.index("token")] if "token" in axes else None,
            views=row_shape[axes.index("view")] if "view" in axes else None, labelled=labelled,
            features=attrs.get("features"), shard_rows=attrs.get("shard_rows"),
        )


# A token-level batch's logits are reduced to the stored arrays piece by piece along the
# positions, each piece (B, l, C) at most this many bytes as float32, when the teacher can give
# its logits by positions (`hidden_and_head`, as pipeline.hf's causal LMs do): so the memory a
# CPU teacher takes on the host, or a GPU one on its device, does not grow with B * L * C
# (16 sequences of 1,024 tokens over a 70,000-token vocabulary are 4.6 GB of float32 logits).
LOGIT_PIECE_BYTES = 64 * 2**20

# Called with each piece: (first position, the teacher's logits / T, the stored rows of it).
PieceHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]


def teacher_rows(teacher: torch.nn.Module, inputs: torch.Tensor, layout: Layout, temperature: float, amp: str,
                 lengths: torch.Tensor | None = None, each_piece: PieceHook | None = None,
                 row_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The soft-label (and feature) arrays a cache of `layout` stores for a batch of inputs (the
    rows with dataset indices `row_index`), on the teacher's device: its forward under `amp`
    autocast, logits / T rounded and encoded by the kind (stored_rows). Call it under torch.inference_mode. A teacher with
    `hidden_and_head(inputs) -> (hidden states (B, L, H), head)` on a token-level layout gives its
    logits in pieces along the positions (LOGIT_PIECE_BYTES), each reduced before the next."""
    split_forward = getattr(teacher, "hidden_and_head", None)
    device = inputs.device
    if split_forward is None or layout.tokens is None or layout.features is not None or layout.views is not None:
        with autocast(amp, device):
            if layout.features is None:
                logits, features = teacher(inputs), None
            else:
                logits, features = teacher.logits_and_features(inputs)
        if layout.views is not None:  # the views of a sample are adjacent: (B * V, ...) -> (B, V, ...)
            count = len(inputs) // layout.views
            logits = logits.reshape(count, layout.views, *logits.shape[1:])
            features = None if features is None else features.reshape(count, layout.views, -1)
        pieces = [(0, logits, features)]
    else:
        with autocast(amp, device):
            hidden, head = split_forward(inputs)
        step = max(1, LOGIT_PIECE_BYTES // (len(inputs) * layout.num_classes * 4))

        def piece(first: int) -> torch.Tensor:
            with autocast(amp, device):
                return head(hidden[:, first : first + step])

        pieces = ((first, piece(first), None) for first in range(0, hidden.shape[1], step))
    parts = []
    for first, logits, features in pieces:
        over_t = logits.float()
        if temperature != 1:
            over_t.div_(temperature)  # in place: the teacher's logits are not needed as they were
        rows = stored_rows(over_t, layout, lengths, None if features is None else features.float(), first_position=first,
                           overwrite=each_piece is None, row_index=row_index)
        if each_piece is not None:
            each_piece(first, over_t, rows)
        parts.append(rows)
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts], dim=1) for name in parts[0]}  # along the positions


def stored_rows(logits_over_t: torch.Tensor, layout: Layout, lengths: torch.Tensor | None = None,
                features: torch.Tensor | None = None, first_position: int = 0, overwrite: bool = False,
                row_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The soft-label arrays a cache of `layout` stores for a batch of teacher logits / T
    ((B, C), or (B, L, C) for a token-level cache: positions `first_position` onwards), computed
    on the logits' device, and the teacher's `features` (B, F) as they are (not divided by T),
    for a layout with features.

    Values are rounded to the cache dtype first, and a top-k row's log-sum-exp is taken over the
    whole rounded row: so exp(value - logsumexp) is exactly the probability a dense cache of the
    same teacher gives that class, and a top-k cache with K = C is the dense one, sorted. On
    a token-level cache, positions at or past a sequence's length are zeroed: what a teacher
    says about padding is not part of the cache (and would differ between teachers' masks).
    With `overwrite`, the kind may use float32 `logits_over_t` as its scratch space. `row_index`
    (B,): the rows' dataset indices, which a sampled cache's draws are a function of."""
    rounded = logits_over_t.to(getattr(torch, layout.dtype))
    padding = None if lengths is None else (
        torch.arange(first_position, first_position + rounded.shape[1], device=rounded.device)
        >= lengths.to(rounded.device).unsqueeze(1))
    scratch = logits_over_t if overwrite and logits_over_t.dtype == torch.float32 else None
    rows = layout.soft_kind.encode(rounded, layout, padding, scratch, row_index, first_position)
    if layout.features is not None:
        if features is None:
            raise PipelineError("internal: a layout with features, but no features given")
        rows["features"] = features.to(rounded.dtype)
    return rows


def unreadable_chunks(array: zarr.Array, grid: ChunkGrid, chunks: range) -> list[int]:
    """Those of `chunks` of `array` (chunked as `grid`) that cannot be decoded."""
    bad = []
    for chunk in chunks:
        try:
            array[slice(*grid.rows(chunk))]
        except Exception:  # noqa: BLE001 - a checksum mismatch, a torn or truncated chunk: any decoding failure
            bad.append(chunk)
    return bad



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
    of another shape, chunking, sharding or dtype), and the attributes with themselves (a
    `row_shape` that num_classes, top_k, samples, views and tokens do not give): tampering or
    damage either way."""
    n, rows = layout.num_samples, layout.chunk_rows
    expected = {name: ((n, *spec.shape), spec.dtype) for name, spec in layout.arrays().items()}
    expected.update({name: (spec.shape, spec.dtype) for name, spec in layout.unit_arrays().items()})
    problems = [] if attrs["row_shape"] == list(layout.row_shape) else [
        f"row_shape {attrs['row_shape']} disagrees with num_classes and top_k ({list(layout.row_shape)})"]
    problems += [
        f"{name}: {'absent' if name not in group else f'shape {group[name].shape}'} (expected {shape})"
        for name, (shape, _) in expected.items()
        if name not in group or group[name].shape != shape
    ]
    present = {name: group[name] for name in layout.arrays() if name in group}
    problems += [f"{name}: chunked {array.chunks[0]} rows (expected {rows})" for name, array in present.items() if array.chunks[0] != rows]
    shard_rows = {name: array.shards and array.shards[0] for name, array in present.items()}  # zarr: shards None when unsharded
    problems += [f"{name}: {_sharding(shard_rows[name])} (expected {_sharding(layout.shard_rows)})" for name in present
                 if shard_rows[name] != layout.shard_rows]
    problems += [f"{name}: dtype {array.dtype} (expected {expected[name][1]})" for name, array in present.items()
                 if str(array.dtype) != expected[name][1]]
    return problems


def _sharding(shard_rows: int | None) -> str:
    return f"{shard_rows} rows a shard" if shard_rows else "unsharded"


def _has_type(value, kind) -> bool:
    # JSON booleans load as Python bools, which are ints too: never let one pass for a number.
    return kind is bool if isinstance(value, bool) else isinstance(value, kind)


def row_problem(rows: Rows, layout: Layout, dataset_size: int, first_row: int = 0) -> str | None:
    """What is wrong with rows read from a cache (the first at `first_row`), or None: non-finite
    values (an unwritten gap reads as NaN), or entries unwritten or out of range. Checks the
    arrays present."""
    for name in layout.float_arrays:
        if name in rows and not all_finite(rows[name]):
            return f"non-finite {name} in rows {(first_row + nonfinite_rows(rows[name])[:5]).tolist()}"
    if "index" in rows and (rows["index"].min() < 0 or rows["index"].max() >= dataset_size):
        return "index entries unwritten or outside the dataset"
    if "labels" in rows and (rows["labels"].min() < 0 or rows["labels"].max() >= layout.num_classes):
        return "label entries unwritten or outside [0, num_classes)"
    problem = layout.soft_kind.row_problem(rows, layout.num_classes)
    if problem:
        return problem
    if "lengths" in rows and (rows["lengths"].min() < 1 or rows["lengths"].max() > layout.tokens):
        return f"sequence lengths unwritten or outside [1, {layout.tokens}]"
    return None


