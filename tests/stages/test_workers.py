"""DataLoader workers for a map-style dataset: the same rows, in the same order, as without."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import zarr

from pipeline.models import resolve_model
from stages.weights import save_weights
from tests.conftest import invoke_json


def _slow_dataset(tmp_path) -> str:
    (tmp_path / "items.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        class Items(torch.utils.data.Dataset):
            '''Each item computed from its index, as a decoding dataset would be.'''
            def __init__(self, n, offset):
                self.n, self.offset = n, offset
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                rng = np.random.default_rng(self.offset + i)
                label = (self.offset + i) % 3
                return torch.from_numpy(rng.normal(size=6).astype(np.float32) + label), label

        def make(split):
            return {"train": Items(300, 0), "test": Items(90, 10_000)}.get(split)
    """))
    return f"{tmp_path / 'items.py'}:make"


def test_workers_give_the_same_cache_and_the_same_training(tmp_path):
    dataset = _slow_dataset(tmp_path)
    save_weights(resolve_model("mlp-64", num_classes=3, input_shape=(6,)), tmp_path / "t.safetensors")
    common = ["--teacher", "mlp-64", "--teacher-weights", tmp_path / "t.safetensors", "--dataset", dataset,
              "--chunk-rows", "64", "--batch-size", "50"]
    plain = invoke_json("cache-teacher", *common, "--out", tmp_path / "plain.zarr")
    loaded = invoke_json("cache-teacher", *common, "--out", tmp_path / "workers.zarr", "--loader-workers", "2")
    np.testing.assert_array_equal(zarr.open_group(plain["cache"], mode="r")["logits"][:],
                                  zarr.open_group(loaded["cache"], mode="r")["logits"][:])

    # The dataset is the user's code: named here, since a cache never runs the code it records.
    runs = [invoke_json("train-student", "--cache", plain["cache"], "--dataset", dataset, "--student", "mlp-64", "--epochs", "2",
                        "--batch-size", "32", "--out", tmp_path / f"run{w}", "--loader-workers", str(w)) for w in (0, 2)]
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / f"run{w}" / "metrics.jsonl").read_text().splitlines()] for w in (0, 2)]
    assert metrics[0] == metrics[1] and runs[0]["test_errors"] == runs[1]["test_errors"]


def _teacher_that_stalls(tmp_path):
    """A factory spec building the mlp-64 teacher that stalls at its 6th forward on each worker
    while `stall` exists (so that a pass is caught part-way, its first chunks done); it lists the
    pid of every process that builds it."""
    stall, pids = tmp_path / "stall", tmp_path / "pids.txt"
    (tmp_path / "stalling.py").write_text(textwrap.dedent(f"""
        import os, time
        from pipeline.models import resolve_model

        def build(num_classes):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            model = resolve_model("mlp-64", num_classes=num_classes, input_shape=(8,))
            calls = []

            def stall(module, inputs):
                calls.append(1)
                while len(calls) >= 6 and os.path.exists({str(stall)!r}):
                    time.sleep(0.05)

            model.register_forward_pre_hook(stall)
            return model
    """))
    stall.touch()
    return f"{tmp_path / 'stalling.py'}:build", stall, pids


def test_an_interrupt_stops_a_pass_on_dask_workers_promptly_and_it_resumes(tmp_path, teacher_weights):
    """SIGINT to cache-teacher --workers 2 part-way (started with SIGINT ignored, as a script's
    background job is): exit 130 with one line, the worker processes gone, and a re-run (in this
    process: resuming on workers is test_scale_out_caching's) that computes only the chunks the
    interrupted pass did not finish."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE

    teacher, stall, pids = _teacher_that_stalls(tmp_path)
    cache = tmp_path / "c.zarr"
    args = ["cache-teacher", "--teacher", teacher, "--teacher-weights", str(teacher_weights), "--dataset", DATASET,
            "--temperature", str(TEMPERATURE), "--chunk-rows", str(CHUNK_ROWS), "--batch-size", "32", "--device", "cpu",
            "--out", str(cache)]
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--workers", "2"], cwd=Path(__file__).resolve().parents[2],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        while not ((cache / "chunk_done").exists() and zarr.open_array(str(cache / "chunk_done"), mode="r")[:].any()):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)  # polling the cache's progress, not waiting a set time
        done_before = int(zarr.open_array(str(cache / "chunk_done"), mode="r")[:].sum())
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted", err[-3000:]
    workers = [int(pid) for pid in pids.read_text().split()]
    for pid in workers:  # each worker process ended with the pass (ESRCH), none left stalling
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker process {pid} outlived the interrupted pass")
    assert 0 < done_before < 10
    stall.unlink()
    resumed = invoke_json(*args)
    assert resumed["chunks_total"] == 10 and 0 < resumed["chunks_computed"] <= 10 - done_before
    assert zarr.open_group(str(cache), mode="r").attrs["complete"]
