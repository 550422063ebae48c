"""Stage one's determinism by construction: every row meets the teacher in the same batch, with
the same thread count, whether the pass is whole, resumed after a kill at any point, resumed
after losing any set of chunks, or spread over dask workers; and the cache is then equal to an
uninterrupted one in every byte of every array. Each test runs beside two CPU-burning processes.

Chunks of 1,021 rows are not a multiple of the batch of 256, so a batch that crossed a chunk
boundary, or that started where a resume happened to start, would show up here as a batch the
uninterrupted pass never ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.models import resolve_model
from stages.cache_teacher import chunk_batches
from stages.cache import ChunkGrid
from stages.weights import save_weights
from tests.conftest import assert_same_cache, invoke, invoke_json

REPO = Path(__file__).resolve().parents[2]
MLP = "mlp:width=1024,depth=3"
DATASET = "synthetic:n=6000,test=10,features=256,classes=100,seed=5"
CHUNK, BATCH = 1021, 256  # 6 chunks (the last 895 rows), 4 batches each


def recording_teacher(folder: Path, *, spec: str = MLP, input_shape: tuple[int, ...] = (256,), kill_at: int = 0) -> tuple[str, Path]:
    """A factory spec building `spec` with a hook that appends every batch it is given to a log,
    as "threads rows digest-of-inputs" (one-row output-shape probes excepted), and with
    `kill_at` > 0, SIGKILLs its process instead of running its kill_at-th batch, once."""
    log, marker = folder / "batches.log", folder / "killed"
    (folder / "recording_teacher.py").write_text(textwrap.dedent(f"""
        import hashlib, os, signal
        import torch
        from pipeline.models import resolve_model

        def build(num_classes):
            model = resolve_model({spec!r}, num_classes=num_classes, input_shape={tuple(input_shape)!r})
            seen = []

            def record(module, inputs):
                (x,) = inputs
                if len(x) == 1:
                    return
                seen.append(1)
                if len(seen) == {kill_at} and not os.path.exists({str(marker)!r}):
                    open({str(marker)!r}, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                digest = hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{torch.get_num_threads()}} {{len(x)}} {{digest}}\\n")

            model.register_forward_pre_hook(record)
            return model
    """))
    return f"{folder / 'recording_teacher.py'}:build", log


def _batches(log: Path) -> Counter:
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


@pytest.fixture(scope="module")
def mlp_weights(tmp_path_factory) -> Path:
    """Fixed weights for the 3-layer, 1024-wide MLP teacher of the issue's campaign."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    torch.manual_seed(0)
    save_weights(resolve_model(MLP, num_classes=100, input_shape=(256,)), path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mlp_weights) -> tuple[Path, Counter, str, Path]:
    """The whole pass, every batch it ran, and its teacher's spec and batch log."""
    folder = tmp_path_factory.mktemp("whole")
    spec, log = recording_teacher(folder)
    invoke_json(*_args(spec, mlp_weights, folder / "whole.zarr"))
    return folder / "whole.zarr", _batches(log), spec, log


def _args(spec: str, weights: Path, out: Path, dataset: str = DATASET, chunk: int = CHUNK, batch: int = BATCH) -> list:
    return ["cache-teacher", "--teacher", spec, "--teacher-weights", weights, "--dataset", dataset, "--temperature", "2",
            "--chunk-rows", chunk, "--batch-size", batch, "--device", "cpu", "--out", out]


def test_chunk_batches_tile_each_chunk_from_its_first_row():
    grid = ChunkGrid(num_samples=6000, chunk_rows=CHUNK)
    assert chunk_batches(grid, 1, BATCH) == [(1021, 1277), (1277, 1533), (1533, 1789), (1789, 2042)]
    assert chunk_batches(grid, 5, BATCH)[-1] == (5873, 6000)
    covered = [r for c in range(grid.num_chunks) for start, stop in chunk_batches(grid, c, BATCH) for r in range(start, stop)]
    assert covered == list(range(6000))


def test_the_whole_pass_records_what_its_bytes_depend_on(uninterrupted):
    whole, batches, _, _ = uninterrupted
    determinism = zarr.open_group(str(whole), mode="r").attrs["determinism"]
    assert determinism["batch_size"] == BATCH and determinism["torch"] == torch.__version__
    assert determinism["threads"] == torch.get_num_threads()
    assert sum(batches.values()) == 6 * 4 and {line.split()[0] for line in batches} == {str(determinism["threads"])}


def test_a_cache_killed_at_random_points_resumes_to_the_same_bytes(tmp_path, mlp_weights, uninterrupted, cpu_hogs):
    """SIGKILL at three random batches of the pass (whatever the writer thread had not stored is
    lost), then the same command: every array equals the uninterrupted cache, bit for bit, and
    the resumed run ran only batches the uninterrupted pass ran."""
    whole, expected, _, _ = uninterrupted
    for kill_at in np.random.default_rng(20).choice(np.arange(2, 24), size=3, replace=False).tolist():
        folder = tmp_path / f"kill-{kill_at}"
        folder.mkdir()
        spec, log = recording_teacher(folder, kill_at=kill_at)
        args = [str(a) for a in _args(spec, mlp_weights, folder / "c.zarr")]
        killed = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert killed.returncode == -9, killed.stderr
        assert not zarr.open_group(str(folder / "c.zarr"), mode="r").attrs["complete"]
        log.unlink(missing_ok=True)
        resumed = invoke_json(*args)
        assert 0 < resumed["chunks_computed"] <= 6
        assert set(_batches(log)) <= set(expected), f"kill at batch {kill_at}: the resume ran batches the whole pass did not"
        assert_same_cache(whole, folder / "c.zarr")


def test_a_cache_that_lost_an_arbitrary_set_of_chunks_resumes_to_the_same_bytes(tmp_path, mlp_weights, uninterrupted,
                                                                                  cpu_hogs):
    whole, expected, spec, log = uninterrupted  # resumed with the very command that made it
    rng = np.random.default_rng(7)
    for trial in range(3):
        copy = tmp_path / f"lost-{trial}.zarr"
        shutil.copytree(whole, copy)
        group = zarr.open_group(str(copy), mode="r+")
        lost = sorted(rng.choice(6, size=int(rng.integers(1, 6)), replace=False).tolist())
        for chunk in lost:  # the chunks' files gone, as a pass killed before writing them leaves it
            for name in group.array_keys():
                files = copy / name / "c" / str(chunk)  # a folder for arrays of more than one axis
                if name != "chunk_done":
                    shutil.rmtree(files) if files.is_dir() else files.unlink()
            group["chunk_done"][chunk] = 0
        group.attrs.update({"complete": False, "teacher_metrics": None})
        log.unlink(missing_ok=True)
        resumed = invoke_json(*_args(spec, mlp_weights, copy))
        assert resumed["chunks_computed"] == len(lost)
        ran = _batches(log)
        assert sum(ran.values()) == 4 * len(lost) and set(ran) <= set(expected), f"lost chunks {lost}"
        assert_same_cache(whole, copy)


def test_a_sharded_cache_holds_the_unsharded_caches_bytes_in_a_file_per_shard(tmp_path, mlp_weights, uninterrupted):
    """In shards of two chunks: the teacher ran the batches of the unsharded pass (batches tile
    chunks, not shards), every array equals the unsharded cache's bit for bit, and each array is
    a file per shard."""
    whole, expected, spec, log = uninterrupted
    log.unlink(missing_ok=True)
    sharded = tmp_path / "sharded.zarr"
    result = invoke_json(*_args(spec, mlp_weights, sharded), "--shard-rows", 2 * CHUNK)
    assert (result["chunks_computed"], result["chunks_total"]) == (6, 6)
    assert _batches(log) == expected
    unsharded, group = zarr.open_group(str(whole), mode="r"), zarr.open_group(str(sharded), mode="r")
    assert group.attrs["shard_rows"] == 2 * CHUNK and group["chunk_done"][:].tolist() == [1, 1, 1]
    for name in ("logits", "index", "labels"):
        assert unsharded[name][:].tobytes() == group[name][:].tobytes(), name
    # summed a shard at a time: the mean NLL may differ in its last bits
    metrics, expected_metrics = group.attrs["teacher_metrics"], unsharded.attrs["teacher_metrics"]
    assert metrics == {**expected_metrics, "nll": pytest.approx(expected_metrics["nll"], rel=1e-6)}

    def files(cache: Path) -> int:
        return sum(1 for path in cache.rglob("*") if path.is_file())

    # The group's zarr.json, then for logits, index, labels, chunk_done and chunk_manifest a zarr.json and a file per write unit.
    assert (files(whole), files(sharded)) == (1 + 5 * (1 + 6), 1 + 5 * (1 + 3))


def test_resuming_with_another_batch_size_is_refused(tmp_path, mlp_weights, uninterrupted):
    whole, _, spec, _ = uninterrupted
    copy = tmp_path / "c.zarr"
    shutil.copytree(whole, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["chunk_done"][2] = 0
    group.attrs["complete"] = False
    code, _, err = invoke(*_args(spec, mlp_weights, copy, batch=128))
    assert code == 2 and "batch size 256" in err.strip().splitlines()[-1]


def test_a_cnn_cache_on_two_dask_workers_equals_the_single_process_cache(tmp_path, cpu_hogs):
    """A convolutional teacher, cached in one process and on a local cluster of two worker
    processes (whose environment asks for one thread): the same batches at the same thread count,
    and every array equal bit for bit. The images: 1,500 of MNIST's shape, random (each process
    reads them from a file at once, where loading mnist-5k took seconds a process), in 5 chunks
    of 307 rows (the last 272), batches of 100."""
    pytest.importorskip("distributed")
    omp_before = os.environ.get("OMP_NUM_THREADS")
    images = np.random.default_rng(3).random((1500, 1, 28, 28), dtype=np.float32)
    np.savez(tmp_path / "images.npz", x_train=images, y_train=np.arange(1500) % 10)
    weights = tmp_path / "cnn.safetensors"
    torch.manual_seed(0)
    save_weights(resolve_model("cnn", num_classes=10, input_shape=(1, 28, 28)), weights)
    runs = {}
    for name, extra in (("single", ()), ("spread", ("--workers", "2"))):
        folder = tmp_path / name
        folder.mkdir()
        spec, log = recording_teacher(folder, spec="cnn", input_shape=(1, 28, 28))
        invoke_json(*_args(spec, weights, folder / "c.zarr", dataset=str(tmp_path / "images.npz"), chunk=307, batch=100), *extra)
        runs[name] = (folder / "c.zarr", _batches(log))
    assert runs["spread"][1] == runs["single"][1]
    assert_same_cache(runs["single"][0], runs["spread"][0])
    # The local cluster's nannies set OMP_NUM_THREADS=1 here to start their workers; left set, it
    # would run every process this one starts later on one thread.
    assert os.environ.get("OMP_NUM_THREADS") == omp_before
