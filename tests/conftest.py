"""Shared fixtures: a tiny real dataset, a teacher with saved weights, and a cache of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from pipeline.jobs import run_training
from stages import cache_teacher, train_student

# 600 training rows in chunks of 64 (the last one short), 4 classes, 8 features; sharded, in
# shards of two chunks (the last one short).
DATASET = "synthetic:n=600,test=200,features=8,classes=4,seed=3"
CHUNK_ROWS = 64
SHARD_ROWS = 2 * CHUNK_ROWS
TEMPERATURE = 3.0


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Keep every default output of the CLI inside the test's own folder."""
    monkeypatch.setattr("pipeline.cli.DATA_ROOT", tmp_path / "data")
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def environment():
    """Each test leaves the environment as it found it: a dask nanny started in this process sets
    OMP_NUM_THREADS=1 there, and every later subprocess would run torch on one thread."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> Path:
    """An mlp-64 teacher trained for a few epochs on the tiny dataset, saved as safetensors."""
    folder = tmp_path_factory.mktemp("teacher")
    config = train_student.TrainConfig(
        model="mlp-64", dataset=DATASET, out=folder / "run", weights_out=folder / "teacher.safetensors",
        alpha=0.0, epochs=8, batch_size=32, seed=7, device="cpu",
    )
    return run_training(config).weights


def tiny_cache(out: Path, teacher_weights: Path, shard_rows: int | None = None) -> Path:
    """The tiny dataset's cache by the mlp-64 teacher at `out` (for fixtures of any scope)."""
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(
        teacher="mlp-64", teacher_weights=teacher_weights, dataset=DATASET, out=out,
        temperature=TEMPERATURE, chunk_rows=CHUNK_ROWS, shard_rows=shard_rows, device="cpu",
    )
    return cache_teacher.run(config, teacher, split).cache


@pytest.fixture
def cache_path(tmp_path, teacher_weights) -> Path:
    return tiny_cache(tmp_path / "cache.zarr", teacher_weights)


@pytest.fixture
def sharded_cache_path(tmp_path, teacher_weights) -> Path:
    """The cache of `cache_path`, in shards of SHARD_ROWS rows."""
    return tiny_cache(tmp_path / "sharded.zarr", teacher_weights, shard_rows=SHARD_ROWS)


def cache_with_cli(out, teacher_weights, *extra, teacher: str = "mlp-64") -> dict:
    """`pipeline cache-teacher` of the tiny dataset at `out` (a folder or a URL), as the scale-out
    and storage tests run it: chunks of CHUNK_ROWS, batches of 32, on the CPU."""
    return invoke_json("cache-teacher", "--teacher", teacher, "--teacher-weights", teacher_weights, "--dataset", DATASET,
                       "--temperature", TEMPERATURE, "--chunk-rows", CHUNK_ROWS, "--batch-size", 32, "--device", "cpu",
                       "--out", out, *extra)


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def invoke_json(*args: str) -> dict:
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def assert_same_cache(a, b, storage_options: dict | None = None) -> None:
    """Two caches hold the same arrays and the same results; their teachers have the same weights
    (whether a spec named a built-in or a factory building it). `storage_options` for URLs."""
    first, second = (zarr.open_group(str(c), mode="r", storage_options=storage_options if "://" in str(c) else None)
                     for c in (a, b))
    assert sorted(first.array_keys()) == sorted(second.array_keys())
    for name in set(first.array_keys()) - {"chunk_manifest"}:  # each binds its own cache's random id
        a, b = first[name][:], second[name][:]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.tobytes() == b.tobytes(), f"{name}: {int((a != b).sum())} values differ"  # bit for bit, NaNs and -0.0 too
    for key in ("complete", "num_samples", "dataset", "teacher_metrics"):
        assert first.attrs[key] == second.attrs[key], key
    assert [t["weights_sha256"] for t in first.attrs["teachers"]] == [t["weights_sha256"] for t in second.attrs["teachers"]]


@pytest.fixture
def cpu_hogs():
    """Two CPU-burning processes beside the test, as on a loaded shared machine: what the test
    asserts must not depend on the machine being quiet."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def dying_model(folder: Path, *, where: str, after_forwards: int = 3, spec: str = "mlp-64",
                input_shape: tuple[int, ...] = (8,)) -> tuple[str, Path, Path]:
    """A factory spec building model `spec` with a hook that SIGKILLs its process on its
    `after_forwards`-th forward pass, once. `where` says which process counts its forwards:
    "dask worker" (a dask worker process), "process" (any other) or "rank 1" (the torchrun
    process of RANK 1, counting training forwards only). Returns (spec, the file that marks
    the kill, a file listing the pid of every process that built the model)."""
    marker, loads = folder / "killed-once", folder / "loads.txt"
    factory = folder / "dying_model.py"
    factory.write_text(textwrap.dedent(f"""
        import os, signal, time
        from pipeline.models import resolve_model

        def on_dask_worker():
            try:
                from distributed import get_worker
                get_worker()
                return True
            except (ImportError, ValueError):
                return False

        def counts(module):
            if {where!r} == "rank 1":
                return os.environ.get("RANK") == "1" and module.training
            return on_dask_worker() == ({where!r} == "dask worker")

        def build(num_classes):
            with open({str(loads)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            model = resolve_model({spec!r}, num_classes=num_classes, input_shape={tuple(input_shape)!r})
            calls = []

            def maybe_die(module, inputs):
                if not counts(module):
                    return
                calls.append(1)
                if len(calls) == {after_forwards} and not os.path.exists({str(marker)!r}):
                    open({str(marker)!r}, "w").close()
                    time.sleep(1)  # lets a background writer store what is finished so far
                    os.kill(os.getpid(), signal.SIGKILL)

            model.register_forward_pre_hook(maybe_die)
            return model
    """))
    return f"{factory}:build", marker, loads


# A student slow enough (50 ms a batch) that a test can stop its run part-way, on observable progress.
SLOW_STUDENT = """
    import time
    import torch

    class Slow(torch.nn.Linear):
        def forward(self, x):
            time.sleep(0.05)
            return super().forward(x)

    def build(num_classes):
        return Slow(8, num_classes)
"""
