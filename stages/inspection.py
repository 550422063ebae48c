"""Describe a cache before trusting it: what made it, how it is laid out, what it costs on disk,
and for a top-k cache how much of the teacher's probability its kept entries miss.

    pipeline inspect data/caches/bytelm-teacher-stdlib-bytes-train-T1-top32.zarr

Statistics over the soft labels are dask reductions over the Zarr arrays (dask.array.from_zarr),
computed chunk by chunk, so a cache larger than memory is described in bounded memory.
"""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np

from stages.cache import SOFT_ARRAYS, CacheReader, disk_usage


def describe_cache(path: Path) -> dict:
    """The figures `pipeline inspect` prints, as one JSON-ready dict."""
    reader = CacheReader(path, require_complete=False)
    attrs, layout = reader.attrs, reader.layout
    per_array = {name: disk_usage(reader.path / name) for name in reader.group.array_keys()}
    total = disk_usage(reader.path)
    soft = sum(per_array[name] for name in SOFT_ARRAYS[layout.kind] if name in per_array)
    report = {
        "kind": layout.kind,
        "schema_version": attrs["schema_version"],
        "complete": attrs["complete"],
        "temperature": reader.temperature,
        "num_classes": layout.num_classes,
        "top_k": layout.top_k,
        "row_shape": list(layout.row_shape),
        "row_axes": layout.row_axes,
        "dtype": layout.dtype,
        "codec": attrs.get("codec"),
        "num_samples": layout.num_samples,
        "chunk_rows": layout.chunk_rows,
        "teachers": ", ".join(f"{t.get('spec')} ({t.get('num_parameters')} parameters)" for t in attrs["teachers"]),
        "dataset": f"{attrs['dataset'].get('spec')} split {attrs['dataset'].get('split')}",
        "created_at": attrs.get("created_at"),
        "bytes_on_disk": total,
        "bytes_per_row": total / layout.num_samples,
        "soft_label_bytes_per_row": soft / layout.num_samples,
    }
    if layout.tokens is not None:
        lengths = reader.group["lengths"][:]
        tokens = int(lengths[lengths > 0].sum())  # unwritten rows (-1) of an incomplete cache do not count
        report["num_tokens"] = tokens
        report["padded_positions"] = layout.num_samples * layout.tokens - tokens
        report["bytes_per_token"] = total / max(tokens, 1)
        report["soft_label_bytes_per_token"] = soft / max(tokens, 1)
    report["bytes_per_array"] = per_array
    if layout.kind == "topk" and attrs["complete"]:
        report["tail_mass"] = _tail_mass(reader)
    report["teacher_metrics"] = attrs.get("teacher_metrics")
    return report


def _tail_mass(reader: CacheReader) -> dict:
    """The probability at the cache's T that the kept entries miss, 1 - sum(exp(v - lse)),
    over every row (or valid token): mean and largest."""
    group = reader.group
    values = da.from_zarr(group["topk_values"]).astype(np.float32)
    logsumexp = da.from_zarr(group["logsumexp"])
    tail = da.clip(1.0 - da.exp(values - logsumexp[..., None]).sum(axis=-1), 0.0, 1.0)
    if reader.layout.tokens is not None:
        valid = da.arange(reader.layout.tokens)[None, :] < da.from_zarr(group["lengths"])[:, None]
        tail = da.where(valid, tail, 0.0)
        count = valid.sum()
    else:
        count = tail.size
    mean, largest, count = dask.compute(tail.sum() / count, tail.max(), count, scheduler="threads")
    return {"mean": float(mean), "max": float(largest), "entries": int(count)}
