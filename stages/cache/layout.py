"""How a cache is laid out: its kind and options, shapes, dtypes, chunking and sharding.

This module is the file contract's geometry, with nothing of running a teacher (stages.teacher_rows)
or of reading and checking stored values (stages.cache.format): the kinds (stages.kinds) are
typed against the `Shape` it satisfies and never import it, so that no import goes round in a
circle. Writers create the arrays from a `Layout`, readers rebuild it from a cache's attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from stages.config import CODECS, DTYPES
from stages.errors import InputError
from stages.kinds import KINDS, ArraySpec, Kind, KindOptions, kind_options

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
# The first schema whose caches have a `chunk_manifest` (stages.cache.manifest).
MANIFEST_SCHEMA = 6
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
    # The kind's options (stages.kinds): its Options, or a mapping of some of them (the rest at
    # their defaults), made its Options when the layout is built.
    options: KindOptions | Mapping[str, object] | None = None
    tokens: int | None = None  # token-level caches: positions per sample (L)
    # Token caches: whether a `trained` mask says which positions the student learns from (chat
    # data: the assistant's tokens); the others hold zeros in every soft-label array, as padding does.
    trained_mask: bool = False
    views: int | None = None  # view caches: augmented views per sample (V)
    labelled: bool = True
    features: int | None = None  # feature targets: the teacher's feature vector per sample (or view) has F values
    shard_rows: int | None = None  # rows per shard, a multiple of chunk_rows; None: unsharded (a chunk per object)
    manifest: bool = True  # whether the cache has a chunk_manifest (from schema MANIFEST_SCHEMA on)

    def __post_init__(self):
        object.__setattr__(self, "options", kind_options(self.kind, self.options))  # checks the kind's name too
        if self.dtype not in DTYPES:
            raise InputError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise InputError(f"`codec` must be one of {', '.join(CODECS)}, got {self.codec!r}")
        self.soft_kind.check(self)
        if self.views is not None and self.tokens is not None:
            raise InputError("augmented views of token sequences are not supported: a view cache needs per-sample outputs")
        if self.features is not None and self.tokens is not None:
            raise InputError("feature targets are per sample: a teacher with logits per token cannot have them cached")
        if self.trained_mask and self.tokens is None:
            raise InputError("a mask of trained positions needs a token cache (a teacher with logits per token)")
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
        per_unit = self.chunks_per_unit
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
        if self.trained_mask:  # 1 where the student learns, 0 elsewhere (255: unwritten)
            arrays["trained"] = ArraySpec((self.tokens,), "uint8", 255, True, ("sample", "token"))
        if self.views is not None:
            arrays["view_seeds"] = ArraySpec((self.views,), "uint64", 0, True, ("sample", "view"))
        if self.features is not None:
            arrays["features"] = ArraySpec((*self.position_shape, self.features), self.dtype, float("nan"), soft,
                                           ("sample", *position, "feature"))
        return arrays

    def unit_arrays(self) -> dict[str, ArraySpec]:
        """Arrays with a row per write unit (their shape is the whole array's), each row its own
        object, so that recording one unit never rewrites another's: `chunk_done`, whether the
        unit is complete; `chunk_manifest`, which chunk of each per-row array (`manifest_arrays`)
        was written at each of its positions (stages.cache.manifest); and for a lossy kind
        `encoding_error`, what its encoding lost there (positions, sum and largest absolute error
        in probability, summed KL; stages.kinds)."""
        units = self.write_grid.num_chunks
        arrays = {"chunk_done": ArraySpec((units,), "uint8", 0, False, ("chunk",))}
        if self.manifest:
            arrays["chunk_manifest"] = ArraySpec((units, len(self.manifest_arrays), self.chunks_per_unit), "uint32", 0, False,
                                                 ("chunk", "array", "read_chunk"))
        if self.soft_kind.lossy:
            arrays["encoding_error"] = ArraySpec((units, 4), "float64", float("nan"), False, ("chunk", "statistic"))
        return arrays

    @property
    def manifest_arrays(self) -> tuple[str, ...]:
        """The per-row arrays in the order of the manifest's `array` axis: by name."""
        return tuple(sorted(self.arrays()))

    @property
    def chunks_per_unit(self) -> int:
        return self.write_grid.chunk_rows // self.chunk_rows

    @property
    def row_bytes(self) -> int:
        """Bytes of soft labels per sample, uncompressed."""
        return sum(np.dtype(spec.dtype).itemsize * math.prod(spec.shape) for spec in self.soft_kind.arrays(self).values())

    @property
    def position_arrays(self) -> tuple[str, ...]:
        """The arrays that say which positions of a token cache hold soft labels (lengths, trained)."""
        return tuple(name for name in ("lengths", "trained") if name in self.arrays())

    @property
    def float_arrays(self) -> tuple[str, ...]:
        """The arrays holding floats: a NaN in one is a gap or damage, never data."""
        return tuple(name for name, spec in self.arrays().items() if np.issubdtype(spec.dtype, np.floating))

    def attributes(self) -> dict:
        return {
            "kind": self.kind, "num_samples": self.num_samples, "num_classes": self.num_classes,
            "row_shape": list(self.row_shape), "row_axes": self.row_axes, "kind_options": self.options.attributes(),
            "views": self.views, "features": self.features, "chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows,
            "dtype": self.dtype,
            "codec": "none" if self.codec == "none" else f"zstd(level={ZSTD_LEVEL})",
            "trained_mask": self.trained_mask,
        }

    @classmethod
    def from_attributes(cls, attrs: dict, labelled: bool) -> Layout:
        """The layout a cache's attributes describe (schema 1 caches: dense, one row per sample;
        before schema 4: unsharded; before schema 5: the kind's options as attributes of their own;
        before schema 6: no chunk manifest, unless the cache has a `cache_id`, which only a manifest's writer gives)."""
        version = attrs.get("schema_version")
        row_shape = attrs["row_shape"]
        axes = attrs.get("row_axes") or ["class"]
        return cls(
            kind=attrs["kind"], num_samples=attrs["num_samples"], num_classes=attrs["num_classes"],
            chunk_rows=attrs["chunk_rows"], dtype=attrs["dtype"],
            codec="none" if attrs.get("codec", "none") == "none" else "zstd", options=recorded_options(attrs),
            tokens=row_shape[axes.index("token")] if "token" in axes else None,
            views=row_shape[axes.index("view")] if "view" in axes else None, labelled=labelled,
            features=attrs.get("features"), shard_rows=attrs.get("shard_rows"), trained_mask=bool(attrs.get("trained_mask", False)),
            manifest="cache_id" in attrs or (isinstance(version, int) and version >= MANIFEST_SCHEMA),
        )


def recorded_options(attrs: dict) -> dict:
    """The kind's options a cache records: its `kind_options` attribute (schema 5 on), or before
    schema 5 the attributes of the same names (`top_k`, `value_bits`, `samples`, `sample_seed`)."""
    if "kind_options" in attrs:
        recorded = attrs["kind_options"]
        if not isinstance(recorded, dict):
            raise InputError(f"the cache's kind_options attribute is not a mapping of options: {recorded!r}")
        return recorded
    kind = KINDS.get(attrs.get("kind"))
    return {} if kind is None else {f.name: attrs[f.name] for f in fields(kind.Options) if attrs.get(f.name) is not None}
