"""The cache contract: a versioned, self-describing Zarr v3 group of softened teacher outputs.

docs/cache-format.md is the one description of the format: every array (its
shape, dimension names, dtype and fill), every attribute, the checksums and the schema history.
The arrays of each kind are declared by its class in stages.kinds and laid out by
stages.cache.layout; this module checks a cache's attributes and stored values against them. What the format is built around:

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
schema 2 caches (no checksums, no dimension names) as schema 3, schema 3 caches (before
`shard_rows`) as unsharded schema 4 caches, schema 4 caches (the kind's options as
attributes of their own, `top_k`, `value_bits`, `samples`, `sample_seed`) as schema 5 caches,
whose `kind_options` attribute holds them all, and schema 5 caches (no `chunk_manifest`, no
`cache_id`) as schema 6 caches without the check that each chunk is the one written at its
position (stages.cache.manifest).
"""

from __future__ import annotations

import math
import stat
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from stages.cache.layout import ChunkGrid, Layout
from stages.kinds import Rows
from stages import storage
from stages.errors import CacheDamagedError, InputError
from stages.storage import CacheLocation

FORMAT = "distill-cache"
SCHEMA_VERSION = 6
CHECKSUM_SCHEMA = 3  # the first schema whose every chunk ends in a crc32c
STORED_VALUES = "teacher_logits / temperature"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# More than a cache's zarr.json documents ever hold: its attributes (teachers, dataset, kind
# options) are a few KiB, an array's metadata less.
MAX_METADATA_BYTES = 16 * 2**20


def metadata_problem(path: CacheLocation) -> str | None:
    """Why the zarr.json documents of the local cache at `path` (the group's and its arrays')
    cannot be read safely, or None: zarr reads each whole, so a FIFO there would wait forever and
    a link to /dev/zero never end. (An object store serves objects only.)"""
    if storage.is_url(path):
        return None
    root = Path(path)
    for document in (root / "zarr.json", *root.glob("*/zarr.json")):
        try:
            info = document.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{document} cannot be read ({exc.strerror})"
        if not stat.S_ISREG(info.st_mode):
            return f"{document} is not a regular file"
        if info.st_size > MAX_METADATA_BYTES:
            return f"{document} holds {info.st_size:,} bytes, more than a cache's metadata ever does"
    return None


def require_cache(path: CacheLocation) -> None:
    """Refuse what is at `path` unless it is a cache of this tool whose metadata can be read."""
    if not storage.exists(path):
        raise InputError(f"cache not found: {path}")
    problem = metadata_problem(path)
    if problem:
        raise CacheDamagedError(f"cache {path}: {problem}; a cache's metadata are its own files")
    if not is_cache(path):
        raise InputError(f"{path} is not a cache written by this tool (no '{FORMAT}' format attribute)")


def is_cache(path: CacheLocation) -> bool:
    if metadata_problem(path):
        return False
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    # TypeError, AttributeError: a zarr.json that is JSON but not a zarr document ([], null)
    except (FileNotFoundError, ValueError, OSError, TypeError, AttributeError, zarr.errors.NodeTypeValidationError):
        return False


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
        f"row_shape {attrs['row_shape']} disagrees with num_classes and the kind's options ({list(layout.row_shape)})"]
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
    version = attrs["schema_version"]
    if version >= CHECKSUM_SCHEMA:  # a chunk without its checksum could be anything: refused, not trusted
        problems += [f"{name}: its chunks carry no crc32c checksum (schema {version} requires one)"
                     for name in expected if name in group and not _checksummed(group[name])]
    return problems


def _checksummed(array: zarr.Array) -> bool:
    """Whether every chunk of `array` ends in a crc32c checksum (and, sharded, each shard's index)."""
    codecs = list(array.metadata.to_dict()["codecs"])
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        config = codecs[0]["configuration"]
        return _ends_in_crc32c(config["codecs"]) and _ends_in_crc32c(config["index_codecs"])
    return _ends_in_crc32c(codecs)


def _ends_in_crc32c(codecs) -> bool:
    codecs = list(codecs)
    return bool(codecs) and codecs[-1]["name"] == "crc32c"


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
    problem = layout.soft_kind.row_problem(rows, layout)
    if problem:
        return problem
    if "lengths" in rows and (rows["lengths"].min() < 1 or rows["lengths"].max() > layout.tokens):
        return f"sequence lengths unwritten or outside [1, {layout.tokens}]"
    if "trained" in rows and rows["trained"].max(initial=0) > 1:
        return "trained-position marks unwritten or other than 0 and 1"
    return None


