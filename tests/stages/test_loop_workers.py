"""CacheDataset's promise under every way a DataLoader may run it: each row exactly once per
epoch across all processes and workers, and a new order every epoch, for workers started by
fork, spawn or forkserver, persistent or not, under several ranks (simulated in this process by
CacheDataset's rank arguments, and once by a fake torch.distributed group of three)."""

from __future__ import annotations

import itertools
import multiprocessing

import numpy as np
import pytest
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import CacheDataset, cache_teacher
from stages.data import TensorSplit

IMAGES = "synthetic:n=600,test=10,features=8,classes=4,seed=3"
TOKENS = "stdlib-bytes:seq=16,train=4000,test=200"  # about 250 rows of 16 bytes


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, tuple]:
    """An image cache (600 rows in 19 chunks) and a token cache (about 250 rows of 16 tokens, 16
    chunks), each with the split it was made from, held in memory (so that a spawned worker
    imports no more than stages): enough chunks for 3 ranks of 2 workers."""
    folder = tmp_path_factory.mktemp("caches")
    made = {}
    for name, dataset, teacher, chunk_rows in (("images", IMAGES, "mlp-64", 32), ("tokens", TOKENS, "bytelm:dim=16,layers=1,heads=2", 16)):
        split = resolve_dataset(dataset).split("train")
        shape = tuple(split.inputs(np.zeros(1, dtype=np.int64)).shape[1:])
        model = resolve_model(teacher, num_classes=split.num_classes, input_shape=shape)
        config = cache_teacher.CacheTeacherConfig(teacher=teacher, dataset=dataset, out=folder / f"{name}.zarr",
                                                  chunk_rows=chunk_rows, batch_size=64, device="cpu")
        inputs = split.inputs(np.arange(len(split)))
        held = TensorSplit("train", inputs, np.asarray(split.labels[:]), split.num_classes, getattr(split, "lengths", None))
        made[name] = cache_teacher.run(config, model, split).cache, held
    return made


def _context(method: str | None):
    """The start method's context; forkserver's server loads torch and stages once, so that each
    worker it forks starts in a moment (as spawn's cannot)."""
    if method is None:
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["torch", "stages"])
    return context


def _epochs(cache, split, *, method: str | None, workers: int, persistent: bool, world: int, epochs: int = 2,
            rank_arguments: bool = True) -> list[list[list[int]]]:
    """The dataset indices each rank reads in each epoch ([epoch][rank] -> rows), one loader per
    rank kept over the epochs (so that persistent workers live through them)."""
    read = [[[] for _ in range(world)] for _ in range(epochs)]
    for rank in range(world):
        placement = {"rank": rank, "world_size": world} if rank_arguments else {}
        dataset = CacheDataset(cache, split, batch_size=16, seed=7, **placement)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent,
                            multiprocessing_context=_context(method) if workers else None)
        try:
            for epoch in range(epochs):
                dataset.set_epoch(epoch)
                read[epoch][rank] = [i for batch in loader for i in batch["index"].tolist()]
        finally:
            del loader  # persistent workers end with their loader
    return read


def _check(read: list[list[list[int]]], rows: int, what: str) -> None:
    for epoch, ranks in enumerate(read):
        together = [i for rank in ranks for i in rank]
        assert sorted(together) == list(range(rows)), f"{what}, epoch {epoch}: {len(together)} rows read, {len(set(together))} distinct"
    assert read[0] != read[1], f"{what}: epoch 1 has epoch 0's order"


# Fork over the whole grid (workers 0, 1, 2; persistent or not; worlds 1, 2, 3). Workers that
# are not forked take a second (forkserver, whose preloaded server forks them) or several (spawn,
# which imports torch afresh) to start: those run where the failures showed, 2 persistent
# workers under several ranks (both failures at once: a worker that starts with the wrong place,
# and a persistent one that never sees the new epoch), under 3 ranks for forkserver, and under 2
# for spawn (4 workers, each importing torch); forkserver once more with 1 worker, not
# persistent, under 2 ranks; spawn on the image cache only.
GRID = [("fork", workers, persistent, world)
        for workers, persistent, world in itertools.product((0, 1, 2), (False, True), (1, 2, 3)) if workers or not persistent]
GRID += [("forkserver", 2, True, 3), ("forkserver", 1, False, 2)]
SPAWNED = ("spawn", 2, True, 2)


@pytest.mark.parametrize("cache_name", ["images", "tokens"])
def test_every_row_once_per_epoch_and_a_new_order_each_epoch_under_every_start_method(caches, cache_name):
    cache, split = caches[cache_name]
    forked = {}
    for method, workers, persistent, world in GRID + ([SPAWNED] if cache_name == "images" else []):
        what = f"{cache_name}: {method}, {workers} workers{', persistent' if persistent else ''}, world {world}"
        read = _epochs(cache, split, method=method, workers=workers, persistent=persistent, world=world)
        _check(read, len(split), what)
        if method == "fork":
            forked[workers, world] = read
        else:  # the order depends on (seed, epoch, ranks, workers) alone, not on how workers start
            assert read == forked[workers, world], what


def test_workers_take_their_rank_from_the_process_group_that_started_them(caches):
    """Without rank arguments, the place comes from torch.distributed: a worker started by spawn
    or forkserver has no process group of its own, so it must get its process's rank from the
    process that pickled it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cache, split = caches["images"]
    read: list[list[list[int]]] = [[], []]
    for rank in range(3):
        dist.init_process_group("fake", rank=rank, world_size=3, store=FakeStore())
        try:
            mine = _epochs(cache, split, method="forkserver", workers=2, persistent=False, world=1, rank_arguments=False)
        finally:
            dist.destroy_process_group()
        for epoch in range(2):
            read[epoch].append(mine[epoch][0])
    _check(read, len(split), "forkserver under a process group of 3")
    assert read == _epochs(cache, split, method="fork", workers=2, persistent=False, world=3)


def test_rank_and_world_size_are_checked(caches):
    from stages.errors import InputError

    cache, split = caches["images"]
    for bad in ({"rank": 0}, {"world_size": 2}, {"rank": 2, "world_size": 2}, {"rank": -1, "world_size": 2}):
        with pytest.raises(InputError, match="`rank` and `world_size` go together"):
            CacheDataset(cache, split, batch_size=16, **bad)
