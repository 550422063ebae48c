"""Stage one on dask.distributed: real local clusters of worker processes, compared with a
single-process run of the same teacher over the same data. The tests that only need workers to
write on share one local cluster of two (`cluster`, given by --scheduler); the one that kills a
worker has its own, and the refusal starts one with --workers 2."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import zarr

from tests.conftest import CHUNK_ROWS, DATASET, SHARD_ROWS, assert_same_cache, cache_with_cli, dying_model, invoke

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster() -> tuple[str, ...]:
    """The options of a local cluster of two worker processes of one thread each, as --workers 2
    starts for a pass, started once for the module. Its nannies set OMP_NUM_THREADS=1 and more
    in this process's environment to start the workers: put back at once, as the pipeline does."""
    environment = dict(os.environ)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
            os.environ.clear()
            os.environ.update(environment)
            yield ("--scheduler", local.scheduler_address)
    finally:
        os.environ.clear()
        os.environ.update(environment)


@pytest.mark.parametrize("layout", [(), ("--format", "topk", "--top-k", "2"), ("--shard-rows", SHARD_ROWS)],
                         ids=["dense", "topk", "sharded"])
def test_a_local_cluster_of_two_workers_writes_the_single_process_cache(tmp_path, teacher_weights, layout, cluster):
    """Workers own whole write units: chunks, or shards (of two chunks) of a sharded cache."""
    single = cache_with_cli(tmp_path / "single.zarr", teacher_weights, *layout)
    spread = cache_with_cli(tmp_path / "spread.zarr", teacher_weights, *layout, *cluster)
    assert spread["chunks_computed"] == single["chunks_computed"] == 10
    assert_same_cache(tmp_path / "single.zarr", tmp_path / "spread.zarr")


def test_workers_cache_views_of_the_users_own_transform_as_one_process_does(tmp_path, teacher_weights, cluster):
    """Each worker loads the transform from the file the user named, as it builds the teacher:
    the cache of views equals the single-process one."""
    (tmp_path / "jitter.py").write_text(textwrap.dedent("""
        import torch

        def factory():
            return lambda x, rng: x + torch.as_tensor(rng.normal(0.0, 0.5, size=x.shape), dtype=x.dtype)
    """))
    views = ("--augment", f"{tmp_path / 'jitter.py'}:factory", "--views", "3")
    cache_with_cli(tmp_path / "single.zarr", teacher_weights, *views)
    cache_with_cli(tmp_path / "spread.zarr", teacher_weights, *views, *cluster)
    assert_same_cache(tmp_path / "single.zarr", tmp_path / "spread.zarr")
    logits = zarr.open_group(str(tmp_path / "spread.zarr"), mode="r")["logits"][:]
    assert not np.array_equal(logits[:, 0], logits[:, 1])  # the views differ: the transform ran on the workers


def test_a_killed_worker_has_its_chunks_recomputed_and_each_worker_loads_the_teacher_once(tmp_path, teacher_weights):
    """The teacher's factory SIGKILLs the first dask worker process on its third forward pass:
    partway through a task, after one of its chunks is written. The nanny starts a new worker,
    the scheduler reruns the task, and the cache still equals the single-process one."""
    teacher, marker, loads = dying_model(tmp_path, where="dask worker")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spread = cache_with_cli(tmp_path / "spread.zarr", teacher_weights, "--scheduler", cluster.scheduler_address,
                        teacher=teacher)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert spread["chunks_computed"] == 10
    cache_with_cli(tmp_path / "single.zarr", teacher_weights)
    assert_same_cache(tmp_path / "single.zarr", tmp_path / "spread.zarr")
    pids = loads.read_text().split()
    # This process, the two workers, and the one started in place of the killed one if it got a
    # task: each built the teacher once, though the workers ran 5 tasks between them.
    assert len(pids) == len(set(pids)) and len(pids) in (3, 4)


def test_resuming_on_workers_computes_only_the_missing_chunks(tmp_path, teacher_weights, cluster):
    cache_with_cli(tmp_path / "single.zarr", teacher_weights)
    cache_with_cli(tmp_path / "spread.zarr", teacher_weights, *cluster)
    group = zarr.open_group(str(tmp_path / "spread.zarr"), mode="r+")
    for chunk in (2, 3, 7):  # as a pass killed before these chunks were written leaves them
        group["chunk_done"][chunk] = 0
        group["logits"][chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS] = np.nan
    group.attrs.update({"complete": False, "teacher_metrics": None})
    resumed = cache_with_cli(tmp_path / "spread.zarr", teacher_weights, *cluster)
    assert resumed["chunks_computed"] == 3
    assert_same_cache(tmp_path / "single.zarr", tmp_path / "spread.zarr")


def test_a_worker_that_builds_another_teacher_is_refused(tmp_path):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--chunk-rows", CHUNK_ROWS,
                          "--device", "cpu", "--out", tmp_path / "c.zarr", "--workers", "2")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: the teacher built on dask worker")


@pytest.mark.parametrize("options, words", [
    (("--workers", "2", "--scheduler", "tcp://127.0.0.1:1"), "give one of them"),
    (("--workers", "2", "--loader-workers", "2"), "--loader-workers cannot go with dask workers"),
])
def test_conflicting_scale_out_options_are_refused(tmp_path, teacher_weights, options, words):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--out", tmp_path / "c.zarr", *options)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.zarr").exists()
