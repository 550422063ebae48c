"""`pipeline sweep CONFIG.toml`: many student runs from one cache, and a leaderboard.

A sweep is a grid over one cache: students x alphas x temperatures x divergences x seeds, plus (with
`baseline = true`) each student on hard labels only, per seed. Every run is an ordinary
train-student run folder under the sweep's folder, so anything that reads run folders reads a
sweep. Runs already finished are reused, runs killed part-way resume from their checkpoint:
re-running the same command after an interruption does only what is left.

    cache = "data/caches/cnn-mnist-5k-train-T4.zarr"
    students = ["mlp-64", "mlp-128", "mlp-400"]
    alphas = [0.5, 0.9]
    temperatures = [4.0]          # optional: default the cache's T
    divergences = ["forward-kl", "reverse-kl"]  # optional: default forward-kl (stages.divergences)
    seeds = [0, 1]
    baseline = true               # optional: default true
    out = "data/sweeps/mnist"     # optional: default data/sweeps/CONFIG-NAME
    dataset = "my_data.py:build"  # optional: default the cache's (a cache's code spec must be named here)

    [train]                       # optional: any other train-student option, for every run
    epochs = 20

The leaderboard (terminal table, leaderboard.csv, leaderboard.json, leaderboard.png) groups
runs that differ only by seed: mean, spread and count of their test accuracy, and each group's
paired difference in accuracy from its student on hard labels (pipeline.paired): seed s fixes a
student's initial weights and its batch order in every run of the grid (the hard-label runs read
the cache for that order alone, at alpha 0), so the difference at each seed has the seed's noise
cancelled; its mean with a 95% t interval, and whether that interval says the group beats hard
labels. With `--jobs` above 1, each log line of a run starts with the run's name.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import statistics
import threading
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path

from pipeline.config import build_config, check_type, in_flags
from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_training, spec_from_cache
from pipeline.models import resolve_model
from pipeline.paired import paired, verdict
from pipeline.specs import sweep_run_name
from stages.cache import CacheReader
from stages.data import input_shape
from stages import divergences
from stages.errors import InputError, PipelineError
from stages.runtime import resolve_device
from stages.train_student import TrainConfig

log = logging.getLogger(__name__)

GRID_KEYS = {"cache": str, "students": list, "alphas": list, "temperatures": list, "divergences": list, "seeds": list,
             "baseline": bool, "out": str, "dataset": str, "train": dict}
# Options of every run that the grid (or its cache) sets: not allowed in [train].
SET_BY_GRID = {"model", "cache", "alpha", "temperature", "divergence", "seed", "out", "resume", "overwrite", "weights_out", "model_weights",
               "dataset", "split"}


@dataclass(frozen=True)
class SweepRun:
    name: str
    student: str
    mode: str  # "distilled" or "scratch"
    alpha: float | None
    temperature: float | None
    seed: int
    config: TrainConfig
    divergence: str | None = None  # distilled runs: stages.divergences' spelling


def read_sweep(path: Path, out: Path | None, data_root: Path, overwrite: bool = False) -> list[SweepRun]:
    """The runs of the sweep described by the TOML file at `path`, every option checked and every
    student built once, so that a mistake fails at once rather than in each run. With
    `overwrite`, every run starts over; otherwise finished runs are reused and others resumed."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the sweep's TOML file")
    if not path.is_file():
        raise InputError(f"sweep file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"sweep file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise InputError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; keys: {', '.join(GRID_KEYS)}")
    for key, kind in GRID_KEYS.items():
        if key in raw and not isinstance(raw[key], kind):
            raise InputError(f"sweep file {path}: {key} must be a {kind.__name__}, got {raw[key]!r}")
    for key in ("cache", "students", "seeds"):
        if not raw.get(key):
            raise InputError(f"sweep file {path}: {key} is required (and must not be empty)")
    cache = Path(raw["cache"]).absolute()
    reader = CacheReader(cache)
    grid = {"students": raw["students"], "alphas": raw.get("alphas", [0.9]),
            "temperatures": raw.get("temperatures", [reader.temperature]),
            "divergences": raw.get("divergences", [divergences.DEFAULT]), "seeds": raw["seeds"]}
    for key, kind in (("students", str), ("alphas", (int, float)), ("temperatures", (int, float)), ("divergences", str),
                      ("seeds", int)):
        _check_items(path, key, grid[key], kind)
    train = _train_options(path, raw.get("train", {}))
    folder = out or (Path(raw["out"]).absolute() if "out" in raw else data_root / "sweeps" / path.stem)
    dataset = {"dataset": raw.get("dataset") or spec_from_cache(cache, reader.attrs, "dataset"), "split": reader.attrs["dataset"]["split"]}
    spec_from_cache(cache, reader.attrs, "augment", named=train.get("augment"))  # refused here, not in every run
    _check_students(grid["students"], reader, dataset, train)
    common = {**dataset, **train, "resume": not overwrite, "overwrite": overwrite}
    runs = []
    for student in grid["students"]:
        for seed in grid["seeds"]:
            if raw.get("baseline", True):  # reads the cache for the distilled runs' batch order, no more (alpha 0)
                name = sweep_run_name(student, seed)
                config = build_config(TrainConfig, {**common, "model": student, "cache": cache, "alpha": 0.0, "seed": seed,
                                                    "out": folder / name})
                runs.append(SweepRun(name, student, "scratch", None, None, seed, config))
            for alpha, temperature, divergence in itertools.product(grid["alphas"], grid["temperatures"], grid["divergences"]):
                name = sweep_run_name(student, seed, alpha, temperature, divergence)
                config = build_config(TrainConfig, {
                    **common, "model": student, "cache": cache, "alpha": float(alpha), "temperature": float(temperature),
                    "divergence": divergence, "seed": seed, "out": folder / name,
                })
                runs.append(SweepRun(name, student, "distilled", float(alpha), float(temperature), seed, config, divergence))
    for run in runs:
        run.config.validate()
    return runs


def _train_options(path: Path, options: dict) -> dict:
    """The [train] table: train-student options (type-checked) that the grid does not set."""
    train = {key.replace("-", "_"): value for key, value in options.items()}
    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train) - set(fields))
    if unknown:
        raise InputError(f"sweep file {path}: [train] has unknown option(s) {', '.join(unknown)}")
    grid_set = sorted(set(train) & SET_BY_GRID)
    if grid_set:
        raise InputError(f"sweep file {path}: [train] cannot set {', '.join(grid_set)} (the grid and its cache set the student, "
                         "cache, dataset, split, alpha, T, seed and folder)")
    for name, value in train.items():
        check_type(path, name, value, fields[name])
    return train


def _check_students(students: list[str], reader: CacheReader, dataset: dict, train: dict) -> None:
    """Build every student once on the cache's data and check the device, before any run."""
    resolve_device(train.get("device", "auto"))
    split = resolve_dataset(dataset["dataset"]).split(dataset["split"])
    for student in students:
        resolve_model(student, num_classes=reader.num_classes, input_shape=input_shape(split))


def run_sweep(runs: list[SweepRun], folder: Path, jobs: int) -> dict:
    """Run every run not yet finished (`jobs` at a time, each in its own process when jobs > 1),
    then write and return the leaderboard of the runs that finished. Runs that fail are
    reported, not retried, and left out of the leaderboard."""
    folder.mkdir(parents=True, exist_ok=True)
    finished_before = {run.name for run in runs if (run.config.out / "summary.json").is_file() and not run.config.overwrite}
    failures: dict[str, PipelineError] = {}
    if jobs == 1:
        for number, run in enumerate(runs, start=1):
            log.info("sweep: run %s (%d of %d) -> %s", run.name, number, len(runs), run.config.out)
            try:
                run_training(run.config)
            except PipelineError as exc:
                failures[run.name] = exc
    else:
        failures = _run_in_workers(runs, jobs)
    board = leaderboard([run for run in runs if run.name not in failures])
    board.update({
        "folder": str(folder), "runs_total": len(runs), "runs_reused": len(finished_before - set(failures)),
        # A sweep's runs are train-student's: the user sees its flags, as from that command.
        "failures": {name: in_flags(str(exc), "train-student") for name, exc in failures.items()},
    })
    write_leaderboard(board, folder)
    board["exit_code"] = max((exc.exit_code for exc in failures.values()), default=0)
    return board


def _run_in_workers(runs: list[SweepRun], jobs: int) -> dict[str, PipelineError]:
    """Run `runs` in `jobs` worker processes; return the failures by run name. No worker outlives
    this process: an interrupt (SIGINT, or the CLI's SIGTERM) kills them before it propagates, so
    no queued run starts, and the runs they were in resume from their checkpoints next time."""
    failures = {}
    context = get_context("spawn")
    # Every worker watches the read end; it turns readable (EOF) when this process closes the
    # write end or dies, even by SIGKILL, for the kernel closes a dead process's files. Only this
    # process holds the write end: the fds of a pipe are not inherited by spawned processes.
    stop_watch, stop = context.Pipe(duplex=False)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(threads, stop_watch))
    try:
        futures = {pool.submit(_run_named, run.name, run.config): run for run in runs}
        for done, future in enumerate(as_completed(futures), start=1):
            try:
                future.result()
            except PipelineError as exc:
                failures[futures[future].name] = exc
            log.info("sweep: %d of %d runs done", done, len(runs))
    except BaseException:
        # The pool has handed queued runs to the workers ahead of time, where cancelling cannot
        # reach them: only stopping the workers themselves starts none of them.
        stop.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop.close()
    return failures


def leaderboard(runs: list[SweepRun]) -> dict:
    """Each finished run's figures, and the groups of runs that differ only by seed, best first,
    each with its accuracy's paired difference from its student's hard-label group over the seeds
    both finished (None for the hard-label groups and where a student has none)."""
    rows = []
    for run in runs:
        summary_path = run.config.out / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        rows.append({
            "run": run.name, "student": run.student, "mode": run.mode, "alpha": run.alpha, "temperature": run.temperature,
            "divergence": run.divergence, "seed": run.seed, "num_parameters": summary["num_parameters"], "test_accuracy": summary["test_accuracy"],
            "test_errors": summary["test_errors"], "test_nll": summary["test_nll"], "seconds": summary["seconds"],
        })
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["student"], row["mode"], row["alpha"], row["temperature"], row["divergence"]), []).append(row)
    table = []
    for (student, mode, alpha, temperature, divergence), members in groups.items():
        accuracies = [m["test_accuracy"] for m in members]
        table.append({
            "student": student, "mode": mode, "alpha": alpha, "temperature": temperature, "divergence": divergence,
            "num_parameters": members[0]["num_parameters"], "seeds": len(members),
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
            "errors_mean": statistics.mean(m["test_errors"] for m in members),
            "nll_mean": statistics.mean(m["test_nll"] for m in members),
            "seconds_mean": statistics.mean(m["seconds"] for m in members),
            **_against_hard_labels(members, groups.get((student, "scratch", None, None, None))),
        })
    table.sort(key=lambda g: -g["accuracy_mean"])
    return {"groups": table, "runs": rows}


def _against_hard_labels(members: list[dict], hard: list[dict] | None) -> dict:
    """A group's accuracy minus its student's on hard labels, paired by seed: the mean, its 95%
    t interval, and the verdict on "beats hard labels"."""
    if hard is None or members is hard or not {m["seed"] for m in members} & {h["seed"] for h in hard}:
        return {"vs_hard_labels_seeds": None, "vs_hard_labels_mean": None, "vs_hard_labels_low": None,
                "vs_hard_labels_high": None, "beats_hard_labels": None}
    comparison = paired("group", {m["seed"]: m["test_accuracy"] for m in members},
                        "hard labels", {h["seed"]: h["test_accuracy"] for h in hard})
    return {"vs_hard_labels_seeds": len(comparison.seeds), "vs_hard_labels_mean": comparison.mean,
            "vs_hard_labels_low": comparison.low, "vs_hard_labels_high": comparison.high,
            "beats_hard_labels": verdict(comparison, below="no: worse", above="yes")}


def write_leaderboard(board: dict, folder: Path) -> None:
    (folder / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    if board["groups"]:
        with open(folder / "leaderboard.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(board["groups"][0]))
            writer.writeheader()
            writer.writerows({key: _rounded(value) for key, value in group.items()} for group in board["groups"])
        plot_leaderboard(board["groups"], folder / "leaderboard.png")


def _rounded(value):
    """A figure at 6 significant digits: the CSV shows 0.9545, not the mean's float noise 0.9544999999999999."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def plot_leaderboard(groups: list[dict], path: Path) -> None:
    """Test accuracy against parameter count (log scale) and against T: one point per group,
    error bars from the lowest to the highest seed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_temperature) = plt.subplots(1, 2, figsize=(12, 5))
    series: dict[str, list[dict]] = {}
    for group in groups:
        label = "hard labels" if group["mode"] == "scratch" else f"distilled, alpha={group['alpha']:g}, T={group['temperature']:g}"
        series.setdefault(label, []).append(group)
    for label, members in sorted(series.items()):
        members = sorted(members, key=lambda g: g["num_parameters"])
        _errorbar(by_size, [g["num_parameters"] for g in members], members, label)
    by_size.set_xscale("log")
    sizes = sorted({g["num_parameters"] for g in groups})
    by_size.set_xticks(sizes, [f"{n / 1000:.3g}k" if n >= 1000 else str(n) for n in sizes])
    by_size.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    by_size.set_xlabel("student parameters")
    by_size.set_title("test accuracy by student size (mean; bars: lowest to highest seed)")
    distilled = [g for g in groups if g["mode"] == "distilled"]
    for key in sorted({(g["student"], g["alpha"]) for g in distilled}):
        members = sorted((g for g in distilled if (g["student"], g["alpha"]) == key), key=lambda g: g["temperature"])
        _errorbar(by_temperature, [g["temperature"] for g in members], members, f"{key[0]}, alpha={key[1]:g}")
    by_temperature.set_xlabel("distillation temperature T")
    by_temperature.set_title("distilled students: test accuracy by T")
    for axes in (by_size, by_temperature):
        axes.set_ylabel("test accuracy")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _errorbar(axes, xs: list[float], groups: list[dict], label: str) -> None:
    means = [g["accuracy_mean"] for g in groups]
    below = [g["accuracy_mean"] - g["accuracy_min"] for g in groups]
    above = [g["accuracy_max"] - g["accuracy_mean"] for g in groups]
    axes.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=label)


def _start_worker(threads: int, stop_watch: Connection) -> None:
    """A sweep worker: its share of the CPU threads, log lines that name the run they belong to,
    and a life tied to the sweep's. It leads its own process group, so that it and every child it
    starts (DataLoader workers) die as one when the sweep stops or dies; a terminal's Ctrl-C then
    reaches the sweep alone, which stops them."""
    import torch

    torch.set_num_threads(threads)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(run)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_name_the_run)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    os.setpgid(0, 0)
    threading.Thread(target=_die_with_sweep, args=(stop_watch,), name="sweep-watch", daemon=True).start()


_running = {"run": ""}  # in a worker: the run it is in, which its log lines start with


def _name_the_run(record: logging.LogRecord) -> bool:
    record.run = _running["run"]
    return True


def _run_named(name: str, config: TrainConfig):
    """A worker's run, its log lines named."""
    _running["run"] = name
    try:
        return run_training(config)
    finally:
        _running["run"] = ""


def _die_with_sweep(stop_watch: Connection) -> None:
    wait([stop_watch])
    os.killpg(0, signal.SIGKILL)


def _check_items(path: Path, key: str, values: list, kind) -> None:
    if not values:
        raise InputError(f"sweep file {path}: {key} must not be empty")
    bad = [v for v in values if not isinstance(v, kind) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v))]
    if bad:
        raise InputError(f"sweep file {path}: {key} holds {bad[0]!r}, of the wrong type")
    if len(set(values)) < len(values):
        raise InputError(f"sweep file {path}: {key} lists a value twice")
