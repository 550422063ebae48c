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

A language-model run counts optimizer steps: `max_steps` (instead of `epochs`), `warmup_steps`
then a cosine, linear or constant learning rate set at every step (`lr_factor`), `accumulate`
micro-batches of `batch_size` rows per step (their gradients averaged: see `_train_epoch`),
`max_grad_norm` clipping, AdamW (decoupled weight decay), the student under autocast (`amp`),
a line every `log_every_steps` steps, and a checkpoint every `checkpoint_every_steps` steps
that resumes mid-epoch: the epoch's batch order is a function of (seed, epoch), so a resumed
run reads that epoch's batches again, drops the ones it had consumed, and goes on from the
next with every RNG state restored. A killed run ends with the same weights, bit for bit on a
CPU, as one never killed:

    pipeline train-student --cache data/caches/gpt2-corpus-T1.zarr --student gpt2:layers=2,dim=128,heads=2 \
        --max-steps 300 --warmup-steps 30 --accumulate 4 --max-grad-norm 1 --amp bf16 \
        --log-every-steps 10 --checkpoint-every-steps 50 --out data/runs/lm   # add --resume after a kill

The run folder holds config.json (resolved config), metrics.jsonl (one line per epoch),
memory.jsonl (the process's peak resident memory per epoch, before and after evaluating),
steps.jsonl (one line per `log_every_steps` steps), checkpoint.pt (model, optimizer, schedule,
scaler, RNG states and the position in the epoch at the last checkpoint, for `resume`),
model.safetensors (final weights) and summary.json; pipeline writes an hf: or gpt2: student as
a Hugging Face folder too (hf/, pipeline.export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
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
    Progress, Ranks, agree, autocast, average_over_ranks, check_labels_fit, config_dict, main_only,
    one_blas_thread_beside_torch, output_shape, peak_rss_mb, process_group, seed_everything, torch_threads, training_threads,
)
from stages.storage import FileLock, no_follow_fd, open_no_follow, write_atomically
from stages.weights import count_parameters, save_weights, serialised

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MEMORY = "memory.jsonl"  # per epoch: the process's peak resident memory before and after evaluating
STEPS_LOG = "steps.jsonl"
# Options that may change when a run is resumed: they do not change what it computes.
RESUMABLE_CHANGES = ("device", "resume", "overwrite", "checkpoint_every", "checkpoint_every_steps", "log_every_steps",
                     "loader_workers", "hf_out", "eval_batch_size")


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
    # The run's seconds over all its parts: a part a kill interrupted counts up to its last checkpoint
    # (what the kill lost after it is done again, and counted, in the part that resumed).
    seconds: float
    resumed_seconds: float | None = None  # after a resume: the seconds of the part that finished the run


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
    trained: torch.nn.Module  # the student (in AutocastForward with `amp`), in DDP with several processes
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
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
    epoch_batches: list[int]  # micro-batches each epoch takes (the last one fewer under `max_steps`)
    total_steps: int  # optimizer steps of the whole run, which the schedule and progress count
    step: int  # optimizer steps done
    position: int  # micro-batches of `first_epoch` consumed before the checkpoint resumed from
    sums: dict[str, torch.Tensor]  # of `first_epoch`'s losses so far (restored with the position)
    earlier_seconds: float | None  # resumed: the seconds of the earlier parts, up to the checkpoint (else None)
    started: float = 0.0  # this part's start (time.perf_counter)
    steps_log: object = None  # rank 0's open steps.jsonl
    window: dict | None = None  # what the next step log line averages


def _train(
    config: TrainConfig, model: torch.nn.Module, train: Split, evaluation: Split | None, cache: SoftLabels | None,
    augment: Augmentation | None, progress: Progress | None, ranks: Ranks, device: torch.device, started: float,
) -> TrainResult:
    training = _prepare(config, model, train, evaluation, cache, augment, ranks, device)
    if isinstance(training, TrainResult):  # resuming a finished run: nothing to do
        return training
    training.started = started
    metrics = main_only(ranks, lambda: _kept_metrics(config.out / "metrics.jsonl", training.first_epoch)) or {}
    main_only(ranks, lambda: _kept_steps(config.out / STEPS_LOG, training.step))
    with (open_no_follow(config.out / "metrics.jsonl", "a") if ranks.main else contextlib.nullcontext()) as metrics_file, \
            (open_no_follow(config.out / STEPS_LOG, "a") if ranks.main and config.log_every_steps else contextlib.nullcontext()) as steps_log, \
            one_blas_thread_beside_torch(), torch_threads(training_threads(device)):
        training.steps_log = steps_log
        if progress is not None and ranks.main:  # the total from the start, before the first step's batches load
            progress(training.step, training.total_steps)
        for epoch in range(training.first_epoch, len(training.epoch_batches)):
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
        seconds=_seconds_so_far(training),
        resumed_seconds=None if training.earlier_seconds is None else time.perf_counter() - started,
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
    if config.amp == "fp16" and device.type != "cuda":
        raise InputError(f"`amp` fp16 needs a CUDA device (its GradScaler is CUDA's), not {device.type}; use bf16")
    epoch_batches = _plan(config, train, cache, ranks)
    total_steps = sum(_steps_of(batches, config.accumulate) for batches in epoch_batches)
    seed_everything(config.seed)
    student = _with_feature_projection(config, model, train, cache, device)
    main_only(ranks, lambda: _open_run_dir(config, run_config))
    state = _read_checkpoint(config.out / CHECKPOINT) if config.resume and (config.out / CHECKPOINT).is_file() else None
    if config.resume and state is None and ranks.main:
        # A job scheduler requeues a job with the same command: its first start finds nothing to resume.
        log.warning("--resume: no checkpoint in %s; training from the start", config.out)
    # AdamW: weight decay apart from the adaptive step (Loshchilov & Hutter); with none, it is Adam.
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, total_steps))
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    first_epoch = step = position = 0
    sums: dict[str, torch.Tensor] = {}
    earlier_seconds = None
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"], device)
        first_epoch, step, position = state["epoch"], state["step"], state["position"]
        sums = {name: value.to(device) for name, value in state["sums"].items()}
        earlier_seconds = float(state.get("seconds", 0.0))  # 0: a checkpoint of a version that did not count them
        if ranks.main and position == 0:
            log.info("resuming %s after epoch %d (step %d of %d)", config.out, first_epoch, step, total_steps)
        elif ranks.main:
            log.info("resuming %s at step %d of %d (epoch %d, after %d of its batches)", config.out, step, total_steps,
                     first_epoch + 1, position)
    # Each process reads the checkpoint itself: one that sees another (or none) would hang the rest.
    agree(ranks, step, "the step to resume after (is the run folder on a file system they all see?)")
    # Each process computes its own batch's gradients; DDP averages them over the processes
    # during backward, so every step is one step on the global batch.
    in_pieces = config.logit_pieces and lengths is not None and hasattr(student, "hidden_and_head")
    forward = HiddenStatesAndHead(student) if in_pieces else student
    forward = forward if config.amp == "none" else AutocastForward(forward, config.amp, device)
    trained = forward if ranks.world == 1 else torch.nn.parallel.DistributedDataParallel(forward)
    return Training(config, model, student, trained, optimizer, schedule, scaler, train, evaluation, cache, labels, lengths,
                    augment, temperature, ranks, device, first_epoch, epoch_batches, total_steps, step, position, sums,
                    earlier_seconds)


def _plan(config: TrainConfig, train: Split, cache: SoftLabels | None, ranks: Ranks) -> list[int]:
    """The micro-batches each epoch of the run takes: every one of `epochs` epochs, or under
    `max_steps` as many epochs as those steps need, the last one cut where they end."""
    plan: list[int] = []
    steps = 0
    while (len(plan) < config.epochs) if config.max_steps is None else (steps < config.max_steps):
        batches = _epoch_steps(config, train, cache, len(plan), ranks)
        if batches == 0:
            raise InputError(f"split {train.name!r} has too few rows for one batch of {config.batch_size // ranks.world} per process")
        if config.max_steps is not None:
            batches = min(batches, (config.max_steps - steps) * config.accumulate)
        plan.append(batches)
        steps += _steps_of(batches, config.accumulate)
    return plan


def _steps_of(batches: int, accumulate: int) -> int:
    """Optimizer steps over an epoch's `batches`: one per `accumulate`, the last over what remains."""
    return -(-batches // accumulate)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of `lr`: rising
    linearly over `warmup` steps ((step + 1) / (warmup + 1)), then by `schedule` over the
    remaining `total - warmup`: cosine, 0.5 (1 + cos(pi p)), or linear, 1 - p, from 1 towards 0
    (p = (step - warmup) / (total - warmup)); or constant 1."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    if schedule == "linear":
        return 1.0 - done
    return 1.0


def _schedule(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:  # a function, not a lambda object: LambdaLR's state then holds no code
        return lr_factor(step, warmup=config.warmup_steps, total=total_steps, schedule=config.schedule)

    return factor


def _train_epoch(training: Training, epoch: int, progress: Progress | None) -> dict[str, float]:
    """One epoch's optimizer steps; returns the means of the loss and its parts over every
    process. A step averages the gradients of `accumulate` micro-batches (each micro-batch's loss,
    a mean over its rows or valid tokens, divided by their number), as DDP averages over
    processes: with equal row or token counts, a step of N micro-batches of b is a step of one
    batch of N x b. An epoch's micro-batches that do not fill a last step make a smaller one. A
    resumed epoch first reads the batches it had consumed and drops them (their order and their
    augmentation draws come from (seed, epoch)), then continues with the next."""
    t, config = training, training.config
    t.model.train()
    sums, t.sums = t.sums, {}  # on the device: no host sync per step
    done, t.position = t.position, 0
    total = t.epoch_batches[epoch]
    batches = _epoch_batches(config, t.train, t.labels, t.lengths, t.cache, t.augment, epoch, t.ranks)
    remaining = itertools.islice(batches, done, total)
    try:
        while done < total:
            size = min(config.accumulate, total - done)
            for micro in range(size):
                batch = next(remaining)
                parts = _forward_backward(t, batch, size, last=micro == size - 1)
                for name, value in parts.items():
                    sums[name] = sums[name] + value if name in sums else value.clone()
                _count(t, batch, parts)
            done += size
            lr = _optimizer_step(t)
            if progress is not None and t.ranks.main:
                progress(t.step, t.total_steps)
            if config.log_every_steps and t.step % config.log_every_steps == 0:
                _log_step(t, epoch, lr)
            if config.checkpoint_every_steps and t.step % config.checkpoint_every_steps == 0:
                state = {"epoch": epoch, "position": done, "sums": sums}
                main_only(t.ranks, lambda: _save_checkpoint(config.out / CHECKPOINT, _checkpoint_state(t, **state)))
    finally:
        batches.close()  # stops its prefetching thread, which may hold batches past the epoch's steps
    count = float(sums.pop("batches", 0))
    means = {k: float(v) / max(count, 1.0) for k, v in average_over_ranks(t.ranks, sums).items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise PipelineError(f"the loss became {means['loss']} in epoch {epoch + 1}; lower `lr` (the last checkpoint is kept)")
    return means


def _forward_backward(t: Training, batch: Rows, size: int, *, last: bool) -> dict[str, torch.Tensor]:
    """One micro-batch's loss (the forward under autocast with `amp`: AutocastForward) and its share of the step's gradient;
    under DDP the gradients are averaged over the processes at the step's last micro-batch only."""
    synced = contextlib.nullcontext() if last or t.ranks.world == 1 else t.trained.no_sync()
    with synced:
        loss, parts = loss_step(t, batch)
        share = loss / size
        (share if t.scaler is None else t.scaler.scale(share)).backward()
    return {"loss": loss.detach(), **parts, "batches": torch.ones((), device=loss.device)}


def _optimizer_step(t: Training) -> float:
    """Clip, step, advance the schedule; returns the learning rate the step took."""
    if t.scaler is not None:
        t.scaler.unscale_(t.optimizer)  # clipping compares the true gradients with `max_grad_norm`
    if t.config.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(t.student.parameters(), t.config.max_grad_norm)
        if t.window is not None:
            t.window["grad_norm"] = t.window.get("grad_norm", 0) + norm.detach()
    if t.window is not None:
        t.window["steps"] += 1
    lr = t.optimizer.param_groups[0]["lr"]
    if t.scaler is None:
        t.optimizer.step()
    else:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.schedule.step()
    t.step += 1
    return lr


def _count(t: Training, batch: Rows, parts: dict[str, torch.Tensor]) -> None:
    """Add a micro-batch to what the next step log line averages (only when there will be one)."""
    if not t.config.log_every_steps:
        return
    if t.window is None:
        t.window = {"started": time.perf_counter(), "steps": 0, "rows": 0, "tokens": 0, "sums": {}}
    t.window["rows"] += len(batch["index"])
    if "lengths" in batch:
        t.window["tokens"] += int(batch["lengths"].sum())
    for name, value in parts.items():
        t.window["sums"][name] = t.window["sums"][name] + value if name in t.window["sums"] else value.clone()


def _log_step(t: Training, epoch: int, lr: float) -> None:
    """Every `log_every_steps` steps: the loss and its parts averaged over the window's
    micro-batches and processes, the learning rate, the gradient norm before clipping, and
    rows (and tokens) per second over every process; a log line, and a steps.jsonl line. The
    first line after a resume covers the steps since the resume."""
    window, t.window = t.window, None
    seconds = time.perf_counter() - window["started"]
    sums = dict(window["sums"])
    if "grad_norm" in window:
        sums["grad_norm"] = window["grad_norm"]
    sums["counted"] = torch.tensor([float(window["rows"]), float(window["tokens"])], device=t.device)
    averaged = average_over_ranks(t.ranks, sums)  # one host sync per log line
    rows, tokens = (float(v) * t.ranks.world for v in averaged.pop("counted"))  # sums over the processes
    norm = averaged.pop("grad_norm", None)
    count = float(averaged.pop("batches"))
    record = {"step": t.step, "epoch": epoch + 1, **{k: float(v) / count for k, v in averaged.items()}, "lr": lr}
    if norm is not None:
        record["grad_norm"] = float(norm) / window["steps"]  # before clipping, per step
    record["rows_per_s"] = rows / seconds
    if t.lengths is not None:
        record["tokens_per_s"] = tokens / seconds
    if t.ranks.main:
        log.info("step %d/%d %s", t.step, t.total_steps, _brief({k: v for k, v in record.items() if k != "step"}))
        t.steps_log.write(json.dumps(record) + "\n")
        t.steps_log.flush()


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
    epoch_metrics = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in means.items()}}
    # Memory beside the metrics, not in them: metrics.jsonl is what the run computed, which a
    # resumed or repeated run reproduces exactly; the peak resident memory is the process's.
    memory = {"epoch": epoch + 1, "train_peak_rss_mb": peak_rss_mb()}  # before evaluating: the training steps' peak
    if training.evaluation is not None:
        epoch_metrics.update({f"test_{k}": v for k, v in evaluate(training.model, training.evaluation, training.device,
                                                                    config.eval_batch_size, config.logit_pieces).items()})
    epoch_metrics["seconds"] = time.perf_counter() - epoch_started
    with open_no_follow(config.out / MEMORY, "a") as memory_file:
        memory_file.write(json.dumps({**memory, "peak_rss_mb": peak_rss_mb()}) + "\n")
    metrics_file.write(json.dumps(epoch_metrics) + "\n")
    metrics_file.flush()
    log.info("epoch %d/%d %s", epoch + 1, len(training.epoch_batches), _brief(epoch_metrics))
    epochs = len(training.epoch_batches)
    if config.checkpoint_every and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == epochs):
        _save_checkpoint(config.out / CHECKPOINT, _checkpoint_state(training, epoch=epoch + 1, position=0, sums={}))
    return epoch_metrics


def _checkpoint_state(training: Training, *, epoch: int, position: int, sums: dict[str, torch.Tensor]) -> dict:
    """Everything a resumed run continues from: the weights, the optimizer, schedule and scaler,
    every RNG state, and where it stands: `epoch`, the micro-batches of it consumed
    (`position`), the sums of its losses so far, the optimizer steps done, and the run's seconds."""
    t = training
    return {
        "step": t.step, "epoch": epoch, "position": position, "sums": sums, "model": t.student.state_dict(),
        "optimizer": t.optimizer.state_dict(), "schedule": t.schedule.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else {}, "rng": _rng_states(t.device),
        "seconds": _seconds_so_far(t),
    }


def _seconds_so_far(training: Training) -> float:
    """The run's seconds up to now: this part's, and the earlier parts' up to the checkpoint it resumed from."""
    return (training.earlier_seconds or 0.0) + time.perf_counter() - training.started


def _rng_states(device: torch.device) -> dict:
    """torch's (CPU, and the device's), numpy's global and Python's RNG states, as tensors and
    plain values (a checkpoint is read with weights_only=True)."""
    numpy = np.random.get_state(legacy=False)
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": int(numpy["state"]["pos"]),
                        "has_gauss": int(numpy["has_gauss"]), "gauss": float(numpy["gauss"])}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def batch_loss(
    logits: torch.Tensor | HiddenAndHead, batch: Rows, cache: SoftLabels | None, *, alpha: float, temperature: float | None,
    divergence: str = divergences.DEFAULT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the student's `logits` (or its HiddenAndHead) on one batch of rows (numpy, as
    the cache gives them): stages.loop.soft_label_loss, the function behind `kd_loss`, with the
    cache's kind and T."""
    names = ("labels", "lengths", "trained", *(cache.soft_arrays if cache else ()))
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


class AutocastForward(torch.nn.Module):
    """The student's forward under autocast (`amp`: bf16 or fp16), its outputs (the logits, and
    the features of a StudentWithProjection) returned in float32: the matrix products run in half
    precision, the loss's log-softmax and sums over classes do not."""

    def __init__(self, model: torch.nn.Module, amp: str, device: torch.device):
        super().__init__()
        self.model, self.amp, self.device_type = model, amp, device

    def forward(self, inputs: torch.Tensor):
        with autocast(self.amp, self.device_type):
            outputs = self.model(inputs)
        if isinstance(outputs, HiddenAndHead):  # the head too runs under autocast, a piece of positions at a time
            return HiddenAndHead(outputs.hidden.float(), AutocastForward(outputs.head, self.amp, self.device_type))
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()


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
        names = ("index", *cache.soft_arrays, *features, *(("view_seeds",) if views else ()),
                 *(("trained",) if cache.layout.trained_mask else ()))
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
    # The positions the student learns from: a masked cache's own (its soft labels are there
    # alone), else the split's where it marks them (chat data), else every valid one.
    trained_of = None if (cache is not None and cache.layout.trained_mask) else getattr(train, "trained_positions", None)
    return prefetch((_with_labels_and_lengths(r, labels, lengths, trained_of) for r in joined), depth=4)


def _augmented(batches: Iterator[Rows], augment: Augmentation, replay: bool, rng: np.random.Generator) -> Iterator[Rows]:
    """Each batch with its inputs augmented: replayed from its views' stored seeds, or with
    fresh seeds drawn from `rng`."""
    for rows in batches:
        seeds = rows["view_seeds"] if replay else rng.integers(0, 2**63, size=len(rows["index"]), dtype=np.uint64)
        yield {**rows, "inputs": augment(rows["inputs"], seeds)}


def _with_labels_and_lengths(rows: Rows, labels: np.ndarray | None, lengths: np.ndarray | None,
                             trained_of: Callable[[np.ndarray], np.ndarray] | None = None) -> Rows:
    extra = {}
    if labels is not None and "labels" not in rows:
        extra["labels"] = labels[rows["index"]]
    if lengths is not None:
        extra["lengths"] = lengths[rows["index"]]
    if trained_of is not None and lengths is not None:
        extra["trained"] = trained_of(rows["index"])
    return {**rows, **extra} if extra else rows


def _open_run_dir(config: TrainConfig, run_config: dict) -> None:
    """Make the run folder ready: new, or the same run's to resume."""
    out = config.out
    if config.resume and (out / "config.json").is_file():
        _check_same_run(out, run_config)
        if not (out / CHECKPOINT).is_file():
            (out / "metrics.jsonl").unlink(missing_ok=True)  # killed before its first checkpoint
            (out / MEMORY).unlink(missing_ok=True)
            (out / STEPS_LOG).unlink(missing_ok=True)
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"checkpoint {path} cannot be read ({exc}); start over with `overwrite`") from exc
    if "step" not in state:  # written by a version that checkpointed epochs only, with a per-epoch schedule
        raise PipelineError(f"checkpoint {path} is of an older version of the tool, which cannot resume it; "
                            "start over with `overwrite`")
    return state


def _check_same_run(out: Path, run_config: dict) -> None:
    stored = json.loads((out / "config.json").read_text())
    # An option a run folder does not record is one its version did not have: it ran with the default.
    stored = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}, **stored}
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


def _kept_steps(path: Path, step: int) -> None:
    """Keep the step log lines of the steps a resumed run keeps (those up to its checkpoint)."""
    if not path.is_file():
        return
    with os.fdopen(no_follow_fd(path, os.O_RDONLY)) as file:
        lines = file.read().splitlines()
    kept = []
    for number, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            if number < len(lines) - 1:  # a last line cut short by the kill is dropped; any other is damage
                raise PipelineError(f"{path} is damaged (its lines are not step records); start over with --overwrite") from None
    write_atomically(path, "".join(line + "\n" for line in kept).encode())


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
