"""`pipeline demo-llm`: language-model distillation at a real vocabulary, end to end, offline.

A byte-level BPE tokenizer of 8,192 tokens is trained on the Python standard library's sources
(pipeline.corpus.stdlib_tokenizer), and those sources are the corpus, packed into rows of `seq`
next-token targets with a held-out split of whole files. A GPT-2-style teacher is trained on it
(train-teacher), cached per token at top-k for each K, and a smaller GPT-2-style student is
trained from each cache and from hard labels alone, with the same seed, data order and epochs.
The reference arm is dense KD: a dense cache over the same rows, every class of every token, or,
where that would not fit (`dense_max_gib`), online KD with the teacher run in every step.
The report gives each student's held-out loss (nats and bits per token, perplexity), each
cache's bytes per token on disk, and the seconds of every stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

# The stages load torch, which `pipeline --help` must not wait for: run_llm_demo imports them.


@dataclass(frozen=True)
class LLMDemo:
    """The demo's sizes. The defaults finish in well under 30 minutes on 2 CPU cores; on a GPU,
    raise max_tokens, seq, the models and the epochs (`pipeline demo-llm --help`)."""

    vocab: int = 8192
    seq: int = 128
    max_tokens: int = 60_000  # of the training stream (the held-out stream: 25% of it, from other files)
    teacher: str = "gpt2:layers=4,dim=192,heads=4"
    student: str = "gpt2:layers=1,dim=32,heads=2"
    teacher_epochs: int = 8
    student_epochs: int = 4
    batch_size: int = 8
    lr: float = 2e-3
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft labels in the students' loss (the rest: the hard targets)
    top_ks: tuple[int, ...] = (8, 32, 128)
    # The dense-KD reference: a dense cache over the same rows when its soft labels take at most
    # this many GiB (2 bytes per class per token), else online KD, the teacher run in every step.
    dense_max_gib: float = 20.0
    seed: int = 0


def run_llm_demo(out: Path, demo: LLMDemo = LLMDemo(), *, device: str = "auto", teacher_weights: Path | None = None) -> dict:
    """Run every stage into `out` (replacing an earlier demo's runs there; the tokenizer and
    corpus are reused) and return the report."""
    from pipeline.corpus import stdlib_corpus, stdlib_tokenizer
    from pipeline.datasets import resolve_dataset
    from pipeline.jobs import run_caching, run_training
    from stages.cache_teacher import CacheTeacherConfig
    from stages.inspection import describe_cache
    from stages.train_student import TrainConfig

    started = time.perf_counter()
    tokenizer = stdlib_tokenizer(out / f"tokenizer-{demo.vocab}", demo.vocab)
    corpus = stdlib_corpus(out / "corpus")
    dataset = f"corpus:{corpus.absolute()},tokenizer=hf:{tokenizer.absolute()},seq={demo.seq},test=25,max_tokens={demo.max_tokens}"
    train = resolve_dataset(dataset).split("train")
    prepared = time.perf_counter() - started
    teacher_report: dict = {"spec": demo.teacher}
    if teacher_weights is None:
        teacher_weights = out / "teacher.safetensors"
        trained = run_training(TrainConfig(
            model=demo.teacher, dataset=dataset, out=out / "teacher.run", weights_out=teacher_weights, alpha=0.0,
            epochs=demo.teacher_epochs, batch_size=demo.batch_size, lr=demo.lr, seed=demo.seed, device=device, overwrite=True,
        ))
        teacher_report.update(_loss(trained.test_nll), num_parameters=trained.num_parameters, seconds=trained.seconds)
    teacher_report["weights"] = str(teacher_weights)
    dense_gib = len(train) * demo.seq * train.num_classes * 2 / 2**30
    online = dense_gib > demo.dense_max_gib
    caches = {}
    for top_k in (*demo.top_ks, *(() if online else (None,))):
        name = "dense" if top_k is None else f"top-{top_k}"
        result = run_caching(CacheTeacherConfig(
            teacher=demo.teacher, teacher_weights=teacher_weights, dataset=dataset, out=out / f"{name}.zarr",
            temperature=demo.temperature, format="dense" if top_k is None else "topk", top_k=top_k,
            batch_size=demo.batch_size, device=device, overwrite=True,
        ))
        described = describe_cache(result.cache)
        caches[name] = {"path": str(result.cache), "bytes_per_token": described["bytes_per_token"],
                        "mean_tail_mass": described.get("tail_mass", {}).get("mean"), "seconds": result.seconds}
    students = {}
    for name in ("hard labels", *caches, *(("online KD",) if online else ())):
        cache = caches.get(name)
        config = TrainConfig(
            model=demo.student, dataset=dataset, out=out / f"student-{name.replace(' ', '-')}",
            cache=Path(cache["path"]) if cache else None, alpha=demo.alpha if name != "hard labels" else 0.0,
            temperature=demo.temperature, epochs=demo.student_epochs, batch_size=demo.batch_size, lr=demo.lr,
            seed=demo.seed, device=device, overwrite=True,
        )
        run = _online_kd(config, demo, teacher_weights, train) if name == "online KD" else run_training(config)
        students[name] = {**_loss(run.test_nll), "test_tokens": run.test_tokens, "num_parameters": run.num_parameters,
                          "bytes_per_token": cache["bytes_per_token"] if cache else None,
                          "mean_tail_mass": cache["mean_tail_mass"] if cache else None,
                          "cache_seconds": cache["seconds"] if cache else None, "seconds": run.seconds}
    report = {
        "dataset": dataset, "demo": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(demo).items()},
        "train_tokens": int(train.lengths.sum()), "dense_cache_gib": dense_gib,
        "reference": "online KD (the teacher run in every step)" if online else "dense cache",
        "teacher": teacher_report, "students": students, "prepare_seconds": prepared,
        "seconds": time.perf_counter() - started,
    }
    hard = students["hard labels"]["nats_per_token"]
    report["every_cache_beats_hard_labels"] = all(s["nats_per_token"] < hard for n, s in students.items() if n != "hard labels")
    reference = students["online KD" if online else "dense"]["nats_per_token"]
    if "top-32" in students:
        report["top32_vs_reference_loss"] = students["top-32"]["nats_per_token"] / reference
    return report


def _online_kd(config, demo: LLMDemo, teacher_weights: Path, train):
    """The reference arm when a dense cache would not fit: the same student and loss, the
    teacher's dense soft labels computed in every step (stages.online)."""
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages import train_student
    from stages.online import OnlineTeacher
    from stages.runtime import resolve_device, seed_everything

    teacher = resolve_model(demo.teacher, num_classes=train.num_classes, input_shape=(demo.seq,), weights=teacher_weights)
    seed_everything(config.seed)  # the student's initial weights, as run_training draws them
    student = resolve_model(demo.student, num_classes=train.num_classes, input_shape=(demo.seq,))
    online = OnlineTeacher(teacher, train, demo.temperature, resolve_device(config.device))
    return train_student.run(config, student, train, resolve_dataset(config.dataset).split("test"), soft_labels=online)


def _loss(nats: float) -> dict:
    return {"nats_per_token": nats, "bits_per_token": nats / math.log(2), "perplexity": math.exp(nats)}


def llm_demo_table(report: dict) -> Table:
    demo = report["demo"]
    table = Table(title=f"pipeline demo-llm: {demo['student']} distilled from {demo['teacher']} over the standard library "
                        f"({demo['vocab']:,}-token BPE, T={demo['temperature']:g}, alpha={demo['alpha']:g})")
    for column in ("student trained from", "held-out nats/token", "bits/token", "perplexity", "cache bytes/token",
                   "cache s", "train s"):
        table.add_column(column, justify="left" if column == "student trained from" else "right")
    for name, s in report["students"].items():
        table.add_row(name + (" (dense-KD reference)" if name in ("dense", "online KD") else ""), f"{s['nats_per_token']:.4f}",
                      f"{s['bits_per_token']:.4f}", f"{s['perplexity']:.2f}",
                      "" if s["bytes_per_token"] is None else f"{s['bytes_per_token']:,.1f}",
                      "" if s["cache_seconds"] is None else f"{s['cache_seconds']:.0f}", f"{s['seconds']:.0f}")
    teacher = report["teacher"]
    if "nats_per_token" in teacher:
        table.add_row(f"teacher ({teacher['num_parameters']:,} parameters)", f"{teacher['nats_per_token']:.4f}",
                      f"{teacher['bits_per_token']:.4f}", f"{teacher['perplexity']:.2f}", "", "", f"{teacher['seconds']:.0f}",
                      style="bold")
    return table
