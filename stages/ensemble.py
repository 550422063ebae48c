"""Combine the caches of several teachers into one cache of their ensemble.

    pipeline combine data/caches/cnn-s0.zarr data/caches/cnn-s1.zarr --out data/caches/cnn-ensemble.zarr

The sources must be complete caches of a kind that combines (stages.kinds), of the same dataset split, in the same row order,
at the same temperature T, with the same classes and row shape: an ensemble of teachers that
saw different samples is meaningless, so any difference is refused. Rules (`rule`), as a dense
cache applies them (stages.kinds.Dense.combine):

    mean-probs   (default) the ensemble's distribution is the average of the teachers'
                 softened distributions, p = mean_i softmax(t_i / T); the cache stores log p,
                 whose softmax is p (a constant per row does not change a softmax).
    mean-logits  the ensemble's logits / T are the average of the teachers' t_i / T (the
                 renormalised geometric mean of their distributions).

Re-tempering (training at another temperature T') is exact for mean-logits, as for one teacher.
For mean-probs it applies to log p as if it were one teacher's logits / T, which gives
p^(T/T') renormalised: the same as the average of the teachers' distributions at T' only when
T' = T. The written cache records every teacher's provenance, the rule and the sources, and is
resumable like any cache (run the same command again after a kill).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from stages.cache.reader import CacheReader
from stages.cache.writer import writing
from stages.storage import CacheLocation, cache_location, disk_usage
from stages.errors import CacheMismatchError, InputError
from stages.kinds import KINDS
from stages.runtime import config_dict

RULES = ("mean-probs", "mean-logits")


@dataclass(frozen=True)
class CombineConfig:
    caches: tuple[CacheLocation, ...]
    out: CacheLocation
    rule: str = "mean-probs"
    overwrite: bool = False

    def validate(self) -> None:
        if len(self.caches) < 2:
            raise InputError(f"combining needs at least two caches, got {len(self.caches)}")
        if self.rule not in RULES:
            raise InputError(f"`rule` must be one of {', '.join(RULES)}, got {self.rule!r}")
        if cache_location(self.out) in {cache_location(c) for c in self.caches}:
            raise InputError(f"`out` {self.out} is one of the caches being combined; choose another path")


@dataclass(frozen=True)
class CombineResult:
    cache: CacheLocation
    num_teachers: int
    rule: str
    num_samples: int
    bytes_on_disk: int
    teacher_accuracy: float | None
    chunks_computed: int
    seconds: float


# Attributes that must be equal in every source cache (besides the dataset, checked apart).
MUST_AGREE = ("kind", "temperature", "num_classes", "num_samples", "row_shape", "row_axes", "augment")


def run(config: CombineConfig) -> CombineResult:
    """Write the ensemble cache of `config.caches` at `config.out` (or finish one started)."""
    config.validate()
    started = time.perf_counter()
    sources = [CacheReader(path) for path in config.caches]
    _check_compatible(sources)
    first = sources[0]
    # Every source's: the same dataset fingerprint means the same labels. Feature targets are
    # one teacher's own and are not combined.
    layout = replace(first.layout, features=None)
    attrs = {
        "temperature": first.temperature,
        "teacher_amp": _one_or_mixed([source.attrs.get("teacher_amp", "none") for source in sources]),
        "teachers": [teacher for source in sources for teacher in source.attrs["teachers"]],
        "combine": {
            "rule": config.rule,
            "sources": [{"path": str(source.path), "teachers": len(source.attrs["teachers"])} for source in sources],
        },
        "augment": first.attrs.get("augment"),
        "dataset": first.attrs["dataset"],
        "teacher_metrics": None,
        "config": config_dict(config),
    }
    with writing(config.out, layout, attrs, overwrite=config.overwrite) as writer:
        missing = writer.missing_chunks()  # write units: shards, or chunks
        for unit in missing:
            start, stop = writer.grid.rows(unit)
            parts = [source.read_rows(start, stop) for source in sources]
            if any(not np.array_equal(part["index"], parts[0]["index"]) for part in parts[1:]):
                raise CacheMismatchError(f"rows {start}-{stop - 1} hold other samples in one of the caches")
            rows = {name: values for name, values in parts[0].items() if name in ("index", "labels", "lengths", "view_seeds")}
            writer.write_rows(start, {**rows, **layout.soft_kind.combine(parts, config.rule, layout)})
    metrics = writer.group.attrs["teacher_metrics"]
    return CombineResult(
        cache=config.out, num_teachers=len(attrs["teachers"]), rule=config.rule, num_samples=layout.num_samples,
        bytes_on_disk=disk_usage(config.out), teacher_accuracy=metrics["accuracy"] if metrics else None,
        chunks_computed=sum(len(layout.chunks_of(unit)) for unit in missing), seconds=time.perf_counter() - started,
    )


def _check_compatible(sources: list[CacheReader]) -> None:
    first = sources[0]
    for source in sources:
        if not source.layout.soft_kind.can_combine:
            combinable = ", ".join(name for name, kind in KINDS.items() if kind.can_combine)
            raise CacheMismatchError(f"{source.path} is a {source.layout.kind} cache; only {combinable} caches can be combined")
        differ = [k for k in MUST_AGREE if source.attrs.get(k) != first.attrs.get(k)]
        mine, theirs = source.attrs["dataset"], first.attrs["dataset"]
        if mine.get("split") != theirs.get("split"):
            differ.append(f"split ({mine.get('split')!r} vs {theirs.get('split')!r})")
        if mine.get("fingerprint") != theirs.get("fingerprint"):
            differ.append("dataset")
        if mine.get("index_sha256") != theirs.get("index_sha256"):
            differ.append("row order")
        if differ:
            raise CacheMismatchError(
                f"cannot combine {source.path} with {first.path}: {', '.join(differ)} differ; "
                "an ensemble cache needs caches of the same dataset split, in the same order, at the same T"
            )
    teachers = [tuple((t.get("spec"), t.get("weights_sha256")) for t in source.attrs["teachers"]) for source in sources]
    repeated = next((source for i, source in enumerate(sources) if teachers[i] in teachers[:i]), None)
    if repeated is not None:
        raise InputError(f"{repeated.path} holds the same teacher as another cache being combined; an ensemble needs different teachers")


def _one_or_mixed(values: list[str]) -> str:
    return values[0] if len(set(values)) == 1 else "mixed"
