"""Stage two under torchrun: two real processes on the gloo backend, compared with one process
training on the same global batch. One uninterrupted two-process run (the module's `ddp_run`)
serves both as the run compared with one process and as the reference a killed run must resume to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import DATASET, dying_model, invoke_json, tiny_cache

REPO = Path(__file__).resolve().parents[2]
OPTIONS = ("--epochs", "6", "--batch-size", "64", "--lr", "0.01", "--seed", "3", "--device", "cpu")


def _torchrun(*args, check: bool = True) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free local port, so tests never collide on one.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pipeline", "train-student", *map(str, args), "--json"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, teacher_weights) -> Path:
    """The tiny dataset's cache (conftest's `cache_path`), made once for the module."""
    return tiny_cache(tmp_path_factory.mktemp("ddp-cache") / "cache.zarr", teacher_weights)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_path) -> tuple[subprocess.CompletedProcess, Path]:
    """An uninterrupted two-process run of mlp:width=32 with OPTIONS: torchrun's result and the run folder."""
    out = tmp_path_factory.mktemp("ddp-run") / "ddp"
    return _torchrun("--cache", cache_path, "--student", "mlp:width=32", *OPTIONS, "--out", out), out


def test_two_gloo_processes_train_as_well_as_one_on_the_same_global_batch(tmp_path, cache_path, ddp_run):
    proc, ddp = ddp_run
    reported = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reported) == 1, "rank 0 alone reports"
    single = invoke_json("train-student", "--cache", cache_path, "--student", "mlp:width=32", *OPTIONS, "--out", tmp_path / "one")

    epochs = _epochs(ddp)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6], "one metrics line per epoch, from rank 0 alone"
    losses = [e["train_loss"] for e in epochs]
    assert losses[-1] < 0.8 * losses[0]
    # The processes split each global batch, so a step sees other rows than the single process's
    # step: equal up to that noise (the test split has 200 samples; 0.05 is 10 of them).
    assert abs(reported[0]["test_accuracy"] - single["test_accuracy"]) <= 0.05
    assert reported[0]["test_accuracy"] > 0.6
    assert {p.name for p in ddp.iterdir()} == {p.name for p in (tmp_path / "one").iterdir()}


def test_a_ddp_run_killed_partway_resumes_to_the_same_weights(tmp_path, cache_path, ddp_run):
    """Rank 1 is SIGKILLed in epoch 4 (torchrun then stops rank 0); --resume continues from the
    epoch-3 checkpoint in both processes and ends with the weights of an uninterrupted run
    (`ddp_run`: the same student and options, without the dying hook, which changes no weight)."""
    student, marker, _ = dying_model(tmp_path, where="rank 1", after_forwards=30, spec="mlp:width=32")
    args = ("--cache", cache_path, "--student", student, *OPTIONS)
    killed = _torchrun(*args, "--out", tmp_path / "run", check=False)
    assert killed.returncode != 0 and marker.exists(), killed.stderr[-3000:]
    finished_before_kill = len(_epochs(tmp_path / "run"))
    assert 1 <= finished_before_kill < 6
    _torchrun(*args, "--out", tmp_path / "run", "--resume")
    assert len(_epochs(tmp_path / "run")) == 6
    resumed, whole = load_file(tmp_path / "run/model.safetensors"), load_file(ddp_run[1] / "model.safetensors")
    assert all(np.array_equal(resumed[name], whole[name]) for name in whole)


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, cache_path):
    proc = _torchrun("--cache", cache_path, "--student", "mlp:width=32", "--batch-size", "63", "--out", tmp_path / "r",
                     check=False)
    assert proc.returncode != 0
    assert "error: --batch-size 63 (the global batch) does not divide among 2 processes" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_when_rank_0_refuses_the_run_folder_every_process_stops(tmp_path, cache_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep me")
    proc = _torchrun("--cache", cache_path, "--student", "mlp:width=32", "--out", tmp_path / "r", check=False)
    assert proc.returncode != 0
    assert "already exists; pass --resume" in proc.stderr and "rank 0 stopped with an error" in proc.stderr
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep me"


def test_a_cache_with_fewer_chunks_than_processes_is_refused(tmp_path, teacher_weights):
    one_chunk = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                            "--chunk-rows", 600, "--device", "cpu", "--out", tmp_path / "one-chunk.zarr")
    proc = _torchrun("--cache", one_chunk["cache"], "--student", "mlp:width=32", "--out", tmp_path / "r", check=False)
    assert proc.returncode != 0
    assert "the cache has 1 chunks for 2 processes" in proc.stderr and "smaller --chunk-rows" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_two_processes_accumulating_two_micro_batches_step_as_with_the_whole_batch(tmp_path, cache_path):
    """Under DDP, micro-batches before a step's last skip the all-reduce (no_sync) and the last
    one averages the accumulated gradients over the processes: 2 x 32 rows per process per step
    end where 1 x 64 do, to float tolerance, and the step log (rank 0's, the losses averaged over
    both processes) agrees. Three steps: a process's share of an epoch is 280 or 320 rows, and its
    fourth batch of 64 takes the remainder where batches of 32 make a ninth."""
    common = ("--cache", cache_path, "--student", "mlp:width=32", "--max-steps", "3", "--lr", "0.01", "--seed", "3",
              "--device", "cpu", "--log-every-steps", "1", "--checkpoint-every-steps", "2")
    _torchrun(*common, "--batch-size", "64", "--accumulate", "2", "--out", tmp_path / "accumulated")
    _torchrun(*common, "--batch-size", "128", "--out", tmp_path / "whole")
    a, b = load_file(tmp_path / "accumulated/model.safetensors"), load_file(tmp_path / "whole/model.safetensors")
    assert all(np.allclose(a[name], b[name], atol=1e-6) for name in a)
    steps = [[json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()] for run in ("accumulated", "whole")]
    assert [s["step"] for s in steps[0]] == [1, 2, 3]
    assert np.allclose([s["loss"] for s in steps[0]], [s["loss"] for s in steps[1]], rtol=1e-5)
