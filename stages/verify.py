"""Check a cache before trusting it: metadata, completeness, every chunk, the index and labels,
and optionally the stored logits against a fresh teacher forward on a sample of rows.

    pipeline verify data/caches/cnn-mnist-5k-train-T4.zarr
    pipeline verify CACHE --teacher cnn --teacher-weights data/teachers/cnn-mnist-5k.safetensors --rows 64

The per-chunk checks run as dask tasks over the write units (shards, or chunks when the cache is
unsharded), so a large cache is checked out of core and in parallel, and every damaged shard or
chunk is named rather than the first one only. Before zarr reads anything, every stored object
must be a regular file of the size its metadata allows (and in a complete cache, be there); in a
cache with a chunk manifest, each chunk must be the one written at its position (stages.cache.manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask
import numpy as np
import torch
import zarr

from stages.augment import Augmentation, view_seeds
from stages.cache.format import (
    SCHEMA_VERSION, array_problems, dataset_size, malformed_attributes, require_cache, row_problem,
)
from stages.cache.chunk_files import ChunkDamage
from stages.cache.layout import Layout
from stages.cache.manifest import Manifest, StoredChunks, check_stored
from stages.data import Split, sequence_lengths, sha256
from stages.errors import CacheMismatchError, InputError
from stages.kinds import KINDS
from stages.runtime import AMP_DTYPES
from stages.storage import CacheLocation
from stages.teacher_rows import teacher_rows
from stages.weights import weights_fingerprint


@dataclass
class Report:
    """Named checks, each passed or failed with a one-line detail."""

    cache: str
    checks: list[dict] = field(default_factory=list)
    max_abs_diff: float | None = None

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def as_dict(self) -> dict:
        return {"cache": self.cache, "ok": self.ok, "checks": self.checks, "max_abs_diff": self.max_abs_diff}


def verify(path: CacheLocation, *, teacher: torch.nn.Module | None = None, split: Split | None = None,
           samples: int = 0, seed: int = 0, device: torch.device | None = None, augment: Augmentation | None = None) -> Report:
    """Run every check on the cache at `path`. With `teacher` and `split` (the cached split),
    also re-run the teacher on `samples` random rows and compare with the stored values (on a
    view cache, on each view replayed by `augment` from its stored seed)."""
    require_cache(path)
    report = Report(str(path))
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    layout = _check_metadata(report, group, attrs)
    if layout is None:
        return report
    if split is not None and len(split) != dataset_size(attrs):  # its rows are indexed by the cache's
        raise CacheMismatchError(f"split {split.name!r} of the dataset given has {len(split):,} samples; cache {path} was made "
                                 f"from {dataset_size(attrs):,} (split {attrs['dataset'].get('split')!r} of {attrs['dataset'].get('spec')})")
    stored = StoredChunks.of(path, layout)
    if not _check_stored_objects(report, stored, attrs["complete"]):
        return report  # zarr would read a link to /dev/zero without end, and wait on a FIFO forever
    manifest = _read_manifest(report, group, attrs, layout) if attrs["complete"] and layout.manifest else None
    done = _read_whole(report, group, "chunk_done")
    if done is not None:
        missing = np.flatnonzero(done == 0)
        report.add("complete", attrs["complete"] and not len(missing),
                   f"complete={attrs['complete']}, {len(missing)} of {layout.write_grid.num_chunks} {layout.write_unit}s unwritten")
    for name in layout.unit_arrays():  # beside chunk_done: a lossy kind's record of what each unit lost
        values = None if name in ("chunk_done", "chunk_manifest") else _read_whole(report, group, name)
        if values is not None:
            unrecorded = int(np.isnan(values).any(-1).sum())
            report.add(name, not (attrs["complete"] and unrecorded), f"{unrecorded} of {len(values)} {layout.write_unit}s unrecorded")
    _check_chunks(report, group, attrs, layout, stored if attrs["complete"] else None, manifest)
    _check_index_and_labels(report, group, attrs)
    if layout.views is not None:
        _check_view_seeds(report, group, attrs, layout)
    if teacher is not None and split is not None and samples > 0:
        _check_against_teacher(report, group, attrs, layout, teacher, split, samples, seed, device or torch.device("cpu"), augment)
    return report


def _check_metadata(report: Report, group: zarr.Group, attrs: dict) -> Layout | None:
    """The layout the attributes describe, once they and the arrays agree with it; else None."""
    wrong = malformed_attributes(attrs)
    if not report.add("metadata", not wrong, f"missing, mistyped or out of range: {', '.join(f'{name}={attrs.get(name)!r}' for name in wrong)}" if wrong else "all attributes present"):
        return None
    if not report.add("schema", attrs["schema_version"] <= SCHEMA_VERSION and attrs["kind"] in KINDS,
                      f"schema {attrs['schema_version']} kind {attrs['kind']!r} (this tool reads {SCHEMA_VERSION}: {', '.join(KINDS)})"):
        return None
    try:
        layout = Layout.from_attributes(attrs, labelled="labels" in group)
    except (InputError, TypeError, IndexError) as exc:
        report.add("layout", False, f"inconsistent layout attributes ({exc})")
        return None
    problems = array_problems(group, attrs, layout)
    if not report.add("arrays", not problems, "; ".join(problems) or "shapes, chunking, sharding and dtypes as described"):
        return None
    return layout


def _check_stored_objects(report: Report, stored: dict[str, StoredChunks], complete: bool) -> bool:
    """Check that every stored object is a regular file (or object) no larger than its metadata allows and, in a
    complete cache, there, naming each that is not; whether zarr may read the cache (absent objects read as the fill)."""
    problems = [(f"array {name}: chunk {chunk} {what}", absent) for name, array in stored.items()
                for chunk, what, absent in array.object_problems(complete)]
    bad = [text for text, _ in problems]
    report.add("stored", not bad, "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
               if bad else "every chunk stored, each a regular file of the size its metadata allows")
    return all(absent for _, absent in problems)


def _read_manifest(report: Report, group: zarr.Group, attrs: dict, layout: Layout) -> Manifest | None:
    values = _read_whole(report, group, "chunk_manifest")
    return None if values is None else Manifest(attrs, layout, values)


def _check_chunk(group: zarr.Group, layout: Layout, chunk: int, dataset_size: int, stored: dict[str, StoredChunks] | None,
                 manifest: Manifest | None) -> str | None:
    """Why one write unit (shard, or chunk) is bad, or None when it is readable and its values are sound. With the
    arrays `stored` (of a complete cache), each chunk must be there and, with a `manifest`, be the one written there."""
    start, stop = layout.write_grid.rows(chunk)
    rows = {}
    for name in layout.arrays():
        try:
            if stored is not None:
                check_stored(stored[name], layout.chunks_of(chunk), manifest)
            rows[name] = group[name][start:stop]
        except ChunkDamage as damage:
            return f"array {name}: chunk {damage.chunk} {damage.what}"
        except Exception as exc:  # noqa: BLE001 - a checksum mismatch, a torn or truncated chunk
            return f"unreadable {name} ({type(exc).__name__}: {exc})"
    return row_problem(rows, layout, dataset_size, start)


def _check_chunks(report: Report, group: zarr.Group, attrs: dict, layout: Layout, stored: dict[str, StoredChunks] | None,
                  manifest: Manifest | None) -> None:
    grid, unit = layout.write_grid, layout.write_unit
    tasks = [dask.delayed(_check_chunk)(group, layout, c, dataset_size(attrs), stored, manifest) for c in range(grid.num_chunks)]
    results = dask.compute(*tasks, scheduler="threads")
    bad = [f"{unit} {c}: {why}" for c, why in enumerate(results) if why]
    report.add("chunks", not bad, "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
               if bad else f"{grid.num_chunks} {unit}s readable, finite and in range")


def _check_index_and_labels(report: Report, group: zarr.Group, attrs: dict) -> None:
    index = _read_whole(report, group, "index")
    if index is None:
        return
    size = dataset_size(attrs)
    if len(index) and (index.min() < 0 or index.max() >= size):
        problem = "entries outside the dataset"
    elif len(np.unique(index)) != len(index):
        problem = "repeated dataset indices"
    elif sha256(index) != attrs["dataset"].get("index_sha256"):
        problem = "hash differs from dataset.index_sha256"
    else:
        problem = None
    if not report.add("index", problem is None, problem or "unique, in range, and its hash matches the attributes"):
        return  # labels are checked through the index: not with a broken one
    labels = _read_whole(report, group, "labels") if "labels" in group else None
    if labels is None:
        return
    # The fingerprint hashes labels in dataset order; the cache stores them in row order.
    in_dataset_order = np.full((size, *labels.shape[1:]), -1, dtype=np.int64)
    in_dataset_order[index] = labels
    matches = sha256(in_dataset_order) == attrs["dataset"].get("fingerprint", {}).get("labels_sha256")
    report.add("labels", matches, "match the dataset fingerprint" if matches else "differ from the dataset fingerprint")


def _check_view_seeds(report: Report, group: zarr.Group, attrs: dict, layout: Layout) -> None:
    """Every view's seed is the one its base seed, sample and view number give."""
    index, seeds = _read_whole(report, group, "index"), _read_whole(report, group, "view_seeds")
    if index is None or seeds is None:
        return
    base = (attrs.get("augment") or {}).get("base_seed")
    same = isinstance(base, int) and np.array_equal(seeds, view_seeds(base, index, layout.views))
    report.add("views", same, f"{layout.views} view seeds per row derived from base seed {base}" if same
               else "view seeds differ from those the base seed gives")


def _read_whole(report: Report, group: zarr.Group, name: str) -> np.ndarray | None:
    """A whole (small, per-row) array, or None after reporting it unreadable."""
    try:
        return group[name][:]
    except Exception as exc:
        report.add(name, False, f"unreadable ({type(exc).__name__})")
        return None


def _check_against_teacher(report: Report, group: zarr.Group, attrs: dict, layout: Layout, teacher: torch.nn.Module,
                           split: Split, samples: int, seed: int, device: torch.device, augment: Augmentation | None) -> None:
    """Re-run the teacher on random rows, derive what the cache should hold for them exactly as
    cache-teacher does, and compare every stored array."""
    n = layout.num_samples
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    stored = {name: group[name].oindex[rows] for name in layout.arrays()
              if name not in ("index", "labels", "view_seeds", *layout.position_arrays)}
    index = group["index"].oindex[rows]
    inputs = split.inputs(index)
    if layout.views is not None:  # every view, replayed from its stored seed; views of a sample adjacent
        if augment is None:
            raise InputError("verifying a view cache against its teacher needs the augmentation that made its views")
        inputs = augment(inputs.repeat_interleave(layout.views, dim=0), group["view_seeds"].oindex[rows].reshape(-1))
    lengths = None if layout.tokens is None else torch.from_numpy(sequence_lengths(split, layout.tokens)[index])
    teacher = teacher.to(device).eval()
    amp = attrs.get("teacher_amp", "none")
    # The cache's own mask of trained positions (the others hold zeros, as padding does).
    trained = group["trained"].oindex[rows] == 1 if layout.trained_mask else None
    padding = None if lengths is None else np.arange(layout.tokens) >= lengths.numpy()[:, None]
    if trained is not None:
        padding |= ~trained
    pairs: list[dict[str, tuple]] = []
    by_positions = layout.tokens is not None and layout.views is None  # how teacher_rows may cut a batch

    def check_piece(first: int, over_t: torch.Tensor, fresh_piece: dict[str, torch.Tensor]) -> None:
        # What may legitimately differ in order (near-ties in a top k) is compared by value, piece by piece.
        positions = slice(first, first + over_t.shape[1])
        piece = {name: values[:, positions] for name, values in stored.items()} if by_positions else stored
        pairs.append(layout.soft_kind.verify_pairs(piece, over_t.to(getattr(torch, layout.dtype)),
                                                   {name: values.cpu().numpy() for name, values in fresh_piece.items()},
                                                   padding[:, positions] if by_positions and padding is not None else padding))

    with torch.inference_mode():  # exactly as the teacher ran when caching (amp, pieces)
        fresh_rows = teacher_rows(teacher, inputs.to(device), layout, attrs["temperature"], amp, lengths, check_piece,
                                 row_index=torch.from_numpy(index), trained=None if trained is None else torch.from_numpy(trained))
        fresh = {name: values.cpu().numpy() for name, values in fresh_rows.items()}
    # Storage rounds to the cache's dtype: allow that rounding (relative) plus a little for
    # kernels that differ between batch compositions or devices; under autocast, reduced
    # precision kernels round at their own (coarser) precision, in each layer.
    eps = float(np.finfo(layout.dtype).eps)
    if amp != "none":
        eps = max(eps, 4 * float(torch.finfo(AMP_DTYPES[amp]).eps))
    compared = {name: (fresh[name].astype(np.float32), stored[name].astype(np.float32)) for name in layout.float_arrays
                if name in stored}
    for name in pairs[0]:
        compared[name] = tuple(np.concatenate([piece[name][i] for piece in pairs], axis=1 if by_positions else 0)
                               for i in range(2))
    report.max_abs_diff = max(float(np.abs(a - b).max()) for a, b in compared.values())
    bad = [name for name, (a, b) in compared.items() if not (np.abs(a - b) <= 1e-3 + eps * np.abs(a)).all()]
    recorded = (attrs.get("teachers") or [{}])[0].get("weights_sha256")
    other_weights = recorded is not None and weights_fingerprint(teacher) != recorded
    report.add("teacher", not bad, f"{len(rows)} rows re-run, largest |difference| {report.max_abs_diff:.3g} (in logits/T)"
               + (f"; {', '.join(bad)} differ" if bad else "")
               + ("; these are not the weights the cache records (sha256 differs)" if other_weights else ""))
