"""Resolve the specs named in a stage config into objects and run the stage: the one path
the CLI commands, the demo and later orchestration share."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import torch
import zarr

from pipeline.datasets import dataset_runs_user_code, resolve_dataset
from pipeline.hf import export
from pipeline.models import PARAMETRIC_MODELS, resolve_model
from pipeline.specs import BuiltinSpec, FileSpec, parse_spec, resolve_augment, runs_user_code
from stages import cache_teacher, train_student
from stages.augment import Augmentation
from stages.cache import CacheReader, is_cache, malformed_attributes
from stages.data import Split, input_shape
from stages.errors import InputError
from stages.evaluation import evaluate, speed, teacher_agreement
from stages.runtime import Progress, resolve_device, seed_everything
from stages.storage import CacheLocation
from stages.verify import Report, verify
from stages.weights import count_parameters, load_weights

log = logging.getLogger(__name__)

# The specs a cache records that can name the user's code, with how a user names one instead.
CODE_SPECS = {
    "dataset": (dataset_runs_user_code, '--dataset {spec} (in a sweep file: dataset = "{spec}")'),
    "augment": (runs_user_code, '--augment {spec} (in a sweep file: augment = "{spec}" under [train])'),
}


def spec_from_cache(cache: CacheLocation, attrs: dict, what: str, named: str | None = None, how: str | None = None) -> str | None:
    """The `what` spec ("dataset" or "augment") that `cache` records in `attrs`, for a command
    that reads the cache to use ("none" for a cache without augmentation; None without a dataset).

    A cache never runs code: caches are handed around (a shared disk, a bucket), and a recorded
    `module:factory` or `file.py:factory` spec would import and call whatever its author chose.
    So a spec that runs code is used only when the user named that same spec (`named`: from the
    command line or a sweep file); built-ins and data files are taken from the cache as they are.
    `how` tells a caller other than the CLI how to name it (default: the CLI's flag)."""
    spec = (attrs.get(what) or {}).get("spec", "none" if what == "augment" else None)
    runs_code, flag = CODE_SPECS[what]
    how = how or flag
    if spec is not None and spec != named and runs_code(spec):
        raise InputError(f"cache {cache} records the {what} {spec!r}, which is code, and a cache never runs code; "
                         f"if you trust it, name it yourself: {how.format(spec=spec)}")
    return spec


def split_of_cache(cache: CacheLocation, attrs: dict) -> Split:
    """The split a cache was made from, by the dataset spec and split it records: what
    stages.CacheDataset reads without a dataset (pyproject.toml declares this function its
    `kd_pipeline.datasets` entry point). A recorded spec that runs code is refused (spec_from_cache)."""
    # The library's words, not the CLI's: CacheDataset's user passes `dataset`, and has no --dataset.
    split = attrs["dataset"]["split"]
    spec = spec_from_cache(cache, attrs, "dataset",
                           how=f"pass it to CacheDataset as `dataset`, as pipeline.datasets.resolve_dataset({{spec!r}}).split({split!r})")
    if spec is None:
        raise InputError(f"cache {cache} records no dataset spec: pass the dataset it was made from as CacheDataset's `dataset`")
    return resolve_dataset(spec).split(split)


def _with_absolute_files(cfg, *fields: str):
    """`cfg` with the files its `fields` name made absolute: what a cache or a run folder records
    of them must point at the same files from any folder, for anyone checking them."""
    return dataclasses.replace(cfg, **{f: getattr(cfg, f).absolute() for f in fields if isinstance(getattr(cfg, f), Path)})


def run_caching(cfg: cache_teacher.CacheTeacherConfig, progress: Progress | None = None) -> cache_teacher.CacheTeacherResult:
    cfg.validate()  # before loading anything: bad options fail fast
    cfg = _with_absolute_files(cfg, "teacher_weights")
    augment = resolve_augment(cfg.augment)  # first: a bad spec fails before the teacher loads
    if cfg.teacher_weights is None:
        log.warning("no --teacher-weights given: caching the teacher as its factory builds it")
    teacher, split = load_teacher_and_split(cfg)
    return cache_teacher.run(cfg, teacher, split, progress, augment=augment,
                             load_on_worker=functools.partial(load_on_worker, cfg))


def load_teacher_and_split(cfg: cache_teacher.CacheTeacherConfig) -> tuple[torch.nn.Module, Split]:
    """The teacher and the split to cache, built from their specs."""
    split = resolve_dataset(cfg.dataset).split(cfg.split)
    num_classes = cfg.num_classes or split.num_classes
    if num_classes is None:
        raise InputError(f"split {cfg.split!r} of {cfg.dataset} has no labels to count classes by; pass --num-classes")
    return resolve_model(cfg.teacher, num_classes=num_classes, input_shape=input_shape(split), weights=cfg.teacher_weights), split


def load_on_worker(cfg: cache_teacher.CacheTeacherConfig) -> tuple[torch.nn.Module, Split, Augmentation | None]:
    """What a dask worker caches with, built there from the specs the user named (the worker
    needs the same packages and files): the teacher, the split and the augmentation."""
    return *load_teacher_and_split(cfg), resolve_augment(cfg.augment)


def run_training(cfg: train_student.TrainConfig, progress: Progress | None = None) -> train_student.TrainResult:
    cfg.validate()
    cfg = _with_absolute_files(cfg, "model_weights", "weights_out", "hf_out")
    augment = resolve_augment(cfg.augment)
    data = resolve_dataset(cfg.dataset)
    train = data.split(cfg.split)
    evaluation = data.split(cfg.eval_split) if cfg.eval_split else None
    cache = CacheReader(cfg.cache) if cfg.cache else None
    replayed = spec_from_cache(cfg.cache, cache.attrs, "augment", named=cfg.augment) if cache else "none"
    if replayed != "none" and cfg.augment == replayed:  # naming a view cache's augmentation replays it, adds none
        cfg = dataclasses.replace(cfg, augment="none")
    if replayed != "none" and cfg.augment == "none":
        augment = resolve_augment(replayed)
    num_classes = cache.num_classes if cache else train.num_classes
    if num_classes is None:
        raise InputError(f"dataset {cfg.dataset} does not say how many classes it has")
    seed_everything(cfg.seed)  # the model's initial weights belong to the run's seed too
    model = resolve_model(cfg.model, num_classes=num_classes, input_shape=input_shape(train), weights=cfg.model_weights)
    exported = hf_folder(cfg) if transformers_model(cfg.model) else None
    if exported is not None and exported != cfg.out / "hf" and exported.exists() and any(exported.iterdir()) \
            and not (cfg.overwrite or cfg.resume):
        raise InputError(f"`hf_out` {exported} already exists; pass `overwrite` to replace it")
    result = train_student.run(cfg, model, train, evaluation, soft_labels=cache, progress=progress, augment=augment)
    if exported is not None and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone writes
        load_weights(model, result.weights)  # the run's final weights, also when it had finished before
        tokenizer = parse_spec(cfg.dataset).option("tokenizer") if isinstance(parse_spec(cfg.dataset), FileSpec) else None
        if export(model, exported, tokenizer) is not None:
            log.info("student written as a Hugging Face model to %s", exported)
    return result


def transformers_model(spec: str) -> bool:
    """Whether the model spec builds a transformers model (hf:FOLDER or gpt2:...), which
    run_training also writes out as a Hugging Face folder."""
    parsed = parse_spec(spec, PARAMETRIC_MODELS)
    return (isinstance(parsed, FileSpec) and parsed.kind == "hf") or (isinstance(parsed, BuiltinSpec) and parsed.name == "gpt2")


def hf_folder(cfg: train_student.TrainConfig) -> Path:
    """Where a run writes its student as a Hugging Face folder: `hf_out`, else RUN/hf (its own
    subfolder: the run folder's config.json is the run's record, not the model's)."""
    return cfg.hf_out or cfg.out / "hf"


def run_verify(cache: CacheLocation, *, teacher: str | None, teacher_weights: Path | None, dataset: str | None,
               samples: int, seed: int, device: str, augment: str | None = None) -> Report:
    """Verify a cache; with a teacher spec, rebuild the teacher on the cache's split and compare.
    `dataset` and `augment` are the specs the user named (default: the cache's, unless code)."""
    model = split = replay = None
    attrs = dict(zarr.open_group(str(cache), mode="r").attrs) if is_cache(cache) else {}
    # A teacher is rebuilt only for a cache whose metadata is sound; verify reports the rest.
    if teacher is not None and attrs and not malformed_attributes(attrs):
        if len(attrs["teachers"]) > 1:
            raise InputError(f"{cache} holds an ensemble of {len(attrs['teachers'])} teachers; one teacher's outputs cannot match it")
        if samples == 0:
            raise InputError("--teacher with --rows 0 re-runs nothing; give --rows N")
        spec = dataset or spec_from_cache(cache, attrs, "dataset")
        if spec is None:
            raise InputError(f"{cache} records no dataset; pass --dataset")
        replay = resolve_augment(spec_from_cache(cache, attrs, "augment", named=augment))
        split = resolve_dataset(spec).split((attrs.get("dataset") or {}).get("split", "train"))
        model = resolve_model(teacher, num_classes=attrs["num_classes"], input_shape=input_shape(split), weights=teacher_weights)
    return verify(cache, teacher=model, split=split, samples=samples, seed=seed, device=resolve_device(device), augment=replay)


def run_evaluate(model_spec: str, weights: Path | None, *, dataset: str | None, split: str, cache: CacheLocation | None,
                 batch_size: int, device: str, augment: str | None = None) -> dict:
    """A trained model (student or teacher) on a split: accuracy and NLL, agreement with the top-1
    of the teacher cached in `cache` (on the cache's own split), parameters, weights file size,
    and inference latency and throughput per batch. `dataset` and `augment` are the specs the user
    named (default: the cache's, unless code)."""
    reader = CacheReader(cache) if cache else None
    dataset = dataset or (spec_from_cache(cache, reader.attrs, "dataset") if reader else None)
    replay = resolve_augment(spec_from_cache(cache, reader.attrs, "augment", named=augment)) if reader else None
    if dataset is None:
        raise InputError("missing option --dataset (or --cache)")
    if weights is not None and not weights.is_file():
        raise InputError(f"weights file not found: {weights}")
    data = resolve_dataset(dataset)
    evaluation = data.split(split)
    num_classes = reader.num_classes if reader else evaluation.num_classes
    if num_classes is None:
        raise InputError(f"dataset {dataset} does not say how many classes it has")
    torch_device = resolve_device(device)
    if weights is None:
        log.warning("no --weights given: evaluating %s as its factory builds it (untrained unless the factory loads weights)", model_spec)
    model = resolve_model(model_spec, num_classes=num_classes, input_shape=input_shape(evaluation), weights=weights)
    model = model.to(torch_device)
    report = {
        "model": model_spec,
        "weights": None if weights is None else str(weights),
        "dataset": dataset,
        "split": split,
        "num_parameters": count_parameters(model),
        "weights_bytes": None if weights is None else weights.stat().st_size,
        **evaluate(model, evaluation, torch_device, batch_size),
    }
    if reader is not None:
        cached_split = data.split(reader.attrs["dataset"]["split"])
        reader.check_split(cached_split, dataset)
        report["teacher_agreement"] = teacher_agreement(model, reader, cached_split, torch_device, replay)
        report["agreement_split"] = cached_split.name
    report["device"] = str(torch_device)
    report["speed"] = speed(model, evaluation, torch_device, batch_size)
    return report
