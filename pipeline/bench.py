"""`pipeline bench`: what the cache costs and what it buys, as ratios measured in one run.

The workload is synthetic but shaped like real distillation: a wide MLP teacher over many
classes, a narrow MLP student, inputs generated on demand (so the dataset's memory does not
grow with its size). Every ratio compares two measurements taken in the same process, on the
same machine, one right after the other:

1. cache-teacher (the whole stage) / the plain inference loop over the same batches, the
   fastest of two turns each
2. train-student from the cache, per epoch / the same KD training from logits held in memory
   (reading is free), and / plain hard-label training (what the KD loss itself costs); the
   median epoch over four rotated rounds
3. a student run from the cache / an online-KD run with the teacher computing every batch,
   and how many student runs pay back the one teacher pass
4. train-student's peak resident memory with a 10x larger cache / with the base cache
   (separate processes; both caches written by a cheap teacher, since only size matters)
5. cache rows per second read in shuffled-chunk order / in file order
6. cache rows per second read with every chunk's crc32c checksum verified / from a copy of the
   same cache without checksums (as schema 2 wrote it), in file order, the fastest of READ_TURNS turns each
7. a train-student epoch from the cache beside two CPU-burning processes with the tool's CPU thread
   choice / with one thread, and with a thread on every core (torch's default) / one thread; on the
   machine as it is, the tool's choice / a thread on every core
8. cache-teacher's peak resident memory (a fresh process each) for a GPT-2 teacher over a
   language model's vocabulary (`lm_vocab`, 70,000: uint32 classes), top-32, at a batch 8x larger
   / the smaller batch; and, for scale, the same with the logits computed whole per batch (the
   teacher without `hidden_and_head`): what the memory would be if it grew with B x L x V
9. the training reader (CacheReader.batches, the arrays train-student reads) against the limit:
   the same bytes as .npy files read through a memory map, in the same shuffled chunk order,
   buffered, shuffled and batched the same way, on a warm page cache; for a dense per-sample
   cache (`reader_rows` x `classes`) and a top-32 token cache at a `reader_vocab` vocabulary
   (`reader_tokens` tokens in rows of `lm_seq`), each written with random values (reading does
   not depend on them). A reader's first epoch range-checks every value; later ones rely on the
   checksums (stages.cache.reader), so both are reported, the fastest of READ_TURNS turns each
10. cache-teacher writing a top-32 token cache at a `writer_vocab` vocabulary (32,000) / the
   bare forward of the same GPT-2-style teacher (`writer_teacher`, random weights) over the same
   batches, the fastest of TEACHER_PASSES turns each: what the top k, the log-sum-exp, the
   copies and the writes add to computing the logits

11. train-student's peak resident memory and seconds per step (fresh processes) for a tiny GPT-2
   student (`lm_student`) from a top-32 token cache at each of `student_vocabs` (32,000 and
   128,256), rows of each of `student_seqs` tokens (128, 1,024) and batches of each of
   LM_BATCHES (4, 32): during the training steps (the run's memory.jsonl, taken before it
   evaluates) and in all, with an evaluation of as many held-out rows at the same batch; with the
   loss and evaluation in pieces of positions (stages.losses.piecewise_loss)
   and on whole logits (--whole-logits), the latter skipped where one float32 copy of the batch's
   logits would pass `whole_max_gib`; and, as the limit, the bare student: the same student's
   forward and backward to its last hidden states and an AdamW step on as many batches of the
   same shape, with no loss over the vocabulary and no cache (`bare_student_steps`). The student's
   own activations grow with batch x length whatever the loss does; what the loss in pieces adds
   beyond them should not.

Sections 1-7 ("core"), 8 ("lm-memory"), 9 ("reader"), 10 ("lm-writer") and 11 ("lm-student") can be run alone (`only`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.cache import CacheReader, CacheWriter, Layout, Rows, batch_bounds, default_chunk_rows
from stages.data import Split, input_shape, sha256
from stages.errors import InputError, PipelineError
from stages.online import OnlineTeacher
from stages.runtime import one_blas_thread_beside_torch, resolve_device, seed_everything, torch_threads, training_threads
from stages.storage import disk_usage
from stages.weights import count_parameters, save_weights

ROUNDS = 4
TEACHER_PASSES = 2
READ_TURNS = 3
THREAD_TURNS = 2
# "never several times slower than one thread": under load, the thread choice within 1.5x of one thread
TARGETS = {"cache_vs_forward": 1.05, "student_cache_vs_memory": 1.10, "memory_10x_vs_1x": 1.10, "shuffled_vs_sequential_reads": 0.5,
           "loaded_threads_chosen_vs_one": 1.5, "lm_teacher_memory_8x_batch": 1.10,
           "reader_vs_memmap_dense": 0.7, "reader_vs_memmap_tokens": 0.7, "lm_cache_vs_forward": 1.05,
           # the chunk manifest's check (each chunk read is the one written there) costs the reader at most 3%
           "reader_manifest_checked_vs_unchecked_dense": 0.97, "reader_manifest_checked_vs_unchecked_tokens": 0.97,
           **{f"lm_student_{measure}_memory_largest_vs_smallest_beyond_bare_v{vocab}": 1.15
              for measure in ("train", "train_and_evaluate") for vocab in (32_000, 128_256)},
           "lm_student_step_in_pieces_vs_whole_v32000": 1.3}
# Ratios whose target is a floor (the rest are ceilings).
AT_LEAST = {"shuffled_vs_sequential_reads", "reader_vs_memmap_dense", "reader_vs_memmap_tokens",
            "reader_manifest_checked_vs_unchecked_dense", "reader_manifest_checked_vs_unchecked_tokens"}
SECTIONS = ("core", "lm-memory", "reader", "lm-writer", "lm-student")
READER_TOP_K = 32
READER_BATCH_TOKENS = 8192  # a token cache's batches: this many positions (rows of lm_seq)


@dataclass(frozen=True)
class BenchConfig:
    samples: int = 20000
    classes: int = 1000
    features: int = 256
    teacher_width: int = 4096
    teacher_depth: int = 3
    student_width: int = 256
    batch_size: int = 256
    epochs: int = 3
    temperature: float = 4.0
    device: str = "auto"
    lm_vocab: int = 70_000  # section 8's vocabulary (0: skip the section)
    lm_seq: int = 256
    reader_rows: int = 100_000  # section 9's dense cache: rows of `classes` (200 MB at 1,000)
    reader_tokens: int = 4_000_000  # section 9's top-32 token cache: positions (about 530 MB)
    reader_vocab: int = 8192
    writer_vocab: int = 32_000  # section 10's vocabulary (0: skip the section)
    writer_teacher: str = "gpt2:layers=4,dim=512,heads=8"
    writer_rows: int = 64  # rows of lm_seq tokens it caches
    writer_batch: int = 8
    student_vocabs: tuple[int, ...] = (32_000, 128_256)  # section 11's vocabularies (empty: skip the section)
    student_seqs: tuple[int, ...] = (128, 1024)
    lm_student: str = "gpt2:layers=1,dim=16,heads=2"
    whole_max_gib: float = 2.5  # section 11: no whole-logits run whose batch's logits take more (float32, one copy)
    only: tuple[str, ...] = ()  # sections to run (SECTIONS; empty: all)
    quick: bool = False  # sizes too small for the ratios to mean what the targets mean: no verdicts


QUICK = BenchConfig(samples=4000, classes=200, features=128, teacher_width=1024, student_width=128, epochs=2, lm_seq=64,
                    reader_rows=20_000, reader_tokens=500_000, writer_teacher="gpt2:layers=2,dim=256,heads=4", writer_rows=16,
                    student_vocabs=(), quick=True)
LM_BATCHES = (4, 32)


def run_bench(config: BenchConfig, work: Path | None = None) -> dict:
    """Measure everything in a scratch folder (removed afterwards unless `work` is given)."""
    scratch = Path(tempfile.mkdtemp(prefix="pipeline-bench-")) if work is None else work
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _measure(config, scratch)
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _measure(config: BenchConfig, scratch: Path) -> dict:
    device = resolve_device(config.device)
    sections = config.only or SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise InputError(f"unknown bench section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    report: dict = {"machine": _machine(device), "config": asdict(config)}
    ratios: dict[str, float] = {}
    if "core" in sections:
        core = _core(config, scratch, device)
        ratios.update(core.pop("ratios"))
        report.update(core)
    if "lm-memory" in sections and config.lm_vocab:
        # 8. cache-teacher's peak memory at a language model's vocabulary, two batch sizes
        lm_memory = report["lm_teacher_memory"] = _lm_teacher_memory(config, scratch)
        small, large = (lm_memory["in_pieces"][f"batch_{b}"]["peak_rss_mb"] for b in LM_BATCHES)
        whole_small, whole_large = (lm_memory["whole_batch"][f"batch_{b}"]["peak_rss_mb"] for b in LM_BATCHES)
        ratios["lm_teacher_memory_8x_batch"] = large / small
        ratios["lm_teacher_memory_8x_batch_whole_logits"] = whole_large / whole_small
    if "reader" in sections:
        # 9. the training reader against a memory map of the same bytes
        report["reader"] = _reader_limit(config, scratch)
        for shape, figures in report["reader"].items():
            ratios[f"reader_vs_memmap_{shape}"] = figures["reader_per_second"] / figures["memmap_per_second"]
            ratios[f"reader_first_epoch_vs_memmap_{shape}"] = figures["reader_first_epoch_per_second"] / figures["memmap_per_second"]
            ratios[f"reader_manifest_checked_vs_unchecked_{shape}"] = (figures["reader_per_second"]
                                                                       / figures["reader_unchecked_per_second"])
    if "lm-student" in sections and config.student_vocabs:
        # 11. train-student's memory and step time at a language model's vocabulary, in pieces and whole
        student = report["lm_student"] = _lm_student(config, scratch)
        for vocab, figures in student.items():
            small, large = (figures[f"seq_{min(config.student_seqs)}_batch_{min(LM_BATCHES)}"],
                            figures[f"seq_{max(config.student_seqs)}_batch_{max(LM_BATCHES)}"])
            # The bare student's own growth from the smallest to the largest batch x length is the
            # floor: taken off the largest run's peak, what is left is what the loss adds as rows grow.
            bare_growth = large["bare_student"]["peak_rss_mb"] - small["bare_student"]["peak_rss_mb"]
            ratios[f"lm_student_bare_memory_largest_vs_smallest_v{vocab}"] = (
                large["bare_student"]["peak_rss_mb"] / small["bare_student"]["peak_rss_mb"])
            for measure in ("train", "train_and_evaluate"):
                small_peak, large_peak = (f["in_pieces"][measure]["peak_rss_mb"] for f in (small, large))
                ratios[f"lm_student_{measure}_memory_largest_vs_smallest_v{vocab}"] = large_peak / small_peak
                ratios[f"lm_student_{measure}_memory_largest_vs_smallest_beyond_bare_v{vocab}"] = (
                    (large_peak - bare_growth) / small_peak)
            steps = [(f["in_pieces"]["seconds_per_step"], f["whole_logits"]["seconds_per_step"])
                     for f in figures.values() if f["whole_logits"]]
            if steps:
                ratios[f"lm_student_step_in_pieces_vs_whole_v{vocab}"] = max(pieces / whole for pieces, whole in steps)
    if "lm-writer" in sections and config.writer_vocab:
        # 10. cache-teacher at a language model's vocabulary against the bare forward
        writer = report["lm_writer"] = _lm_writer(config, scratch, device)
        ratios["lm_cache_vs_forward"] = min(writer["cache_teacher_seconds"]) / min(writer["bare_forward_seconds"])
    targets = {k: t for k, t in TARGETS.items() if k in ratios}
    return {
        **report,
        "ratios": ratios,
        "targets": targets,
        "target_sense": {k: ">=" if k in AT_LEAST else "<=" for k in targets},
        "meets_targets": None if config.quick else {k: (ratios[k] >= t if k in AT_LEAST else ratios[k] <= t) for k, t in targets.items()},
    }


def _core(config: BenchConfig, scratch: Path, device: torch.device) -> dict:
    """Sections 1-7: the teacher pass, student epochs, memory, reads and threads on one workload."""
    dataset = f"synthetic:n={config.samples},test=1000,features={config.features},classes={config.classes},seed=0"
    train = resolve_dataset(dataset).split("train")
    teacher_spec = f"mlp:width={config.teacher_width},depth={config.teacher_depth}"
    student_spec = f"mlp:width={config.student_width},depth=2"
    seed_everything(0)
    teacher = resolve_model(teacher_spec, num_classes=config.classes, input_shape=input_shape(train)).to(device).eval()
    save_weights(teacher, scratch / "teacher.safetensors")

    # 1. the teacher pass: bare forward, then the whole stage, over the same batches; taken
    # TEACHER_PASSES times in turn, keeping each one's fastest (interference only slows down)
    bare_seconds, stage_seconds = [], []
    for _ in range(TEACHER_PASSES):
        bare_seconds.append(bare_forward_seconds(teacher, train, config.batch_size, device))
        caching = cache_teacher.run(
            cache_teacher.CacheTeacherConfig(
                teacher=teacher_spec, teacher_weights=scratch / "teacher.safetensors", dataset=dataset,
                out=scratch / "cache.zarr", temperature=config.temperature, batch_size=config.batch_size,
                device=config.device, overwrite=True,
            ),
            teacher, train,
        )
        stage_seconds.append(caching.seconds)
    bare, cache_seconds = min(bare_seconds), min(stage_seconds)

    # 2-3. student epochs: from the cache, from logits in memory, from hard labels, online KD.
    # After a warm-up run, the three cheap arms take turns for ROUNDS rounds so that drift in
    # the machine's speed falls on all of them alike; each arm's figure is the median of its
    # epochs after the first of each run. Online KD, many times slower, runs once.
    cache = CacheReader(caching.cache)
    sources = {"cache": cache, "memory": InMemorySoftLabels(cache), "hard_labels": None}
    _student_epochs(config, dataset, train, student_spec, sources["memory"], scratch / "warm-up", epochs=1)
    epochs: dict[str, list[float]] = {name: [] for name in (*sources, "online")}
    names = list(sources)
    for round_number in range(ROUNDS):
        for name in names[round_number % len(names):] + names[: round_number % len(names)]:  # rotate who goes first
            epochs[name] += _student_epochs(config, dataset, train, student_spec, sources[name], scratch / f"student-{name}")
    epochs["online"] = _student_epochs(config, dataset, train, student_spec, OnlineTeacher(teacher, train, config.temperature, device),
                                       scratch / "student-online")
    epoch_seconds = {name: statistics.median(values) for name, values in epochs.items()}

    # 4. peak memory of train-student processes, base cache vs a 10x larger one
    memory = {scale: _peak_rss_of_student(config, scratch, scale) for scale in (1, 10)}

    # 5. read speed in shuffled-chunk order vs file order (after one pass to warm the page cache)
    big = CacheReader(scratch / "memory-10x.zarr")
    _read_all(big, shuffle=False)
    rows_per_second = {order: big.num_samples / _read_all(big, shuffle=order == "shuffled") for order in ("shuffled", "sequential")}

    # 6. what the checksums cost the reader: the same cache with and without them, taken in turn
    without_checksums(big.path, scratch / "memory-10x-no-crc32c.zarr")
    plain = CacheReader(scratch / "memory-10x-no-crc32c.zarr")
    _read_all(plain, shuffle=False)
    checked_seconds, plain_seconds = [], []
    for _ in range(READ_TURNS):
        checked_seconds.append(_read_all(big, shuffle=False))
        plain_seconds.append(_read_all(plain, shuffle=False))
    rows_per_second["sequential_checksummed"] = big.num_samples / min(checked_seconds)
    rows_per_second["sequential_without_checksums"] = big.num_samples / min(plain_seconds)

    # 7. train-student's thread choice against one thread and every core, quiet and under load
    threads = _thread_choices(config, dataset, train, student_spec, cache, scratch)

    s = epoch_seconds
    # A run costs its epochs; fixed start-up costs (imports, first allocations) are left out
    # because they are the same whichever way the soft labels arrive.
    online_saving = config.epochs * (s["online"] - s["cache"])
    ratios = {
        "cache_vs_forward": cache_seconds / bare,
        "student_cache_vs_memory": s["cache"] / s["memory"],
        "student_cache_vs_hard_labels": s["cache"] / s["hard_labels"],
        "student_cache_vs_online_kd": s["cache"] / s["online"],
        "memory_10x_vs_1x": memory[10]["peak_rss_mb"] / memory[1]["peak_rss_mb"],
        "shuffled_vs_sequential_reads": rows_per_second["shuffled"] / rows_per_second["sequential"],
        "checksummed_vs_plain_reads": rows_per_second["sequential_checksummed"] / rows_per_second["sequential_without_checksums"],
        "loaded_threads_chosen_vs_one": threads["loaded_chosen"] / threads["loaded_one_thread"],
        "loaded_threads_every_core_vs_one": threads["loaded_every_core"] / threads["loaded_one_thread"],
        "quiet_threads_chosen_vs_every_core": threads["quiet_chosen"] / threads["quiet_every_core"],
    }
    return {
        "seconds": {"bare_teacher_forward": bare_seconds, "cache_teacher": stage_seconds,
                    "cache_overhead_per_row_us": 1e6 * (cache_seconds - bare) / config.samples,
                    **{f"student_epoch_{k}": v for k, v in s.items()},
                    **{f"student_epoch_threads_{k}": v for k, v in threads.items()}},
        "student_epochs_measured": {k: [round(x, 4) for x in v] for k, v in epochs.items()},
        "cache": {"bytes_on_disk": caching.bytes_on_disk, "bytes_per_row": caching.bytes_on_disk / config.samples,
                  **{f"rows_per_second_{order}": value for order, value in rows_per_second.items()}},
        "memory": {f"{scale}x": m for scale, m in memory.items()},
        "parameters": {"teacher": count_parameters(teacher),
                       "student": count_parameters(resolve_model(student_spec, num_classes=config.classes, input_shape=input_shape(train)))},
        "ratios": ratios,
        "break_even_student_runs": math.ceil(cache_seconds / online_saving) if online_saving > 0 else None,
    }


def bare_forward_seconds(teacher: torch.nn.Module, split: Split, batch_size: int, device: torch.device) -> float:
    """The plain inference loop cache-teacher replaces: over the same batches, take the
    inputs, run the teacher, keep nothing."""
    bounds = [(b, min(b + batch_size, len(split))) for b in range(0, len(split), batch_size)]
    with torch.inference_mode():
        teacher(split.inputs(np.arange(*bounds[0])).to(device))  # warm-up: first-call allocations
    started = time.perf_counter()
    with torch.inference_mode(), one_blas_thread_beside_torch():
        for start, stop in bounds:
            teacher(split.inputs(np.arange(start, stop)).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _student_epochs(config: BenchConfig, dataset: str, train: Split, student_spec: str, source, out: Path,
                    epochs: int | None = None) -> list[float]:
    """Seconds of each epoch but the first of one train-student run (all of them for one epoch).
    `source` is the soft-label source (None: hard labels only)."""
    run_config = train_student.TrainConfig(
        model=student_spec, dataset=dataset, out=out, cache=None if source is None else out.parent / "cache.zarr",
        eval_split=None, epochs=epochs or config.epochs, batch_size=config.batch_size, device=config.device,
        overwrite=True, checkpoint_every=0,
    )
    seed_everything(0)
    student = resolve_model(student_spec, num_classes=config.classes, input_shape=input_shape(train))
    result = train_student.run(run_config, student, train, None, soft_labels=source)
    seconds = [json.loads(line)["seconds"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return seconds[1:] if len(seconds) > 1 else seconds


class InMemorySoftLabels:
    """The cache's rows held in memory as arrays: KD training with the teacher's logits
    already a tensor, the limit that reading the cache approaches."""

    def __init__(self, cache: CacheReader):
        self.attrs, self.temperature, self.num_classes, self.labelled = cache.attrs, cache.temperature, cache.num_classes, cache.labelled
        self.layout, self.soft_arrays, self.check_split = cache.layout, cache.soft_arrays, cache.check_split
        self._rows = {name: array[:] for name, array in cache.arrays.items()}

    def batches(self, batch_size: int, *, seed: int, epoch: int, names: tuple[str, ...] | None = None, **_) -> Iterator[Rows]:
        order = np.random.default_rng([seed, epoch]).permutation(len(self._rows["index"]))
        wanted = {k: v for k, v in self._rows.items() if names is None or k in names}
        for start, stop in batch_bounds(len(order), batch_size):
            yield {k: v[order[start:stop]] for k, v in wanted.items()}


def _peak_rss_of_student(config: BenchConfig, scratch: Path, scale: int) -> dict:
    """Write a cache of scale x samples with a cheap (linear) teacher, then train one epoch
    from it in a fresh process and read that process's peak resident memory."""
    samples = config.samples * scale
    dataset = f"synthetic:n={samples},test=1000,features={config.features},classes={config.classes},seed=0"
    train = resolve_dataset(dataset).split("train")
    cheap = resolve_model("linear", num_classes=config.classes, input_shape=input_shape(train))
    cache = cache_teacher.run(
        cache_teacher.CacheTeacherConfig(teacher="linear", dataset=dataset, out=scratch / f"memory-{scale}x.zarr",
                                         temperature=config.temperature, batch_size=1024, device=config.device),
        cheap, train,
    ).cache
    run = _student_process(config, cache, scratch / f"memory-run-{scale}x", epochs=1)
    return {"cache_rows": samples, "cache_bytes": disk_usage(cache), "peak_rss_mb": run["peak_rss_mb"], "seconds": run["seconds"]}


def _student_process(config: BenchConfig, cache: Path, out: Path, epochs: int) -> dict:
    """train-student from `cache` in a fresh process: its peak resident memory and its seconds."""
    command = [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache), "--student",
               f"mlp:width={config.student_width},depth=2", "--epochs", str(epochs), "--batch-size", str(config.batch_size),
               "--out", str(out), "--device", config.device, "--checkpoint-every", "0", "--overwrite", "--json"]
    return _process_usage(command, out.with_name(out.name + ".log"), "student")


def _process_usage(command: list[str], log_path: Path, what: str) -> dict:
    """Run `command` in a fresh process: its peak resident memory and its seconds."""
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it returns the child's rusage
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = log_path.read_text().strip().splitlines()[-1:]
        raise PipelineError(f"the benchmark's {what} process failed: {last}")
    # ru_maxrss is in kilobytes on Linux
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - started}


def _lm_teacher_memory(config: BenchConfig, scratch: Path) -> dict:
    """Peak resident memory of `pipeline cache-teacher` processes caching a one-layer GPT-2 (a
    save_pretrained folder, random weights: only sizes matter) over `lm_vocab` classes at top-32,
    on real text in rows of `lm_seq` bytes, at each of LM_BATCHES; with its logits in pieces along
    the positions (as cache-teacher computes them for a causal LM) and whole per batch."""
    from pipeline.hf import transformers

    library = transformers("the benchmark's language-model teacher")
    folder = scratch / f"gpt2-{config.lm_vocab}"
    gpt2 = library.GPT2Config(vocab_size=config.lm_vocab, n_positions=config.lm_seq, n_embd=64, n_layer=1, n_head=2)
    seed_everything(0)
    library.GPT2LMHeadModel(gpt2).save_pretrained(folder)
    whole = scratch / "whole_batch_teacher.py"  # the same model, without hidden_and_head: its logits in one piece
    whole.write_text(f"from pipeline.hf import HFCausalLM, build_from_folder\n\n"
                     f"def build(num_classes):\n    return HFCausalLM(build_from_folder({str(folder)!r}, num_classes).model)\n")
    rows = 2 * max(LM_BATCHES)
    dataset = f"stdlib-bytes:seq={config.lm_seq},train={rows * config.lm_seq + 1},test=0"
    report: dict = {"vocab": config.lm_vocab, "seq": config.lm_seq}
    for arm, teacher in (("in_pieces", f"hf:{folder}"), ("whole_batch", f"{whole}:build")):
        report[arm] = {}
        for batch in LM_BATCHES:
            out = scratch / f"lm-{arm}-{batch}.zarr"
            usage = _process_usage(
                [sys.executable, "-m", "pipeline", "cache-teacher", "--teacher", teacher, "--dataset", dataset, "--format",
                 "topk", "--top-k", "32", "--batch-size", str(batch), "--chunk-rows", str(max(LM_BATCHES)), "--device",
                 "cpu", "--out", str(out), "--overwrite"], out.with_suffix(".log"), "cache-teacher")
            report[arm][f"batch_{batch}"] = {**usage, "logits_mb_per_batch": batch * config.lm_seq * config.lm_vocab * 4 / 2**20}
    return report


def _lm_student(config: BenchConfig, scratch: Path) -> dict:
    """Section 11: for each vocabulary and row length, a top-32 token cache of a one-layer GPT-2
    (random weights: only sizes matter) over 2 x the largest batch of rows of real text, then
    train-student processes at each batch, in pieces and whole, each training one epoch and then
    evaluating held-out rows at the same batch: peak resident memory during the steps and in all,
    and seconds per step; beside them the bare student's peak (`bare_student_steps`)."""
    from pipeline.hf import transformers

    library = transformers("the benchmark's language-model student")
    rows = 2 * max(LM_BATCHES)
    report: dict = {}
    for vocab in config.student_vocabs:
        report[vocab] = {}
        for seq in config.student_seqs:
            folder = scratch / f"student-teacher-{vocab}-{seq}"
            seed_everything(0)
            library.GPT2LMHeadModel(library.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=16, n_layer=1, n_head=2)
                                    ).save_pretrained(folder)
            dataset = f"stdlib-bytes:seq={seq},train={rows * seq + 1},test={rows * seq + 1}"
            cache = scratch / f"student-cache-{vocab}-{seq}.zarr"
            _process_usage([sys.executable, "-m", "pipeline", "cache-teacher", "--teacher", f"hf:{folder}", "--dataset", dataset,
                            "--temperature", "1", "--format", "topk", "--top-k", "32", "--batch-size", str(max(LM_BATCHES)),
                            "--device", "cpu", "--out", str(cache), "--overwrite"], cache.with_suffix(".log"), "cache-teacher")
            for batch in LM_BATCHES:
                whole_gib = batch * seq * vocab * 4 / 2**30
                figures = {"logits_gib_per_batch": whole_gib, "whole_logits": {}}
                figures["bare_student"] = _process_usage(
                    [sys.executable, "-c", "import sys; from pipeline.bench import bare_student_steps; "
                     "bare_student_steps(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))",
                     config.lm_student, str(vocab), str(seq), str(batch), str(rows // batch)],
                    scratch / f"bare-{vocab}-{seq}-{batch}.log", "bare student")
                for arm, flag in (("in_pieces", "--logit-pieces"), ("whole_logits", "--whole-logits")):
                    if arm == "whole_logits" and whole_gib > config.whole_max_gib:
                        figures[arm] = None  # skipped: it would not fit beside the rest
                        continue
                    out = scratch / f"student-{vocab}-{seq}-{batch}-{arm}"
                    usage = _process_usage(
                        [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache), "--student",
                         f"{config.lm_student},vocab={vocab}", "--epochs", "1", "--batch-size", str(batch),
                         "--eval-batch-size", str(batch), flag, "--checkpoint-every", "0", "--device", "cpu",
                         "--out", str(out), "--overwrite", "--json"], out.with_name(out.name + ".log"), "train-student")
                    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
                    memory = json.loads((out / "memory.jsonl").read_text().splitlines()[0])
                    steps_seconds = epoch["seconds"]  # the epoch: its steps and its evaluation
                    figures[arm] = {"train": {"peak_rss_mb": memory["train_peak_rss_mb"]},
                                    "train_and_evaluate": {"peak_rss_mb": usage["peak_rss_mb"]},
                                    "seconds_per_step": steps_seconds / (rows // batch), "process_seconds": usage["seconds"]}
                report[vocab][f"seq_{seq}_batch_{batch}"] = figures
    return report


def bare_student_steps(spec: str, vocab: int, seq: int, batch: int, steps: int) -> None:
    """The limit of section 11, run in a process of its own: `steps` training steps of the student
    `spec` at `vocab` classes on random (batch, seq) tokens, each its forward and backward to its
    last hidden states (`hidden_and_head`, the head left out) and an AdamW step. What any loss
    over the vocabulary needs is on top of this."""
    seed_everything(0)
    student = resolve_model(f"{spec},vocab={vocab}", num_classes=vocab, input_shape=(seq,)).train()
    optimizer = torch.optim.AdamW(student.parameters())
    for _ in range(steps):
        hidden, _ = student.hidden_and_head(torch.randint(0, vocab, (batch, seq)))
        hidden.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _reader_limit(config: BenchConfig, scratch: Path) -> dict:
    """Section 9: rows (dense) or positions (tokens) per second through CacheReader.batches and
    through a memory map of the same bytes, for a dense and a top-k token cache; and through the
    same reader without the chunk manifest's check on each read, to measure what it costs."""
    tokens = config.reader_tokens // config.lm_seq
    layouts = {
        "dense": Layout(kind="dense", num_samples=config.reader_rows, num_classes=config.classes, chunk_rows=1),
        "tokens": Layout(kind="topk", num_samples=tokens, num_classes=config.reader_vocab, chunk_rows=1,
                         options={"top_k": READER_TOP_K}, tokens=config.lm_seq),
    }
    report = {}
    for shape, layout in layouts.items():
        layout = replace(layout, chunk_rows=default_chunk_rows(layout.row_bytes, layout.num_samples))
        path = scratch / f"reader-{shape}.zarr"
        _random_cache(path, layout)
        reader = CacheReader(path)
        names = ("index", *reader.soft_arrays)  # what train-student reads
        mapped = _memory_mapped_copy(reader, names, scratch / f"reader-{shape}-npy")
        batch = config.batch_size if layout.tokens is None else max(1, READER_BATCH_TOKENS // layout.tokens)
        per_row = layout.tokens or 1
        _memmap_epoch(mapped, reader, batch, epoch=0)  # warm the page cache (and the reader's checks) before timing
        _timed_epoch(reader, batch, names, epoch=0)
        unchecked = CacheReader(path)
        for files in unchecked._files.values():  # noqa: SLF001 - the check switched off, only to measure it
            files.seal = None
        _timed_epoch(unchecked, batch, names, epoch=0)
        memmap_seconds, reader_seconds, unchecked_seconds, first_seconds = [], [], [], []
        for turn in range(READ_TURNS):
            memmap_seconds.append(_timed(lambda: _memmap_epoch(mapped, reader, batch, epoch=turn + 1)))
            reader_seconds.append(_timed_epoch(reader, batch, names, epoch=turn + 1))
            unchecked_seconds.append(_timed_epoch(unchecked, batch, names, epoch=turn + 1))
            first_seconds.append(_timed(lambda: _timed_epoch(CacheReader(path), batch, names, epoch=turn + 1)))
        units = layout.num_samples * per_row
        report[shape] = {
            "rows": layout.num_samples, "positions_per_row": per_row, "classes": layout.num_classes, "top_k": layout.options.attributes().get("top_k"),
            "chunk_rows": layout.chunk_rows, "batch_rows": batch, "bytes_read": sum(a.nbytes for a in mapped.values()),
            "memmap_per_second": units / min(memmap_seconds), "reader_per_second": units / min(reader_seconds),
            "reader_first_epoch_per_second": units / min(first_seconds),
            "reader_unchecked_per_second": units / min(unchecked_seconds),
        }
    return report


def _lm_writer(config: BenchConfig, scratch: Path, device: torch.device) -> dict:
    """Section 10: seconds of the bare forward and of cache-teacher (top-32 token cache) for a
    GPT-2-style teacher at `writer_vocab` classes over the same batches of real text."""
    spec = f"{config.writer_teacher},vocab={config.writer_vocab}"
    dataset = f"stdlib-bytes:seq={config.lm_seq},train={config.writer_rows * config.lm_seq + 1},test=0"
    train = resolve_dataset(dataset).split("train")
    seed_everything(0)
    teacher = resolve_model(spec, num_classes=config.writer_vocab, input_shape=input_shape(train)).to(device).eval()
    bare_seconds, stage_seconds = [], []
    for _ in range(TEACHER_PASSES):
        bare_seconds.append(bare_forward_seconds(teacher, train, config.writer_batch, device))
        stage_seconds.append(cache_teacher.run(
            cache_teacher.CacheTeacherConfig(teacher=spec, dataset=dataset, out=scratch / "lm-writer.zarr", format="topk",
                                             kind_options={"top_k": READER_TOP_K}, temperature=1.0, batch_size=config.writer_batch,
                                             device=config.device, overwrite=True),
            teacher, train).seconds)
    return {"teacher": spec, "parameters": count_parameters(teacher), "vocab": config.writer_vocab, "rows": len(train),
            "tokens": len(train) * config.lm_seq, "batch": config.writer_batch, "bare_forward_seconds": bare_seconds,
            "cache_teacher_seconds": stage_seconds}


def _random_cache(path: Path, layout: Layout) -> None:
    """A complete cache of `layout` holding random values of the right types and ranges, written
    chunk by chunk through the project's writer (for measuring reads, which do not depend on the values)."""
    rng = np.random.default_rng(0)
    index = np.arange(layout.num_samples, dtype=np.int64)
    attrs = {"temperature": 1.0, "teachers": [{"spec": "random values (pipeline bench)"}],
             "dataset": {"spec": "none", "split": "train", "fingerprint": {"num_samples": layout.num_samples},
                         "index_sha256": sha256(index)}}
    writer = CacheWriter.create(path, layout, attrs)
    with writer:
        for start, stop in map(layout.grid.rows, range(layout.grid.num_chunks)):
            count = stop - start
            rows = {"index": index[start:stop], "labels": rng.integers(0, layout.num_classes, (count, *layout.label_shape))}
            values = rng.standard_normal((count, *layout.row_shape), dtype=np.float32)
            if layout.kind == "dense":
                rows["logits"] = values.astype(layout.dtype)
            else:  # what the kind's checks accept: distinct classes, descending values, a kept mass below 1
                k = values.shape[-1]
                rows["topk_values"] = -np.sort(-values, axis=-1).astype(layout.dtype)
                first = rng.integers(0, layout.num_classes, (*values.shape[:-1], 1))
                rows["topk_indices"] = ((first + np.arange(k) * (layout.num_classes // k)) % layout.num_classes).astype(
                    layout.arrays()["topk_indices"].dtype)
                rows["logsumexp"] = rows["topk_values"][..., 0].astype(np.float32) + np.log(k) + 3
            if layout.tokens is not None:
                rows["lengths"] = rng.integers(1, layout.tokens + 1, count, dtype=np.int32)
                padding = np.arange(layout.tokens)[None, :] >= rows["lengths"][:, None]
                for name in layout.soft_kind.soft_arrays:
                    rows[name][padding] = 0  # as every encoder leaves padding
            writer.write_rows(start, rows)
    writer.mark_complete({})


def _memory_mapped_copy(reader: CacheReader, names: tuple[str, ...], folder: Path) -> dict[str, np.ndarray]:
    """The arrays `names` of a cache as .npy files, memory-mapped: the same bytes, with nothing to decode or check."""
    folder.mkdir(parents=True, exist_ok=True)
    mapped = {}
    for name in names:
        array = reader.arrays[name]
        copy = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=array.dtype, shape=array.shape)
        for start, stop in map(reader.grid.rows, range(reader.grid.num_chunks)):  # a chunk at a time: bounded memory
            copy[start:stop] = array[start:stop]
        copy.flush()
        del copy
        mapped[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
    return mapped


def _memmap_epoch(mapped: dict[str, np.ndarray], reader: CacheReader, batch: int, epoch: int, buffer_chunks: int = 8) -> None:
    """One epoch from the memory-mapped arrays as CacheReader.batches reads the cache: the same
    shuffled chunk order, buffers of `buffer_chunks` chunks shuffled inside, batches gathered."""
    rng = np.random.default_rng([0, epoch, 1])
    runs = reader.runs(0, epoch)
    for first in range(0, len(runs), buffer_chunks):
        parts = [slice(reader.grid.rows(f)[0], reader.grid.rows(l)[1]) for f, l in runs[first : first + buffer_chunks]]
        rows = {name: np.concatenate([values[part] for part in parts]) for name, values in mapped.items()}
        order = rng.permutation(len(rows["index"]))
        for start, stop in batch_bounds(len(order), batch):
            {name: values[order[start:stop]] for name, values in rows.items()}  # each batch gathered (and dropped) as the reader's


def _timed_epoch(reader: CacheReader, batch: int, names: tuple[str, ...], epoch: int) -> float:
    return _timed(lambda: [None for _ in reader.batches(batch, seed=0, epoch=epoch, names=names)])


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _thread_choices(config: BenchConfig, dataset: str, train: Split, student_spec: str, cache: CacheReader,
                    scratch: Path) -> dict[str, float]:
    """Median train-student epoch seconds from the cache at several torch CPU thread counts: the
    tool's own choice (stages.runtime.training_threads), one thread, and a thread on every core
    (what torch takes by default), on the machine as it is and beside two CPU-burning processes;
    taken in turn, THREAD_TURNS times (once with --quick)."""
    cores = len(os.sched_getaffinity(0))
    counts = {"chosen": training_threads(torch.device("cpu")) or torch.get_num_threads(), "one_thread": 1, "every_core": cores}
    seconds: dict[str, list[float]] = {}
    for load in ("quiet", "loaded"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if load == "loaded" else 0)]
        try:
            for _ in range(1 if config.quick else THREAD_TURNS):
                for name, count in counts.items():
                    with _user_threads(count):
                        seconds.setdefault(f"{load}_{name}", []).extend(
                            _student_epochs(config, dataset, train, student_spec, cache, scratch / f"threads-{load}-{name}"))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    return {name: statistics.median(values) for name, values in seconds.items()}


@contextlib.contextmanager
def _user_threads(count: int) -> Iterator[None]:
    """Train with `count` torch threads, as a user who sets OMP_NUM_THREADS would (the training
    loop then leaves torch's thread count as it finds it)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(count)
    try:
        with torch_threads(count):
            yield
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def without_checksums(source: Path, target: Path) -> None:
    """Copy the cache at `source` to `target` with the same arrays, chunks, shards and other codecs
    but no crc32c checksums on the chunks: a cache as schema 2 stored it."""
    original = zarr.open_group(str(source), mode="r")
    # Schema 2 had no checksums, so neither a chunk manifest (which binds them) nor the cache id it uses.
    attributes = {**{k: v for k, v in original.attrs.items() if k != "cache_id"}, "schema_version": 2}
    copy = zarr.open_group(str(target), mode="w", attributes=attributes)
    for name in sorted(set(original.array_keys()) - {"chunk_manifest"}):
        array = original[name]
        copied = copy.create_array(name, shape=array.shape, chunks=array.chunks, shards=array.shards, dtype=array.dtype,
                                   fill_value=array.fill_value,
                                   compressors=[c for c in array.compressors if not isinstance(c, Crc32cCodec)] or None,
                                   dimension_names=array.metadata.dimension_names)
        # A shard (or chunk) at a time: the cache may not fit in memory, and a part of a shard would be rewritten.
        step = (array.shards or array.chunks)[0]
        for start in range(0, array.shape[0], step):
            copied[start:start + step] = array[start:start + step]


def _read_all(cache: CacheReader, shuffle: bool) -> float:
    started = time.perf_counter()
    for _ in cache.batches(4096, seed=0, epoch=0, shuffle=shuffle):
        pass
    return time.perf_counter() - started


def _machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def with_sizes(config: BenchConfig, **sizes) -> BenchConfig:
    """`config` with the sizes given (None leaves a size as it is)."""
    return replace(config, **{k: v for k, v in sizes.items() if v is not None})
