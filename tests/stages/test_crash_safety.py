"""Crash safety: a killed cache-teacher or train-student resumes to the uninterrupted result,
non-finite teacher outputs stop the pass without losing written chunks, and the writer lock."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from stages.storage import FileLock
from tests.conftest import dying_model, invoke, invoke_json

REPO = Path(__file__).resolve().parents[2]
ROWS, CHUNK = 1500, 50  # 30 chunks


@contextlib.contextmanager
def _pipeline(*args) -> Iterator[subprocess.Popen]:
    """`python -m pipeline ARGS` in a child process, killed on the way out whatever happens."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 1800.0) -> None:
    """Poll `condition` until it holds, failing at once if the process ends first. The bound is
    only against a hang: a loaded machine may take many times longer than a quiet one."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.fixture
def slow_teacher(tmp_path) -> tuple[str, Path, Path]:
    """A real (if slow) teacher: a fixed linear map that sleeps 40 ms a batch and logs how
    many rows each forward call saw, so a test can count what was recomputed."""
    log = tmp_path / "forward-rows.log"
    (tmp_path / "slow_teacher.py").write_text(textwrap.dedent(f"""
        import time
        import torch
        from torch import nn

        class Slow(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.linear = nn.Linear(8, num_classes)

            def forward(self, x):
                time.sleep(0.04)
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{len(x)}}\\n")
                return self.linear(x)

        def build(num_classes):
            torch.manual_seed(0)
            return Slow(num_classes)
    """))
    return f"{tmp_path / 'slow_teacher.py'}:build", log, tmp_path


def _rows_seen(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def _cache_args(spec: str, out: Path, shard_rows: int = 0) -> list:
    return ["cache-teacher", "--teacher", spec, "--dataset", f"synthetic:n={ROWS},test=10,features=8,classes=4",
            "--out", out, "--chunk-rows", CHUNK, "--shard-rows", shard_rows, "--batch-size", CHUNK, "--device", "cpu", "--json"]


def _same_cache(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("logits", "index", "labels", "chunk_done"):
        assert np.array_equal(ga[name][:], gb[name][:], equal_nan=False), name  # bitwise for these dtypes
    volatile = {"created_at", "completed_at", "config", "cache_id"}  # each cache its own random id
    assert {k: v for k, v in ga.attrs.items() if k not in volatile} == {k: v for k, v in gb.attrs.items() if k not in volatile}


@pytest.mark.parametrize(("shard_rows", "wait_for"), [(0, 8), (3 * CHUNK, 3)], ids=["unsharded", "sharded"])
def test_killed_cache_teacher_resumes_only_missing_chunks(slow_teacher, shard_rows, wait_for):
    """Killed once `wait_for` write units are done (chunks, or shards of three chunks), resumed
    (the same command, in this process): only the missing units are computed, and the cache
    equals an uninterrupted one."""
    spec, log, tmp = slow_teacher
    unit, units = shard_rows or CHUNK, ROWS // (shard_rows or CHUNK)
    reference = invoke_json(*_cache_args(spec, tmp / "reference.zarr", shard_rows))
    assert reference["chunks_computed"] == reference["chunks_total"] == ROWS // CHUNK
    log.unlink()

    cache = tmp / "killed.zarr"
    with _pipeline(*_cache_args(spec, cache, shard_rows)) as proc:
        _wait_for(lambda: len(list(cache.glob("chunk_done/c/*"))) >= wait_for, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished_before = int(zarr.open_group(str(cache), mode="r")["chunk_done"][:].sum())
    assert wait_for <= finished_before < units
    assert not zarr.open_group(str(cache), mode="r").attrs["complete"]
    log.unlink()

    result = invoke_json(*_cache_args(spec, cache, shard_rows)[:-1])  # the same command again (invoke_json adds its --json)
    missing = units - finished_before
    assert result["chunks_computed"] == missing * unit // CHUNK
    assert _rows_seen(log) == missing * unit + 1  # + the one-row probe of the output shape
    _same_cache(cache, tmp / "reference.zarr")


def test_non_finite_teacher_outputs_stop_the_pass_and_keep_written_chunks(tmp_path):
    x = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    x[:, 0] = np.arange(400)  # the first feature is the sample index, so the teacher can pick rows
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(400) % 2)
    (tmp_path / "t.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class T(nn.Module):
            def forward(self, x):
                bad = {int(i) for i in open(__file__.replace("t.py", "bad.txt")).read().split()}
                out = torch.stack([x[:, 1], x[:, 2]], dim=1)
                for row, index in enumerate(x[:, 0].tolist()):
                    if int(index) in bad:
                        out[row, 0] = float("nan") if int(index) % 2 else float("inf")
                return out
        def build(num_classes):
            return T()
    """))
    (tmp_path / "bad.txt").write_text("237 238")
    args = ["cache-teacher", "--teacher", f"{tmp_path / 't.py'}:build", "--dataset", tmp_path / "d.npz",
            "--out", tmp_path / "c.zarr", "--chunk-rows", "50", "--batch-size", "25"]
    code, _, err = invoke(*args)
    assert code == 1 and err.strip().splitlines() == [
        "error: teacher produced NaN or infinite logits (or logits / T beyond float16's range: try --dtype float32)"
        " for samples [237, 238]; chunks already written are kept"]
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group["chunk_done"][:].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(group["logits"][:200, 0], (x[:200, 1] / 4).astype(np.float16))

    (tmp_path / "bad.txt").write_text("")  # the teacher is fixed: the same command finishes the cache
    result = invoke_json(*args)
    assert result["chunks_computed"] == 4 and result["chunks_total"] == 8


def test_a_locked_cache_refuses_a_second_writer(tmp_path, teacher_weights):
    out = tmp_path / "c.zarr"
    with FileLock(out):
        code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                              "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--out", out)
    assert code == 5 and "being written by another process" in err and f"pid {os.getpid()}" in err
    assert not out.with_name("c.zarr.lock").exists()  # released and removed


@pytest.mark.parametrize(("options", "differs"), [
    (("--temperature", "2"), "temperature: cache has 3.0, this run 2.0"),
    (("--temperature", "3", "--shard-rows", "128"), "shard_rows: cache has None, this run 128"),
])
def test_resuming_with_other_options_is_refused(tmp_path, cache_path, teacher_weights, options, differs):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                          "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--out", cache_path,
                          "--chunk-rows", "64", *options)
    assert code == 2 and differs in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


def _train_args(out: Path) -> list:
    # 188 steps an epoch: killed after its third epoch, the run still has five to go (seconds on a
    # loaded machine), so the kill cannot miss it
    return ["train-student", "--student", "mlp-128", "--dataset", "synthetic:n=12000,test=2000,features=32,classes=10",
            "--epochs", "8", "--batch-size", "64", "--seed", "4", "--out", out, "--device", "cpu", "--json"]


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


def test_killed_train_student_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "reference"
    invoke_json(*_train_args(reference)[:-1])  # uninterrupted, in this process (invoke_json adds the --json)

    run = tmp_path / "killed"
    metrics = run / "metrics.jsonl"
    with _pipeline(*_train_args(run)) as proc:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "summary.json").exists()

    code, _, err = invoke(*_train_args(run)[:-1])  # without --resume: refused, nothing touched
    assert code == 2 and "--resume" in err
    with _pipeline(*_train_args(run), "--resume") as proc:
        out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "resuming" in err
    assert _metrics(run) == _metrics(reference)
    summary, expected = json.loads(out), json.loads((reference / "summary.json").read_text())
    assert (summary["test_errors"], summary["test_nll"]) == (expected["test_errors"], expected["test_nll"])


def test_logits_beyond_float16_are_caught_not_stored_as_infinity(tmp_path):
    """Finite teacher logits of 1e6 overflow float16: refused with a hint, fine as float32."""
    spec = f"{tmp_path / 'loud.py'}:build"
    (tmp_path / "loud.py").write_text(textwrap.dedent("""
        from torch import nn
        class Loud(nn.Module):
            def forward(self, x):
                return x[:, :4] * 1e6
        def build(num_classes):
            return Loud()
    """))
    args = ["cache-teacher", "--teacher", spec, "--dataset", "synthetic:n=300,test=10,features=8,classes=4", "--temperature", "1"]
    code, _, err = invoke(*args, "--out", tmp_path / "f16.zarr")
    assert code == 1 and "try --dtype float32" in err
    result = invoke_json(*args, "--out", tmp_path / "f32.zarr", "--dtype", "float32")
    assert np.isfinite(zarr.open_group(result["cache"], mode="r")["logits"][:]).all()


def test_teacher_pass_under_bf16_autocast(tmp_path, teacher_weights):
    common = ["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
              "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--dtype", "float32"]
    full = invoke_json(*common, "--out", tmp_path / "fp32.zarr")
    half = invoke_json(*common, "--out", tmp_path / "bf16.zarr", "--amp", "bf16")
    a = zarr.open_group(full["cache"], mode="r")
    b = zarr.open_group(half["cache"], mode="r")
    assert b.attrs["teacher_amp"] == "bf16" and a.attrs["teacher_amp"] == "none"
    difference = np.abs(a["logits"][:] - b["logits"][:])
    assert 0 < difference.max() < 0.05 * np.abs(a["logits"][:]).max()  # bf16 keeps ~3 significant digits
    code, _, err = invoke(*common, "--out", tmp_path / "bf16.zarr")  # resuming it without AMP: refused
    assert code == 2 and "teacher_amp: cache has bf16, this run none" in err


def test_a_cache_killed_before_its_arrays_existed_is_made_again(tmp_path, teacher_weights):
    """Attributes written, arrays not yet: the same command starts the cache over."""

    args = ["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
            "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--out", tmp_path / "c.zarr"]
    reference = invoke_json(*args[:-1], tmp_path / "reference.zarr")
    invoke_json(*args)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    for name in ("logits", "index", "labels", "chunk_done"):
        del group[name]
    result = invoke_json(*args)
    assert result["chunks_computed"] == result["chunks_total"] == reference["chunks_total"]
    np.testing.assert_array_equal(zarr.open_group(result["cache"], mode="r")["logits"][:],
                                  zarr.open_group(reference["cache"], mode="r")["logits"][:])


def _steps(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in lines]


def test_a_run_killed_mid_epoch_resumes_from_its_step_checkpoint_to_the_same_weights(tmp_path, cache_path):
    """An LLM-style run by steps (warmup, accumulation, clipping, a checkpoint every 10 steps; 4
    micro-batches a step, 50 an epoch: every checkpoint falls mid-epoch) is SIGKILLed at
    a random forward pass after its first step checkpoint, and resumed: it reads the epoch's
    consumed batches again, drops them, and ends with the uninterrupted run's (made in this
    process) weights, bit for bit, and the same step and epoch records. The student has dropout:
    its draws resume too."""
    (tmp_path / "dropout_mlp.py").write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes):
            return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, num_classes))
    """))
    kill_at = random.Random().randint(50, 200)  # forwards: after step 10's checkpoint, before step 60
    student, marker, _ = dying_model(tmp_path, where="process", after_forwards=kill_at, spec=f"{tmp_path / 'dropout_mlp.py'}:build")
    args = ["train-student", "--cache", cache_path, "--batch-size", "12", "--max-steps", "60",
            "--warmup-steps", "6", "--accumulate", "4", "--max-grad-norm", "1", "--checkpoint-every-steps", "10", "--checkpoint-every", "0",
            "--log-every-steps", "1", "--seed", "5", "--device", "cpu", "--json"]
    run, reference = tmp_path / "killed", tmp_path / "reference"
    with _pipeline(*args, "--student", student, "--out", run) as proc:
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and marker.exists(), f"kill_at={kill_at}"
    killed_at = _steps(run)[-1]["step"]
    assert 10 <= killed_at < 60 and (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists(), kill_at
    with _pipeline(*args, "--student", student, "--out", run, "--resume") as proc:
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    resumed_at = killed_at // 10 * 10
    position = 4 * (resumed_at % 13)  # 13 steps an epoch, the last of 2 micro-batches
    assert f"at step {resumed_at} of 60 (epoch {resumed_at // 13 + 1}, after {position} of its batches)" in err, (kill_at, err)
    # Uninterrupted, in this process, of the student without the dying hook (the same weights: the
    # hook changes none, and draws no random number); args less its --json, which invoke_json adds.
    invoke_json(*args[:-1], "--student", f"{tmp_path / 'dropout_mlp.py'}:build", "--out", reference)

    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes(), f"kill_at={kill_at}"
    assert _steps(run) == _steps(reference) and [s["step"] for s in _steps(run)] == list(range(1, 61))
    assert _metrics(run) == _metrics(reference) and len(_metrics(run)) == 5  # 13 steps an epoch
