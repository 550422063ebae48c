"""`pipeline gpu-check`: both stages, the benchmark and torchrun on one device, as one table.

    pipeline gpu-check --device cuda     # the full size: one CUDA GPU, well under 8 minutes
    pipeline gpu-check --device cpu      # the small size: 1-2 minutes on 2 CPU cores
    pipeline gpu-check --device cpu --size test   # every step in seconds, at the teacher's vocabulary (what the tests run)

The steps, each reported whether or not the others fail (the exit code says if any did):

1. cache-teacher of a GPT-2-style language model at a real vocabulary (random weights: only
   speed matters), top-k per token, without autocast and under bf16 autocast: tokens per
   second, and the stage's seconds over the bare teacher forward on the same batches (the
   fastest of `turns` each). On CUDA the stage takes the top-k on the device and copies it into
   pinned host memory asynchronously (stages.cache_teacher): this ratio shows whether that works.
2. `pipeline bench` (quick sizes) on the device, in a process of its own: every ratio it reports.
3. train-student from the first cache: the seconds of its second epoch (the first warms up).
4. the same training under torchrun as one process, which joins an NCCL process group on CUDA
   (gloo on a CPU): it must say so in its log and exit with 0.

Nothing is downloaded: the teacher and student are built from GPT-2 configs, and the text is
the Python standard library's own source (the stdlib-bytes dataset: bytes as tokens, under a
vocabulary of GPT-2's size whose other classes never occur).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from pipeline.bench import bare_forward_seconds
from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_training
from pipeline.models import resolve_model
from stages import cache_teacher
from stages.data import Split, input_shape, sequence_lengths
from stages.errors import InputError, PipelineError
from stages.runtime import autocast, resolve_device, seed_everything
from stages.train_student import TrainConfig


@dataclass(frozen=True)
class CheckSize:
    teacher: str  # a causal language model spec
    student: str  # the same, smaller; its output size is the cache's (vocab 0: the classes the cache has)
    seq: int  # tokens per row
    source_bytes: int  # bytes of the standard library cached: the tokens, less a short last row per file
    batch_size: int  # of both stages; the cache's chunks are one batch each, so the bare forward sees the same batches
    top_k: int
    turns: int  # bare forward and cache-teacher, in turn: the fastest of each is kept
    bench: tuple[str, ...]  # `pipeline bench` options, besides --device and --json


SIZES = {
    # GPT-2's vocabulary and width, four layers, a million tokens in rows of 512: about 1.4e14
    # FLOPs per fp32 teacher pass, seconds on one H200 (reckoned, not measured: no GPU figures yet).
    "full": CheckSize(teacher="gpt2:layers=4,dim=768,heads=12,vocab=50257", student="gpt2:layers=2,dim=256,heads=4",
                      seq=512, source_bytes=1_048_576, batch_size=32, top_k=32, turns=2, bench=("--quick",)),
    # The same steps small enough for 2 CPU cores. The bench at the sizes of its own tests, without
    # its language-model section (four more processes, half a minute here; on CPU whatever the device).
    "small": CheckSize(teacher="gpt2:layers=2,dim=64,heads=2,vocab=4096", student="gpt2:layers=1,dim=32,heads=2",
                       seq=64, source_bytes=32_768, batch_size=16, top_k=8, turns=1,
                       bench=("--quick", "--samples", "600", "--classes", "16", "--features", "16", "--teacher-width", "64",
                              "--student-width", "16", "--batch-size", "64", "--epochs", "2", "--lm-vocab", "0",
                              "--reader-rows", "3000", "--reader-tokens", "20000", "--reader-vocab", "300", "--writer-vocab", "500",
                              "--writer-teacher", "gpt2:layers=1,dim=16,heads=2", "--writer-rows", "6")),
    # Every step's path at the small size's vocabulary, in seconds: what the tests run. The bench
    # runs one section (its own tests run them all); its in-process teacher pass on the device is
    # the section closest to what this check is for.
    "test": CheckSize(teacher="gpt2:layers=1,dim=32,heads=2,vocab=4096", student="gpt2:layers=1,dim=16,heads=2",
                      seq=32, source_bytes=4096, batch_size=16, top_k=8, turns=1,
                      bench=("--quick", "--only", "lm-writer", "--lm-seq", "16", "--writer-vocab", "500",
                             "--writer-teacher", "gpt2:layers=1,dim=16,heads=2", "--writer-rows", "6")),
}
AMPS = {"fp32": "none", "bf16": "bf16"}
STUDENT_EPOCHS = 2  # the first warms up (allocations, kernel choice); the second is measured
TEST_ROWS = 4  # a held-out split for train-student's evaluation under torchrun (the command always evaluates)
# A step in a process of its own that hangs (a rendezvous that never completes) fails the step
# instead of stalling the check.
PROCESS_TIMEOUT_SECONDS = 300

log = logging.getLogger(__name__)


def run_gpu_check(device: str = "auto", size: str | None = None, work: Path | None = None) -> dict:
    """Run every step on `device` at `size` (default: full on CUDA, small on a CPU) in a scratch
    folder, removed afterwards unless `work` is given, and return the report: the machine, the
    sizes and a row per step."""
    torch_device = resolve_device(device)
    size = size or ("full" if torch_device.type == "cuda" else "small")
    if size not in SIZES:
        raise InputError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    scratch = Path(tempfile.mkdtemp(prefix="pipeline-gpu-check-")) if work is None else work
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return {**_check(torch_device, size, scratch), "folder": work}
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _check(device: torch.device, size_name: str, scratch: Path) -> dict:
    size = SIZES[size_name]
    started = time.perf_counter()
    dataset = f"stdlib-bytes:seq={size.seq},train={size.source_bytes},test={TEST_ROWS * size.seq}"
    split = resolve_dataset(dataset).split("train")
    tokens = int(sequence_lengths(split, size.seq).sum())
    caches = {name: scratch / f"cache-{name}.zarr" for name in AMPS}

    @functools.cache
    def teacher() -> torch.nn.Module:  # built by the first step that needs it, so that a failure is that step's
        seed_everything(0)
        return resolve_model(size.teacher, num_classes=split.num_classes, input_shape=input_shape(split)).to(device).eval()

    steps = [_step(f"cache-teacher {name}", device, lambda: _cache_teacher(size, device, teacher(), split, dataset, tokens,
                                                                           amp, caches[name]))
             for name, amp in AMPS.items()]
    steps.append(_step("bench", device, lambda: _bench(size, device, scratch)))
    steps.append(_step("train-student", device, lambda: _train_student(size, device, dataset, caches["fp32"], tokens,
                                                                       scratch / "student")))
    steps.append(_step("torchrun", device, lambda: _torchrun(size, device, caches["fp32"], tokens, scratch / "student-torchrun")))
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "size": size_name,
        "sizes": asdict(size),
        "dataset": dataset,
        "rows": len(split),
        "tokens": tokens,
        "steps": steps,
        "failed": [s["step"] for s in steps if not s["ok"]],
        "seconds": time.perf_counter() - started,
    }


def _step(name: str, device: torch.device, measure: Callable[[], dict]) -> dict:
    """One step's row: what `measure` returns, or its failure."""
    log.info("gpu-check: %s", name)
    started = time.perf_counter()
    blank = {"step": name, "device": str(device), "seconds": None, "throughput": None, "unit": None, "ratio": None,
             "note": "", "ok": True}
    try:
        figures = measure()
    except Exception as exc:  # noqa: BLE001 - whatever fails, the check goes on and reports every step
        message = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("gpu-check: %s failed: %s: %s", name, type(exc).__name__, message)
        failed = {"seconds": time.perf_counter() - started, "note": message if isinstance(exc, PipelineError)
                  else f"{type(exc).__name__}: {message}", "ok": False}
        return {**blank, **failed}
    return {**blank, **figures}


def _cache_teacher(size: CheckSize, device: torch.device, teacher: torch.nn.Module, split: Split, dataset: str, tokens: int,
                   amp: str, out: Path) -> dict:
    """The whole stage against the bare forward under the same autocast, taken in turn."""
    config = cache_teacher.CacheTeacherConfig(
        teacher=size.teacher, dataset=dataset, out=out, temperature=1.0, batch_size=size.batch_size, device=str(device),
        format="topk", kind_options={"top_k": size.top_k}, chunk_rows=size.batch_size, amp=amp, overwrite=True,
    )
    bare, stage = [], []
    for _ in range(size.turns):
        # pipeline.bench's plain inference loop, over the same batches (it tiles the rows by
        # batch_size, as the cache's chunks of one batch each do); autocast reaches into it from here.
        with autocast(amp, device):
            bare.append(bare_forward_seconds(teacher, split, size.batch_size, device))
        stage.append(cache_teacher.run(config, teacher, split).seconds)
    return {"seconds": min(stage), "throughput": tokens / min(stage), "unit": "tokens/s", "ratio": min(stage) / min(bare),
            "note": f"x the bare forward ({min(bare):.2f} s)", "cache": out, "amp": amp}


def _bench(size: CheckSize, device: torch.device, scratch: Path) -> dict:
    """`pipeline bench` in its own process, and every ratio it reports, whatever their names."""
    started = time.perf_counter()
    output = _run([sys.executable, "-m", "pipeline", "bench", *size.bench, "--device", str(device), "--json"], scratch / "bench")
    ratios = json.loads(output)["ratios"]
    return {"seconds": time.perf_counter() - started, "note": f"{len(ratios)} ratios, at quick sizes: no verdicts on their targets",
            "ratios": ratios}


def _train_student(size: CheckSize, device: torch.device, dataset: str, cache: Path, tokens: int, out: Path) -> dict:
    config = TrainConfig(model=size.student, dataset=dataset, out=out, cache=cache, eval_split=None, epochs=STUDENT_EPOCHS,
                         batch_size=size.batch_size, device=str(device), checkpoint_every=0, overwrite=True)
    run_training(config)
    seconds = _epoch_seconds(out)[-1]
    return {"seconds": seconds, "throughput": tokens / seconds, "unit": "tokens/s",
            "note": f"epoch {STUDENT_EPOCHS} of {STUDENT_EPOCHS}"}


def _torchrun(size: CheckSize, device: torch.device, cache: Path, tokens: int, out: Path) -> dict:
    """train-student under torchrun as one process: it must join a process group of the
    device's backend (stages.runtime.process_group logs it) and exit with 0."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = time.perf_counter()
    # --standalone: a rendezvous on a free local port; "cuda" rather than cuda:N: the process takes cuda:LOCAL_RANK
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "pipeline",
          "train-student", "--cache", str(cache), "--student", size.student, "--epochs", "1", "--batch-size",
          str(size.batch_size), "--device", device.type, "--checkpoint-every", "0", "--out", str(out), "--overwrite", "--json"],
         out.with_name(out.name + "-process"))
    joined = re.findall(r"in a (\w+) process group", out.with_name(out.name + "-process.log").read_text())
    if joined != [backend]:
        raise PipelineError(f"torchrun exited with 0 but its process joined {joined or 'no process group'}, not one {backend} group")
    seconds = _epoch_seconds(out)[-1]
    return {"seconds": time.perf_counter() - started, "throughput": tokens / seconds, "unit": "tokens/s",
            "note": f"1 process, {backend}, exit code 0 (throughput: its epoch, {seconds:.2f} s)", "backend": backend,
            "returncode": 0}


def _epoch_seconds(run: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(command: list[str], stem: Path) -> str:
    """Run `command` in a process group of its own, stdout to STEM.out and stderr to STEM.log;
    return its stdout, or raise with its last log line when it fails. If it is still running on
    the way out (a timeout, an interrupted check), the whole group is killed: torchrun's worker
    and the bench's processes go with it."""
    out, log_path = stem.with_name(stem.name + ".out"), stem.with_name(stem.name + ".log")
    with open(out, "w") as stdout, open(log_path, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            code = process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"did not finish in {PROCESS_TIMEOUT_SECONDS} s (log: {log_path})") from None
        finally:
            if process.poll() is None:  # still the group's leader, so its id still names the group
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if code != 0:
        last = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise PipelineError(f"exit code {code}: {last[0]} (log: {log_path})")
    return out.read_text()


def gpu_check_table(report: dict) -> Table:
    cuda = f", CUDA {report['cuda']}" if report["cuda"] else ""
    s = report["sizes"]
    table = Table(title=f"pipeline gpu-check on {report['device']}, torch {report['torch']}{cuda}; size {report['size']}: "
                        f"teacher {s['teacher']}, top-{s['top_k']}, {report['tokens']:,} tokens in rows of {s['seq']}")
    for column in ("step", "device", "seconds", "throughput", "figure", "ok"):
        table.add_column(column, justify="right" if column in ("seconds", "throughput") else "left")
    for row in report["steps"]:
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
        throughput = "" if row["throughput"] is None else f"{row['throughput']:,.0f} {row['unit']}"
        figure = " ".join(part for part in ("" if row["ratio"] is None else f"{row['ratio']:.3f}", row["note"]) if part)
        table.add_row(row["step"], row["device"], seconds, throughput, figure, "yes" if row["ok"] else "FAILED")
        for name, value in (row.get("ratios") or {}).items():
            table.add_row(f"  {name}", row["device"], "", "", f"{value:.3f}", "")
    kept = f"; caches, runs and logs in {report['folder']}" if report["folder"] else ""
    table.caption = f"{report['seconds']:.0f} s in all{kept}"
    return table
