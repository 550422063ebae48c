"""`pipeline demo`: the whole pipeline on the embedded MNIST digits, end to end.

Trains a CNN teacher on the 4,000 training digits, caches its logits at T=4 on that split,
then for each seed trains the same MLP twice, from scratch and distilled from the cache, and
reports test errors out of the 1,000 held-out digits with the seconds each stage took.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.table import Table

from pipeline.jobs import run_caching, run_training
from stages.cache_teacher import CacheTeacherConfig
from stages.train_student import TrainConfig

DATASET = "mnist-5k"
TEACHER = "cnn"
STUDENT = "mlp-400"
TEMPERATURE = 4.0
ALPHA = 0.9
TEACHER_EPOCHS = 15
STUDENT_EPOCHS = 20


def run_demo(out: Path, *, seeds: int = 3, device: str = "auto") -> dict:
    """Run every step into `out` (replacing an earlier demo there) and return the report."""
    weights = out / "teacher.safetensors"
    teacher = run_training(
        TrainConfig(
            model=TEACHER, dataset=DATASET, out=out / "teacher.run", weights_out=weights, alpha=0.0,
            epochs=TEACHER_EPOCHS, augment="shift:2", device=device, overwrite=True,
        )
    )
    cache = run_caching(
        CacheTeacherConfig(
            teacher=TEACHER, teacher_weights=weights, dataset=DATASET, split="train", out=out / "cache.zarr",
            temperature=TEMPERATURE, device=device, overwrite=True,
        )
    )
    students = []
    for seed in range(seeds):
        for mode, cache_path in (("scratch", None), ("distilled", cache.cache)):
            result = run_training(
                TrainConfig(
                    model=STUDENT, dataset=DATASET, out=out / f"{STUDENT}-{mode}-s{seed}", cache=cache_path,
                    alpha=ALPHA, epochs=STUDENT_EPOCHS, seed=seed, device=device, overwrite=True,
                )
            )
            students.append(
                {"name": STUDENT, "mode": mode, "seed": seed, "test_errors": result.test_errors,
                 "test_accuracy": result.test_accuracy, "seconds": result.seconds, "run_dir": str(result.run_dir)}
            )
    mean_errors = {
        mode: statistics.mean(s["test_errors"] for s in students if s["mode"] == mode) for mode in ("scratch", "distilled")
    }
    return {
        "dataset": DATASET,
        "test_samples": teacher.test_samples,
        "teacher": {"name": TEACHER, "test_errors": teacher.test_errors, "test_accuracy": teacher.test_accuracy,
                    "seconds": teacher.seconds, "weights": str(weights)},
        "cache": {"path": str(cache.cache), "temperature": TEMPERATURE, "bytes_on_disk": cache.bytes_on_disk,
                  "train_accuracy": cache.teacher_accuracy, "seconds": cache.seconds},
        "students": students,
        "mean_test_errors": mean_errors,
        "distilled_beats_scratch": mean_errors["distilled"] < mean_errors["scratch"],
    }


def demo_table(report: dict) -> Table:
    table = Table(title=f"pipeline demo on {report['dataset']}: test errors out of {report['test_samples']}")
    for column in ("model", "how it was trained", "seed", "test errors", "seconds"):
        table.add_column(column, justify="right" if column in ("seed", "test errors", "seconds") else "left")
    teacher = report["teacher"]
    table.add_row(teacher["name"], "teacher, hard labels + shift:2", "0", str(teacher["test_errors"]), f"{teacher['seconds']:.1f}")
    cache = report["cache"]
    table.add_row("", f"cache-teacher, T={cache['temperature']:g} ({cache['bytes_on_disk'] / 1024:.0f} KiB)", "", "", f"{cache['seconds']:.1f}")
    for s in report["students"]:
        how = "scratch (hard labels)" if s["mode"] == "scratch" else f"distilled from the cache, alpha={ALPHA}"
        table.add_row(s["name"], how, str(s["seed"]), str(s["test_errors"]), f"{s['seconds']:.1f}")
    for mode, errors in report["mean_test_errors"].items():
        table.add_row(STUDENT, f"{mode}: mean over seeds", "", f"{errors:.1f}", "", style="bold")
    return table
