"""Describe a cache before trusting it: what made it, how it is laid out, what it costs on disk,
how calibrated and how confident its teacher is, and for a top-k cache how much of the
teacher's probability its kept entries miss.

    pipeline inspect data/caches/cnn-mnist-5k-train-T4.zarr --png data/inspect/cnn.png

Statistics over the soft labels are sums of per-chunk dask tasks, each reading its chunk through
the reader's checks (a damaged chunk is named, exit 4), so a cache larger than memory is described
in bounded memory.

Calibration compares the teacher's confidence (its largest probability) with whether its top
class is the label: the expected calibration error (ECE) over CALIBRATION_BINS equal-width
confidence bins, sum_b (n_b / n) |accuracy_b - confidence_b|. It is given at the cache's T
and at T=1 (the teacher's own temperature), and needs labels. A dense cache gives both exactly;
a top-k cache gives its largest probability exactly at its own T only (at another T the
normaliser needs the dropped logits), so its calibration is given at the cache's T alone, and its
entropy over the K kept classes plus the tail as one outcome, a lower bound of the full entropy.
"""

from __future__ import annotations

import math
from pathlib import Path

import dask
import numpy as np
import torch

from stages.cache.reader import CacheReader
from stages.errors import CacheDamagedError, InputError
from stages.kinds.base import valid_positions
from stages.storage import CacheLocation, child, disk_usage, object_count, open_no_follow

CALIBRATION_BINS = 15
HISTOGRAM_BINS = 20
# distance_from_reference works through this many float64 probabilities at a time (about 32 MB each array).
REFERENCE_STEP_VALUES = 4_000_000
# The smallest tail mass a cache's distribution is given there: float32's resolution next to 1.
TAIL_RESOLUTION = 2.0**-24


def describe_cache(path: CacheLocation) -> dict:
    """The figures `pipeline inspect` prints, as one JSON-ready dict."""
    reader = CacheReader(path, require_complete=False)
    attrs, layout = reader.attrs, reader.layout
    per_array = {name: disk_usage(child(reader.path, name)) for name in reader.group.array_keys()}
    total = disk_usage(reader.path)
    kind = layout.soft_kind
    soft = sum(per_array[name] for name in kind.soft_arrays if name in per_array)
    report = {
        "kind": layout.kind,
        "schema_version": attrs["schema_version"],
        "complete": attrs["complete"],
        "temperature": reader.temperature,
        "num_classes": layout.num_classes,
        **layout.options.attributes(),  # the kind's options, each by its name (top_k, value_bits, samples, sample_seed, ...)
        "views": layout.views,
        "augment": attrs.get("augment"),
        "row_shape": list(layout.row_shape),
        "row_axes": layout.row_axes,
        "dtype": layout.dtype,
        "codec": attrs.get("codec"),
        "num_samples": layout.num_samples,
        "chunk_rows": layout.chunk_rows,
        "shard_rows": layout.shard_rows,
        "teachers": ", ".join(f"{t.get('spec')} ({t.get('num_parameters')} parameters)" for t in attrs["teachers"]),
        "dataset": f"{attrs['dataset'].get('spec')} split {attrs['dataset'].get('split')}",
        "created_at": attrs.get("created_at"),
        "bytes_on_disk": total,
        "objects": object_count(reader.path),
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
        if layout.trained_mask:  # soft labels only where the student learns: what they cost per such token
            trained = int(sum(int((reader.group["trained"][start:stop] == 1).sum())
                              for start, stop in map(layout.grid.rows, range(layout.grid.num_chunks))))
            report["trained_positions"] = trained
            report["bytes_per_trained_token"] = total / max(trained, 1)
            report["soft_label_bytes_per_trained_token"] = soft / max(trained, 1)
    report["bytes_per_array"] = per_array
    if kind.class_ids_array is not None and attrs["complete"]:
        # What compression leaves of each kept id: it depends on how alike the teacher's kept sets are.
        positions = report.get("trained_positions", report.get("num_tokens", layout.num_samples * math.prod(layout.position_shape)))
        report["bits_per_class_id"] = per_array[kind.class_ids_array] * 8 / max(positions * kind.width(layout), 1)
    if kind.statistics_arrays and attrs["complete"]:
        report.update(_kind_statistics(reader))
    if kind.lossy and attrs["complete"]:
        report["encoding_error"] = _encoding_error(reader)
    report["teacher_metrics"] = attrs.get("teacher_metrics")
    if attrs["complete"]:
        report.update(_distribution_statistics(reader))
    return report


def _distribution_statistics(reader: CacheReader) -> dict:
    """Calibration (with labels) and histograms of confidence and entropy, as sums of per-chunk
    partial counts: each chunk of the dask arrays is one task."""
    layout = reader.layout
    kind = layout.soft_kind
    # At T=1 too, where the kind's probabilities re-temper exactly (at another T, a top-k cache's tail is an estimate).
    temperatures = [reader.temperature] + ([1.0] if kind.exact_at_any_temperature and reader.temperature != 1.0 else [])
    names = (*kind.soft_arrays, *(name for name in ("labels", *layout.position_arrays) if name in reader.arrays))
    parts = [dask.delayed(_chunk_statistics)(chunk, layout, reader.temperature, temperatures)
             for chunk in _chunks(reader, names)]
    totals = dask.compute(*parts, scheduler="threads")
    summed = {key: sum(part[key] for part in totals) for key in totals[0]}
    out: dict = {"calibration": {}, "histograms": {}}
    for t in temperatures:
        key = f"T={t:g}"
        count, confidence, correct = summed[f"count {key}"], summed[f"confidence {key}"], summed[f"correct {key}"]
        n = count.sum()
        entry = {"mean_confidence": float(confidence.sum() / n)}
        if "labels" in names:
            entry["accuracy"] = float(correct.sum() / n)
            entry["ece"] = float(np.abs(correct - confidence).sum() / n)
            if f"nll {t:g}" in summed:  # where the kind knows the label's probability exactly
                entry["nll"] = float(summed[f"nll {t:g}"][0] / n)
            entry["reliability"] = {
                "bin_edges": np.linspace(0, 1, CALIBRATION_BINS + 1).tolist(), "count": count.astype(int).tolist(),
                "accuracy": np.divide(correct, count, out=np.full_like(correct, np.nan), where=count > 0).tolist(),
                "confidence": np.divide(confidence, count, out=np.full_like(confidence, np.nan), where=count > 0).tolist(),
            }
        out["calibration"][key] = entry
    cache_t = f"T={reader.temperature:g}"
    out["histograms"] = {
        "max_probability": {"temperature": reader.temperature, "bin_edges": np.linspace(0, 1, HISTOGRAM_BINS + 1).tolist(),
                            "count": summed[f"max_probability {cache_t}"].astype(int).tolist()},
        "entropy_nats": {"temperature": reader.temperature,
                         "bin_edges": np.linspace(0, np.log(layout.num_classes), HISTOGRAM_BINS + 1).tolist(),
                         "count": summed[f"entropy {cache_t}"].astype(int).tolist(),
                         "of": kind.entropy_of},
    }
    return out


def _chunk_statistics(rows: dict[str, np.ndarray], layout, cache_temperature: float,
                      temperatures: list[float]) -> dict[str, np.ndarray]:
    """One chunk's partial sums: per confidence bin, the rows (or valid tokens) in it, their
    confidence and how many are right, at each temperature; histograms of the largest
    probability and the entropy at the cache's T."""
    kind, num_classes = layout.soft_kind, layout.num_classes
    predicted = kind.top1(rows)
    valid = np.ones(predicted.shape, dtype=bool) if "lengths" not in rows else valid_positions(rows, predicted.shape[1])
    if "labels" in rows:  # every view of a sample has the sample's label
        labels = rows["labels"][:, None] if predicted.ndim > rows["labels"].ndim and "lengths" not in rows else rows["labels"]
        right = (predicted == labels)[valid]
    else:
        right = np.zeros(valid.sum())
    sums: dict[str, np.ndarray] = {}
    for t in temperatures:
        probs = kind.probabilities(rows, num_classes, cache_temperature / t)
        label_probs = None if "labels" not in rows else kind.label_probabilities(probs, np.broadcast_to(labels, predicted.shape))
        if label_probs is not None:  # where the kind knows the label's probability exactly
            sums[f"nll {t:g}"] = np.array([-np.log(np.maximum(label_probs[valid], 1e-300)).sum()])
        probs = probs[valid]
        confidence = kind.confidence(probs)
        bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
        key = f"T={t:g}"
        sums[f"count {key}"] = np.bincount(bins, minlength=CALIBRATION_BINS).astype(np.float64)
        sums[f"confidence {key}"] = np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS)
        sums[f"correct {key}"] = np.bincount(bins, weights=right.astype(np.float64), minlength=CALIBRATION_BINS)
        if t == cache_temperature:
            entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)
            sums[f"max_probability {key}"] = np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0, 1))[0].astype(np.float64)
            sums[f"entropy {key}"] = np.histogram(entropy, bins=HISTOGRAM_BINS, range=(0, np.log(num_classes)))[0].astype(np.float64)
    return sums


def plot_report(report: dict, path: Path) -> None:
    """A PNG of the histograms of confidence and entropy at the cache's T and, with labels, the
    reliability diagram (accuracy against confidence per bin) at each temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = report.get("calibration", {})
    reliable = {key: entry["reliability"] for key, entry in calibration.items() if "reliability" in entry}
    panels = 2 + bool(reliable)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for ax, name, label in ((axes[0], "max_probability", "largest probability"), (axes[1], "entropy_nats", "entropy (nats)")):
        histogram = report["histograms"][name]
        edges = np.asarray(histogram["bin_edges"])
        ax.bar(edges[:-1], histogram["count"], width=np.diff(edges), align="edge", edgecolor="white")
        ax.set_xlabel(f"{label} at T={histogram['temperature']:g}")
        ax.set_ylabel("rows" if "num_tokens" not in report else "tokens")
    axes[0].set_title("teacher confidence")
    axes[1].set_title("teacher entropy")
    if reliable:
        ax = axes[2]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
        for key, diagram in reliable.items():
            ax.plot(diagram["confidence"], diagram["accuracy"], marker="o",
                    label=f"{key} (ECE {calibration[key]['ece']:.3f})")
        ax.set_xlabel("confidence (mean per bin)")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability")
        ax.legend(fontsize=8)
    figure.suptitle(f"{report['kind']} cache: {report['teachers']} on {report['dataset']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_no_follow(path, "wb") as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)


def _chunks(reader: CacheReader, names: tuple[str, ...]) -> list:
    """Each chunk's rows of the arrays `names`, as dask tasks reading through the reader's checks."""
    return [dask.delayed(reader.read_chunks)(chunk, chunk, names) for chunk in range(reader.grid.num_chunks)]


def distance_from_reference(path: CacheLocation, reference: CacheLocation, max_rows: int | None = None) -> dict:
    """How far the distribution a cache gives each row (or valid token) is from the one a dense
    cache of the same teacher gives, at the cache's T: the mean KL(reference || cached) in nats
    and the mean total variation distance, over the rows both caches hold (matched by their index
    in the dataset: the reference may hold any subset of the cache's rows, as a dense cache of a
    `rows=A:B` slice of a token dataset does, and the other way round), the first `max_rows` of
    them (default all). `rows_compared` says how many; caches that cannot be compared are an
    InputError naming what differs (_incomparable).

    The cached distribution is over every class: the kind's probabilities on its support, and the
    mass it leaves (a top-k cache's tail) spread evenly over the classes it does not name, the
    most even completion of what it knows. A sampled row is an estimate from S draws, zero on
    every class not drawn, so its KL is infinite wherever the teacher gives such a class any mass:
    `kl_nats` is then None and `infinite_kl_positions` counts those positions (the sampled loss is
    unbiased nonetheless: stages.losses.sampled_distillation_loss).

    It reads at least a row of both caches at a time, and computes REFERENCE_STEP_VALUES
    probabilities at a time (a few positions of a long row at a large vocabulary)."""
    cache, dense = CacheReader(path), CacheReader(reference)
    layout = cache.layout
    if dense.layout.kind != "dense":
        raise InputError(f"the reference {reference} must be a dense cache (every class's logit), not a {dense.layout.kind} one")
    differences = _incomparable(cache, dense)
    if differences:
        raise InputError(f"the reference {reference} cannot be compared with {path}: {'; '.join(differences)}")
    # Rows both hold, by their index in the dataset (a cache's `index` counts from its split's first row).
    ours, theirs = (reader.group["index"][:] + _first_row(reader) for reader in (cache, dense))
    _, mine, others = np.intersect1d(ours, theirs, assume_unique=True, return_indices=True)
    if len(mine) == 0:
        raise InputError(f"the reference {reference} holds none of the rows of {path} (dataset rows {_span(ours)} and "
                         f"{_span(theirs)})")
    order = np.argsort(mine)
    mine, others = mine[order][:max_rows], others[order][:max_rows]
    if "view_seeds" in cache.group:
        differ = (cache.group["view_seeds"].get_orthogonal_selection(mine) != dense.group["view_seeds"].get_orthogonal_selection(others)).any()
        if differ:
            raise InputError(f"the reference {reference} cannot be compared with {path}: views: other augmentation seeds")
    kind, classes, ratio = layout.soft_kind, layout.num_classes, dense.temperature / cache.temperature
    names = (*kind.soft_arrays, *layout.position_arrays)
    step = max(1, REFERENCE_STEP_VALUES // (classes * math.prod(layout.position_shape)))
    block = max(1, REFERENCE_STEP_VALUES // classes)
    kl_sum = tv_sum = 0.0
    positions = infinite = 0
    for first in range(0, len(mine), step):
        rows = _rows_at(cache, mine[first : first + step], names)
        logits = _rows_at(dense, others[first : first + step], ("logits",))["logits"]
        valid = np.ones(logits.shape[:-1], dtype=bool) if "lengths" not in rows else valid_positions(rows, logits.shape[1])
        soft, logits = {name: rows[name][valid] for name in kind.soft_arrays}, logits[valid]  # one row per valid position
        for part_start in range(0, len(logits), block):
            part = slice(part_start, part_start + block)
            p = torch.softmax(torch.from_numpy(logits[part]).double() * ratio, -1)
            q = _whole_distribution(kind, {name: values[part] for name, values in soft.items()}, classes)
            kl = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)  # xlogy(p, 0) = -inf where p > 0: an infinite KL
            finite = torch.isfinite(kl)
            kl_sum += float(kl[finite].sum())
            infinite += int((~finite).sum())
            tv_sum += float(0.5 * (p - q).abs().sum())
            positions += len(p)
    return {"reference": str(reference), "rows_compared": len(mine), "rows": layout.num_samples,
            "reference_rows": dense.layout.num_samples, "positions": positions,
            "kl_nats": None if infinite else kl_sum / positions, "infinite_kl_positions": infinite,
            "total_variation": tv_sum / positions}


def _incomparable(cache: CacheReader, dense: CacheReader) -> list[str]:
    """What keeps a dense cache from being a reference for `cache`, each named with both values:
    another teacher, another dataset or split (the same source sliced otherwise is the same
    dataset), other classes or positions per row. The temperature may differ: a dense cache
    re-tempers exactly."""
    differences = []
    ours, theirs = ([(t.get("spec"), t.get("weights_sha256")) for t in reader.attrs["teachers"]] for reader in (cache, dense))
    if [w for _, w in ours] != [w for _, w in theirs]:
        differences.append(f"teacher: {_teachers(dense)} in the reference, {_teachers(cache)} in the cache (their weights_sha256 differ)")
    ours, theirs = _dataset_identity(cache), _dataset_identity(dense)
    if ours != theirs:
        differences.append(f"dataset: {_dataset_text(dense)} in the reference, {_dataset_text(cache)} in the cache")
    if dense.layout.num_classes != cache.layout.num_classes:
        differences.append(f"classes: {dense.layout.num_classes} in the reference, {cache.layout.num_classes} in the cache")
    if dense.layout.position_shape != cache.layout.position_shape:
        differences.append(f"positions per row ({', '.join(cache.layout.position_axes) or 'none'}): "
                           f"{list(dense.layout.position_shape)} in the reference, {list(cache.layout.position_shape)} in the cache")
    return differences


def _dataset_identity(reader: CacheReader) -> tuple:
    """What the rows of a cache come from, whatever range of it the cache holds: a token dataset's
    source (every `rows=A:B` slice of it shares it) and split, else the dataset spec, split and
    fingerprint (the same rows throughout)."""
    dataset = reader.attrs["dataset"]
    source = (dataset.get("fingerprint") or {}).get("source_sha256")
    if source is not None:
        return source, dataset.get("split")
    return dataset.get("spec"), dataset.get("split"), dataset.get("fingerprint")


def _first_row(reader: CacheReader) -> int:
    """The dataset row of the cache's row 0: a slice's first row (`dataset.first_row`; absent, 0, in caches made before it was recorded)."""
    return int(reader.attrs["dataset"].get("first_row") or 0)


def _teachers(reader: CacheReader) -> str:
    return ", ".join(f"{t.get('spec')} ({str(t.get('weights_sha256'))[:12]})" for t in reader.attrs["teachers"])


def _dataset_text(reader: CacheReader) -> str:
    dataset = reader.attrs["dataset"]
    return f"{dataset.get('spec')} split {dataset.get('split')!r}"


def _span(rows: np.ndarray) -> str:
    return f"{int(rows.min())}-{int(rows.max())}" if len(rows) else "none"


def _rows_at(reader: CacheReader, rows: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows `rows` (ascending) of `names`, read as the one range they span (rows both caches
    hold are a range of each) through the reader's checks."""
    read = reader.read_rows(int(rows[0]), int(rows[-1]) + 1, names)
    return {name: values[rows - rows[0]] for name, values in read.items()}


def _whole_distribution(kind, rows: dict[str, np.ndarray], classes: int) -> torch.Tensor:
    """A kind's distribution over every class at the cache's T (float64, (..., C)): its
    probabilities on its support, the rest of the mass spread evenly over the other classes.

    The rest is the tail a kind gives after its kept classes (top-k, qtopk), at least
    TAIL_RESOLUTION: a top-k row's 1 - sum(kept) rounds a tail below float32's resolution to 0,
    which would make the KL of a sharp row infinite. A sampled row's shares of its draws are its
    whole estimate: nothing is left to spread (their float sum may fall short of 1 by 1e-16)."""
    probabilities = torch.from_numpy(kind.probabilities(rows, classes, 1.0))
    support = kind.support(rows)
    if support is None:
        return probabilities
    support = torch.from_numpy(support)
    kept = probabilities[..., : support.shape[-1]]
    if probabilities.shape[-1] > support.shape[-1]:
        rest = probabilities[..., -1:].clamp(min=TAIL_RESOLUTION)
    else:
        rest = torch.zeros_like(kept[..., :1])
    # The classes it names: a sampled row's unused slots name class 0 with probability 0, and are not counted.
    named = torch.zeros((*support.shape[:-1], classes), dtype=torch.bool).scatter_(-1, support, kept > 0)
    spread = rest / (classes - named.sum(-1, keepdim=True)).clamp(min=1)
    whole = torch.where(named, 0.0, spread.expand(*support.shape[:-1], classes))
    return whole.scatter_add(-1, support, kept)


def _encoding_error(reader: CacheReader) -> dict:
    """What a lossy kind's encoding lost against the teacher's unquantised values, from the sums
    its writer recorded per write unit (`encoding_error`): the mean and largest absolute error in
    probability over the K kept classes and the tail, and the mean KL(unquantised || stored) in
    nats, per row (or valid token)."""
    try:
        units = reader.group["encoding_error"][:]
    except Exception as exc:  # a torn or flipped record: say so, never crash on it
        raise CacheDamagedError(f"cache {reader.path}: its encoding_error record cannot be read ({type(exc).__name__}); "
                                "run pipeline verify") from exc
    torn = _torn_encoding_errors(units, reader.layout)
    if len(torn):
        raise CacheDamagedError(f"cache {reader.path}: its encoding_error record of {reader.layout.write_unit} {torn[0]} holds "
                                f"figures no encoding gives ({units[torn[0]].tolist()}); run pipeline verify")
    positions = units[:, 0].sum()
    outcomes = reader.layout.soft_kind.width(reader.layout) + 1
    return {"mean_abs_probability": float(units[:, 1].sum() / (positions * outcomes)),
            "max_abs_probability": float(units[:, 2].max()), "mean_kl_nats": float(units[:, 3].sum() / positions),
            "positions": int(positions)}


def _torn_encoding_errors(units: np.ndarray, layout) -> np.ndarray:
    """The write units whose `encoding_error` row (positions, sum and largest absolute error in
    probability, summed KL) no encoding gives: a non-finite figure, positions not a whole number
    within the unit's, a negative error or KL (the KL of each position is clamped at 0), a summed
    error past 2 a position (two distributions differ by at most 2 in total) or a largest past 1."""
    per_row = math.prod(layout.position_shape)
    capacity = np.diff([layout.write_grid.rows(unit)[0] for unit in range(len(units))] + [layout.num_samples]) * per_row
    positions, summed, largest, kl = units.T
    with np.errstate(invalid="ignore"):
        sound = (np.isfinite(units).all(-1) & (positions == np.round(positions)) & (positions >= 0) & (positions <= capacity)
                 & (summed >= 0) & (summed <= 2 * positions + 1e-6) & (largest >= 0) & (largest <= 1) & (kl >= 0)
                 & ((positions > 0) | (units[:, 1:] == 0).all(-1)))
    return np.flatnonzero(~sound)


def _kind_statistics(reader: CacheReader) -> dict:
    """The kind's own figures (a top-k cache's tail mass), summed over per-chunk dask tasks."""
    kind = reader.layout.soft_kind
    names = (*kind.statistics_arrays, *reader.layout.position_arrays)
    parts = dask.compute(*(dask.delayed(kind.chunk_statistics)(chunk) for chunk in _chunks(reader, names)), scheduler="threads")
    return kind.summarise(list(parts))
