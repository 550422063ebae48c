"""Stage two: train a student from a cache of softened teacher logits (or from hard labels).

    pipeline train-student --cache data/caches/mnist-cnn-T4.zarr --student mlp-400 \\
        --alpha 0.9 --epochs 20 --out data/runs/mlp-400-kd

From Python, with your own module and splits (see stages.data.Split):

    result = run(TrainConfig(model="mine", dataset="mine", out=Path("run"), cache=Path("c.zarr")),
                 model, train_split, test_split)

The teacher is never imported, built or loaded here: its knowledge arrives only through the
cache, read in whole chunks in shuffled order on a background thread (stages.cache) and joined
with the dataset's inputs by the stored index. A dense cache gives the Hinton loss over every
class, a top-k cache the same loss over its K classes and a tail bucket (stages.losses). For a
model of sequences with logits per token, every loss is averaged over the valid tokens: padding
never counts. Without a cache the same loop trains on hard labels only: the baseline, and how
`pipeline train-teacher` trains a teacher.

Under torchrun (`torchrun --nproc-per-node N -m pipeline train-student ...`), the N processes
train one model with DistributedDataParallel: `batch_size` stays the global batch, each
process reads a disjoint share of each epoch's shuffled chunks, and rank 0 alone evaluates and
writes the run folder (stages.runtime.process_group).

The run folder holds config.json (resolved config), metrics.jsonl (one line per epoch),
checkpoint.pt (model, optimizer, schedule and RNG states at the last checkpointed epoch, for
`resume`), model.safetensors (final weights) and summary.json.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stages import divergences
from stages.augment import Augmentation, resolved
from stages.cache import CacheReader, ChunkGrid, Layout, Rows, batch_bounds, prefetch
from stages.config import TrainConfig  # defined there, torch-free, for the CLI; re-exported here
from stages.data import Split, joined_with_inputs, sequence_lengths
from stages.errors import CacheMismatchError, InputError, PipelineError
from stages.evaluation import evaluate
from stages.loop import one_view_each, soft_label_loss
from stages.losses import HiddenAndHead, feature_loss
from stages.runtime import (
    Progress, Ranks, agree, average_over_ranks, check_labels_fit, config_dict, main_only, one_blas_thread_beside_torch,
    output_shape, peak_rss_mb, process_group, seed_everything, torch_threads, training_threads,
)
from stages.storage import FileLock, no_follow_fd, open_no_follow, write_atomically
from stages.weights import count_parameters, save_weights, serialised

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Options that may change when a run is resumed: they do not change what it computes.
RESUMABLE_CHANGES = ("device", "resume", "overwrite", "checkpoint_every", "loader_workers", "eval_batch_size")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    weights: Path
    mode: str  # "distilled" or "scratch"
    num_parameters: int
    test_accuracy: float | None
    test_errors: int | None
    test_samples: int | None
    test_tokens: int | None  # models with logits per token: errors and nll count valid tokens
    test_nll: float | None
    seconds: float


class SoftLabels(Protocol):
    """What train-student reads soft labels from: a cache opened with stages.cache.CacheReader,
    or any source with the same reading interface (the benchmark's logits held in memory and
    teacher run online). Batches it yields with "inputs" already attached are not joined again;
    `grid` and `runs` serve several processes only (which read whole chunks)."""

    attrs: dict
    layout: Layout
    temperature: float
    num_classes: int
    labelled: bool
    soft_arrays: tuple[str, ...]
    grid: ChunkGrid

    def check_split(self, split: Split, dataset_spec: str) -> None: ...

    def batches(self, batch_size: int, *, seed: int, epoch: int, buffer_chunks: int, names: tuple[str, ...],
                rank: int, world: int) -> Iterator[Rows]: ...

    def runs(self, seed: int, epoch: int) -> list[tuple[int, int]]: ...


def run(
    config: TrainConfig, model: torch.nn.Module, train: Split, evaluation: Split | None,
    soft_labels: SoftLabels | None = None, progress: Progress | None = None, *, augment: Augmentation | None = None,
) -> TrainResult:
    """Train `model` on `train` (distilled from `config.cache` when given), evaluating on
    `evaluation` after every epoch, and write the run folder.

    `soft_labels` is the cache named by `config.cache`, opened (default: opened here), or another
    SoftLabels source. `augment` is the augmentation of the inputs: `config.augment`'s, or for a
    cache of views the one that replays them (its `augment` spec), resolved by the caller, who
    knows which code may run (pipeline.jobs); without it, built-in augmentations are resolved
    here (stages.augment). The specs stay in `config` as provenance."""
    config.validate()
    started = time.perf_counter()
    cache = soft_labels if soft_labels is not None else (CacheReader(config.cache) if config.cache is not None else None)
    augment = resolved(_augment_spec(config, cache), augment)
    with process_group(config.device) as (ranks, device), contextlib.ExitStack() as held:
        # One process at a time in a run folder: a second one (a re-run beside a live run, an
        # orphan of a killed sweep) would interleave checkpoints and metrics. The kernel drops the
        # lock when its holder dies, however it dies, so a killed run resumes without ado.
        main_only(ranks, lambda: held.enter_context(FileLock(config.out.resolve(), "run folder")))
        return _train(config, model, train, evaluation, cache, augment, progress, ranks, device, started)


@dataclass
class Training:
    """What the epochs of a run share, made by _prepare."""

    config: TrainConfig
    model: torch.nn.Module  # whose weights the run writes
    student: torch.nn.Module  # what the optimizer trains: the model, with its feature projection for feature targets
    trained: torch.nn.Module  # the student, in DDP with several processes
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    train: Split
    evaluation: Split | None
    cache: SoftLabels | None
    labels: np.ndarray | None
    lengths: np.ndarray | None
    augment: Augmentation | None
    temperature: float | None
    ranks: Ranks
    device: torch.device
    first_epoch: int
    epoch_steps: list[int]  # of every epoch, so that progress counts the whole run (a resumed one from where it stopped)
    steps_done: int


def _train(
    config: TrainConfig, model: torch.nn.Module, train: Split, evaluation: Split | None, cache: SoftLabels | None,
    augment: Augmentation | None, progress: Progress | None, ranks: Ranks, device: torch.device, started: float,
) -> TrainResult:
    training = _prepare(config, model, train, evaluation, cache, augment, ranks, device)
    if isinstance(training, TrainResult):  # resuming a finished run: nothing to do
        return training
    metrics = main_only(ranks, lambda: _kept_metrics(config.out / "metrics.jsonl", training.first_epoch)) or {}
    with (open_no_follow(config.out / "metrics.jsonl", "a") if ranks.main else contextlib.nullcontext()) as metrics_file, \
            one_blas_thread_beside_torch(), torch_threads(training_threads(device)):
        for epoch in range(training.first_epoch, config.epochs):
            epoch_started = time.perf_counter()
            means = _train_epoch(training, epoch, progress)
            # Rank 0 evaluates, logs and checkpoints; a failure there stops every process.
            metrics = main_only(ranks, lambda: _end_of_epoch(training, epoch, means, epoch_started, metrics_file)) or metrics
    weights = config.weights_out or config.out / "model.safetensors"
    main_only(ranks, lambda: save_weights(model, weights))
    result = TrainResult(
        run_dir=config.out,
        weights=weights,
        mode="distilled" if cache else "scratch",
        num_parameters=count_parameters(model),
        test_accuracy=metrics.get("test_accuracy"),
        test_errors=metrics.get("test_errors"),
        test_samples=metrics.get("test_num_samples"),
        test_tokens=metrics.get("test_num_tokens"),
        test_nll=metrics.get("test_nll"),
        seconds=time.perf_counter() - started,
    )
    if ranks.main:
        _write_json(config.out / "summary.json", {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()})
    return result


def _prepare(
    config: TrainConfig, model: torch.nn.Module, train: Split, evaluation: Split | None, cache: SoftLabels | None,
    augment: Augmentation | None, ranks: Ranks, device: torch.device,
) -> Training | TrainResult:
    """Check everything that can be checked before the run folder is touched, then make the
    folder ready and the optimizer, restored from the last checkpoint when resuming. A finished
    run that is resumed gives its result instead."""
    if config.batch_size % ranks.world:
        raise InputError(f"`batch_size` {config.batch_size} (the global batch) does not divide among {ranks.world} processes")
    model = model.to(device)
    labels, lengths = _check_inputs(config, model, train, evaluation, cache, device, augment)
    temperature = config.temperature or (cache.temperature if cache else None)
    if cache is not None:
        cache.layout.soft_kind.check_temperature(temperature, cache.temperature)
        cache.layout.soft_kind.check_divergence(config.divergence)
    run_config = _run_config(config, cache, temperature)
    if config.resume and (config.out / "summary.json").is_file():
        _check_same_run(config.out, run_config)
        log.info("run %s already finished; nothing to resume", config.out)
        summary = json.loads((config.out / "summary.json").read_text())
        # A summary written before a field existed reads it as None.
        fields = {name: summary.get(name) for name in TrainResult.__dataclass_fields__}
        return TrainResult(**{**fields, "run_dir": config.out, "weights": Path(summary["weights"])})
    if ranks.world > 1 and cache is not None and cache.grid.num_chunks < ranks.world:
        raise InputError(
            f"the cache has {cache.grid.num_chunks} chunks for {ranks.world} processes, which read whole chunks: "
            "cache it again with a smaller `chunk_rows` (many chunks per process)"
        )
    epoch_steps = [_epoch_steps(config, train, cache, epoch, ranks) for epoch in range(config.epochs)]
    if epoch_steps[0] == 0:
        raise InputError(f"split {train.name!r} has too few rows for one batch of {config.batch_size // ranks.world} per process")
    seed_everything(config.seed)
    student = _with_feature_projection(config, model, train, cache, device)
    main_only(ranks, lambda: _open_run_dir(config, run_config))
    state = _read_checkpoint(config.out / CHECKPOINT) if config.resume and (config.out / CHECKPOINT).is_file() else None
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    first_epoch = 0
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch = state["epoch"]
        if ranks.main:
            log.info("resuming %s after epoch %d", config.out, first_epoch)
    # Each process reads the checkpoint itself: one that sees another (or none) would hang the rest.
    agree(ranks, first_epoch, "the epoch to resume after (is the run folder on a file system they all see?)")
    # Each process computes its own batch's gradients; DDP averages them over the processes
    # during backward, so every step is one step on the global batch.
    in_pieces = config.logit_pieces and lengths is not None and hasattr(student, "hidden_and_head")
    forward = HiddenStatesAndHead(student) if in_pieces else student
    trained = forward if ranks.world == 1 else torch.nn.parallel.DistributedDataParallel(forward)
    return Training(config, model, student, trained, optimizer, schedule, train, evaluation, cache, labels, lengths, augment,
                    temperature, ranks, device, first_epoch, epoch_steps, sum(epoch_steps[:first_epoch]))


def _train_epoch(training: Training, epoch: int, progress: Progress | None) -> dict[str, float]:
    """One epoch's optimizer steps; returns the means of the loss and its parts over every process."""
    t = training
    t.model.train()
    sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
    steps = 0
    batches = _epoch_batches(t.config, t.train, t.labels, t.lengths, t.cache, t.augment, epoch, t.ranks)
    for batch in itertools.islice(batches, t.epoch_steps[epoch]):
        loss, parts = loss_step(t, batch)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        for name, value in {"loss": loss.detach(), **parts}.items():
            sums[name] = sums[name] + value if name in sums else value.clone()
        steps += 1
        if progress is not None and t.ranks.main:
            progress(t.steps_done + steps, sum(t.epoch_steps))
    batches.close()  # stops its prefetching thread, which may hold batches past the epoch's steps
    t.steps_done += steps
    t.schedule.step()
    means = {k: float(v) / max(steps, 1) for k, v in average_over_ranks(t.ranks, sums).items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise PipelineError(f"the loss became {means['loss']} in epoch {epoch + 1}; lower `lr` (the last checkpoint is kept)")
    return means


def loss_step(training: Training, batch: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch and its named parts, for logging."""
    outputs = training.trained(batch["inputs"].to(training.device))
    logits, features = outputs if isinstance(training.student, StudentWithProjection) else (outputs, None)
    config = training.config
    loss, parts = batch_loss(logits, batch, training.cache, alpha=config.alpha, temperature=training.temperature,
                             divergence=config.divergence)
    if features is None:
        return loss, parts
    # Feature targets: the projected student features against the cached teacher ones.
    matched = feature_loss(features, torch.from_numpy(batch["features"]).to(training.device).float(), config.feature_loss)
    return loss + config.feature_weight * matched, {**parts, "feature": matched.detach()}


def _end_of_epoch(training: Training, epoch: int, means: dict[str, float], epoch_started: float, metrics_file) -> dict:
    """Rank 0's part of an epoch's end: evaluate, log, checkpoint; returns the epoch's metrics."""
    config = training.config
    epoch_metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in means.items()},
                     "train_peak_rss_mb": peak_rss_mb()}  # before evaluating: what the training steps took at most
    if training.evaluation is not None:
        epoch_metrics.update({f"test_{k}": v for k, v in evaluate(training.model, training.evaluation, training.device,
                                                                    config.eval_batch_size, config.logit_pieces).items()})
    epoch_metrics["seconds"] = time.perf_counter() - epoch_started
    epoch_metrics["peak_rss_mb"] = peak_rss_mb()
    metrics_file.write(json.dumps(epoch_metrics) + "\n")
    metrics_file.flush()
    log.info("epoch %d/%d %s", epoch + 1, config.epochs, _brief(epoch_metrics))
    if config.checkpoint_every and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
        _save_checkpoint(config.out / CHECKPOINT, {
            "epoch": epoch + 1, "model": training.student.state_dict(), "optimizer": training.optimizer.state_dict(),
            "schedule": training.schedule.state_dict(), "torch_rng": torch.get_rng_state(),
        })
    return epoch_metrics


def batch_loss(
    logits: torch.Tensor | HiddenAndHead, batch: Rows, cache: SoftLabels | None, *, alpha: float, temperature: float | None,
    divergence: str = divergences.DEFAULT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the student's `logits` (or its HiddenAndHead) on one batch of rows (numpy, as
    the cache gives them): stages.loop.soft_label_loss, the function behind `kd_loss`, with the
    cache's kind and T."""
    names = ("labels", "lengths", *(cache.soft_arrays if cache else ()))
    device = (logits.hidden if isinstance(logits, HiddenAndHead) else logits).device
    tensors = {name: torch.from_numpy(batch[name]).to(device) for name in names if name in batch}
    return soft_label_loss(logits, tensors, cache.layout.soft_kind if cache else None, alpha=alpha, temperature=temperature,
                           cache_temperature=cache.temperature if cache else None, divergence=divergence)


class HiddenStatesAndHead(torch.nn.Module):
    """The student's forward as its last hidden states and output layer (`hidden_and_head`), so
    that the loss takes its logits a piece of positions at a time (stages.losses.piecewise_loss).
    A module of its own, with the student's parameters, so that DDP can wrap it as it wraps the student."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> HiddenAndHead:
        return HiddenAndHead(*self.model.hidden_and_head(inputs))


class StudentWithProjection(torch.nn.Module):
    """The student, and a linear map of its features to the teacher's feature size (FitNets'
    regressor; the identity when the sizes agree), trained together: forward gives (logits,
    projected features). The projection serves training only: the run's weights are the
    student's own."""

    def __init__(self, model: torch.nn.Module, student_size: int, teacher_size: int):
        super().__init__()
        self.model = model
        self.projection = torch.nn.Identity() if student_size == teacher_size else torch.nn.Linear(student_size, teacher_size)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.model.logits_and_features(inputs)
        return logits, self.projection(features)


def _with_feature_projection(config: TrainConfig, model: torch.nn.Module, train: Split, cache: SoftLabels | None,
                             device: torch.device) -> torch.nn.Module:
    """What the optimizer trains: the model, or with a `feature_loss`, the model and its projection."""
    if config.feature_loss == "none":
        return model
    if cache is None or cache.layout.features is None:
        raise InputError("`feature_loss` needs a cache with the teacher's features (cached with `features`)")
    if not callable(getattr(model, "logits_and_features", None)):
        raise InputError("`feature_loss`: the student has no features (it needs a logits_and_features method, as lstm and hf: models have)")
    with torch.no_grad():
        _, features = model.logits_and_features(train.inputs(np.zeros(1, dtype=np.int64)).to(device))
    return StudentWithProjection(model, int(features.shape[-1]), cache.layout.features).to(device)


def _check_inputs(
    config: TrainConfig, model: torch.nn.Module, train: Split, evaluation: Split | None, cache: SoftLabels | None,
    device: torch.device, augment: Augmentation | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Everything that can be checked before the run folder is touched: a cache that belongs
    to other data or has another class count or row shape, an evaluation split without fitting
    labels, an augmentation that does not fit the inputs. Returns the labels to train on, and
    the valid lengths of the sequences for a model with logits per token (else None)."""
    if config.out.exists() and not config.out.is_dir():
        raise InputError(f"`out` {config.out} is a file; give a folder for the run")
    shape = output_shape(model, train, device, "model")
    lengths = sequence_lengths(train, shape[0]) if len(shape) == 2 else None
    if cache is not None:
        _check_cache_fits(config, cache, train, shape)
    if evaluation is not None:
        if evaluation.labels is None:
            raise InputError(f"cannot evaluate on split {evaluation.name!r}: it has no labels (pick another `eval_split`)")
        check_labels_fit(evaluation, shape, "model")
    if augment is not None:
        augment(train.inputs(np.zeros(1, dtype=np.int64)), np.zeros(1, dtype=np.uint64))
    if cache is None:
        if train.labels is None:
            raise InputError(f"split {train.name!r} has no labels: training without a cache needs them")
        check_labels_fit(train, shape, "model")
        return train.labels, lengths
    if config.alpha < 1.0 and not cache.labelled:
        raise InputError("the cache has no hard labels; use `alpha` 1 (soft labels only)")
    # The fingerprint just matched every label and length, so the split's are the cache's:
    # taking them from memory spares the reader arrays per chunk.
    return train.labels, lengths


def _check_cache_fits(config: TrainConfig, cache: SoftLabels, train: Split, shape: tuple[int, ...]) -> None:
    """The student's output fits the cache's rows, and the cache was made from this split."""
    if shape[-1] != cache.num_classes:
        raise CacheMismatchError(f"the student outputs {shape[-1]} classes but the cache has {cache.num_classes}")
    cached = (*cache.layout.label_shape, cache.num_classes)  # one view at a time
    if shape != cached:
        raise CacheMismatchError(f"the student outputs logits of shape {shape} per sample but the cache holds rows of {cached}")
    cache.check_split(train, config.dataset)


def _augment_spec(config: TrainConfig, cache: SoftLabels | None) -> str:
    """The augmentation of the inputs: for a cache of augmented views, the one that replays a view
    from its seed (and no other), else `config.augment`."""
    if cache is None or cache.layout.views is None:
        return config.augment
    if config.augment != "none":
        raise InputError(
            f"the cache holds views made with {cache.attrs['augment']['spec']!r} and replays them exactly; "
            "drop `augment` (it would show the student other inputs than the teacher saw)"
        )
    return cache.attrs["augment"]["spec"]


def _epoch_steps(config: TrainConfig, train: Split, cache: SoftLabels | None, epoch: int, ranks: Ranks) -> int:
    """Optimizer steps in `epoch`: with several processes, as many as the process with the
    fewest rows makes (DDP needs every process in every step). Processes read whole chunks, so
    the others leave out up to about a chunk of rows each that epoch; which rows those are
    changes from epoch to epoch. Many chunks per process keep that share small."""
    local_batch = config.batch_size // ranks.world
    if ranks.world == 1:
        shares = [len(train)]
    elif cache is None:
        shares = [len(range(rank, len(train), ranks.world)) for rank in range(ranks.world)]
    else:
        runs = cache.runs(config.seed, epoch)
        rows = [cache.grid.rows(last)[1] - cache.grid.rows(first)[0] for first, last in runs]
        shares = [sum(rows[rank :: ranks.world]) for rank in range(ranks.world)]
    return min(len(batch_bounds(share, local_batch)) for share in shares)


def _epoch_batches(config: TrainConfig, train: Split, labels: np.ndarray | None, lengths: np.ndarray | None,
                   cache: SoftLabels | None, augment: Augmentation | None, epoch: int, ranks: Ranks) -> Iterator[Rows]:
    """Batches of rows joined with their inputs, labels and sequence lengths, prepared on a
    background thread. From a view cache, each row is one of its sample's views (by
    `config.view_policy`), and its input is regenerated from that view's seed; otherwise, with
    `augment`, each input is augmented with a seed drawn from (seed, epoch), so a resumed run
    draws the same ones. With several processes, this process's share of the epoch (see
    CacheReader.batches), in batches of its share of the global batch."""
    views = cache is not None and cache.layout.views is not None
    local_batch = config.batch_size // ranks.world
    # Random streams of their own per process, except alone, where they stay what they were.
    stream = [] if ranks.world == 1 else [ranks.rank]
    if cache is not None:
        features = ("features",) if config.feature_loss != "none" else ()
        names = ("index", *cache.soft_arrays, *features, *(("view_seeds",) if views else ()))
        rows = cache.batches(local_batch, seed=config.seed, epoch=epoch, buffer_chunks=config.buffer_chunks, names=names,
                             rank=ranks.rank, world=ranks.world)
        if views:
            rng = np.random.default_rng([config.seed, epoch, 2, *stream])
            rows = (one_view_each(r, (*cache.soft_arrays, *features), config.view_policy, rng, epoch) for r in rows)
    else:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train))[ranks.rank :: ranks.world]
        rows = ({"index": order[a:b]} for a, b in batch_bounds(len(order), local_batch))
    joined = joined_with_inputs(rows, train, config.loader_workers)
    if augment is not None:
        joined = _augmented(joined, augment, views, np.random.default_rng([config.seed, epoch, 3, *stream]))
    return prefetch((_with_labels_and_lengths(r, labels, lengths) for r in joined), depth=4)


def _augmented(batches: Iterator[Rows], augment: Augmentation, replay: bool, rng: np.random.Generator) -> Iterator[Rows]:
    """Each batch with its inputs augmented: replayed from its views' stored seeds, or with
    fresh seeds drawn from `rng`."""
    for rows in batches:
        seeds = rows["view_seeds"] if replay else rng.integers(0, 2**63, size=len(rows["index"]), dtype=np.uint64)
        yield {**rows, "inputs": augment(rows["inputs"], seeds)}


def _with_labels_and_lengths(rows: Rows, labels: np.ndarray | None, lengths: np.ndarray | None) -> Rows:
    extra = {}
    if labels is not None and "labels" not in rows:
        extra["labels"] = labels[rows["index"]]
    if lengths is not None:
        extra["lengths"] = lengths[rows["index"]]
    return {**rows, **extra} if extra else rows


def _open_run_dir(config: TrainConfig, run_config: dict) -> None:
    """Make the run folder ready: new, or the same run's to resume."""
    out = config.out
    if config.resume and (out / "config.json").is_file():
        _check_same_run(out, run_config)
        if not (out / CHECKPOINT).is_file():
            (out / "metrics.jsonl").unlink(missing_ok=True)  # killed before its first checkpoint
        return
    if out.exists() and any(out.iterdir()):
        if config.resume and not config.overwrite:
            raise InputError(f"{out} is not a run folder (no config.json): nothing to resume")
        if not config.overwrite:
            raise InputError(f"run folder {out} already exists; pass `resume` to continue it or `overwrite` to replace it")
        if not (out / "config.json").is_file():
            raise InputError(f"{out} exists and is not a run folder; refusing to delete it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", run_config)
    except OSError as exc:
        raise PipelineError(f"cannot write run folder {out}: {exc.strerror}") from exc


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"checkpoint {path} cannot be read ({exc}); start over with `overwrite`") from exc


def _check_same_run(out: Path, run_config: dict) -> None:
    stored = json.loads((out / "config.json").read_text())
    differ = [k for k in sorted(set(stored) | set(run_config))
              if k not in RESUMABLE_CHANGES and stored.get(k) != run_config.get(k)]
    if differ:
        raise InputError(
            f"cannot resume {out}: it was started with other options ({', '.join(differ)} differ); "
            "use the same options, or `overwrite` to start over"
        )


def _kept_metrics(path: Path, epochs: int) -> dict:
    """Keep the metrics lines of the epochs a resumed run keeps; return the last one."""
    if not path.is_file():
        return {}
    with os.fdopen(no_follow_fd(path, os.O_RDONLY)) as file:  # a planted link would show us another file
        lines = file.read().splitlines()[:epochs]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        raise PipelineError(f"{path} is damaged (its lines are not JSON); start over with --overwrite") from None
    write_atomically(path, "".join(line + "\n" for line in lines).encode())
    return last


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomically: a kill or a full disk while saving leaves the previous checkpoint intact."""
    write_atomically(path, serialised(state))


def _run_config(config: TrainConfig, cache: SoftLabels | None, temperature: float) -> dict:
    resolved = {**config_dict(config), "temperature": temperature if cache is not None else None}
    if cache is not None:
        resolved["cache_provenance"] = {k: cache.attrs.get(k) for k in ("teachers", "combine", "dataset", "temperature", "augment", "created_at")}
    return resolved


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, (json.dumps(value, indent=2) + "\n").encode())


def _brief(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch")
