"""The cache in your own training loop: a PyTorch data source and the distillation loss.

    from torch.utils.data import DataLoader
    from stages import CacheDataset, kd_loss

    data = CacheDataset("data/caches/my-teacher.zarr", my_train_split, batch_size=64, seed=0)
    loader = DataLoader(data, batch_size=None, num_workers=2)   # batches come whole
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for batch in loader:
            loss = kd_loss(model(batch["inputs"]), batch, alpha=0.9)
            ...

`CacheDataset` reads the cache as `train-student` does (whole chunks, in an order shuffled per
(seed, epoch), rows shuffled inside a buffer of chunks) and deals the chunks out among DataLoader
workers and torch.distributed processes, so that every row is read exactly once per epoch in all
and the order depends only on (seed, epoch). `kd_loss` is the loss `train-student` trains with.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages import divergences
from stages.augment import Augmentation, resolved
from stages.cache import CacheReader, Rows, prefetch
from stages.config import VIEW_POLICIES
from stages.data import Split, TorchDatasetSplit, inputs_at
from stages.errors import CacheDamagedError, InputError
from stages.kinds import KINDS, Kind
from stages.losses import HiddenAndHead, piecewise_loss
from stages.storage import CacheLocation, cache_location


class CacheDataset(torch.utils.data.IterableDataset):
    """Batches of a cache joined with their inputs, as dicts of tensors: "index", "inputs",
    "labels" (a labelled cache), "lengths" (a token cache), the soft-label arrays of the cache's
    kind ("logits"; "topk_values", "topk_indices", "logsumexp"), "view_seeds" and "view" (a
    cache of views), and "kind" and "temperature" (the cache's kind and T, for `kd_loss`).

    `cache`: a path or fsspec URL. `dataset`: the inputs the cache was made from, as a project
    split (stages.data.Split) or a map-style torch Dataset of inputs or (input, label) pairs, or
    None for the dataset spec and split the cache records (resolved by the installed
    `kd_pipeline.datasets` entry point, pipeline's; a spec that names code is refused, as
    train-student refuses it: pass that dataset yourself); it is checked against the cache's
    fingerprint as train-student checks it. The cache holds the
    labels, so only the inputs are taken from it. `augment`: for a cache of views, the
    augmentation that made them (default: the built-in one its spec names), replayed from each
    drawn view's seed; `view_policy` draws a random view per row and epoch, or cycles.

    `rank` and `world_size`: this process's place among the processes that share each epoch's
    rows (default: torch.distributed's, read where the loader starts its workers).

    Use it with `DataLoader(dataset, batch_size=None, ...)`: batches come whole, under workers
    started by fork, spawn or forkserver, persistent or not. Call `set_epoch(epoch)` before each
    epoch: it reaches workers already running too."""

    def __init__(self, cache: CacheLocation | str, dataset: Split | torch.utils.data.Dataset | None = None, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, buffer_chunks: int = 8, view_policy: str = "random",
                 augment: Augmentation | None = None, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"`batch_size` must be 1 or more, got {batch_size}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise InputError(f"`rank` and `world_size` go together, with 0 <= `rank` < `world_size`; got {rank} and {world_size}")
        if view_policy not in VIEW_POLICIES:
            raise InputError(f"`view_policy` must be one of {', '.join(VIEW_POLICIES)}, got {view_policy!r}")
        self.cache = cache_location(str(cache))
        reader = CacheReader(self.cache)
        if dataset is None:
            dataset = _recorded_split(self.cache, reader.attrs)
        self.split = dataset if hasattr(dataset, "inputs") else TorchDatasetSplit(reader.attrs["dataset"]["split"], dataset)
        reader.check_split(self.split, getattr(self.split, "name", "given"))
        self.kind, self.temperature, self.views = reader.layout.kind, reader.temperature, reader.layout.views
        self.num_classes = reader.num_classes
        self.augment = None if self.views is None else resolved(reader.attrs["augment"]["spec"], augment)
        self.batch_size, self.seed, self.shuffle, self.buffer_chunks = batch_size, seed, shuffle, buffer_chunks
        self.view_policy = view_policy
        self._placement = None if world_size is None else (rank, world_size)
        # In shared memory: a persistent DataLoader worker keeps the copy of this dataset it got
        # when it started, and a new epoch's order must still reach it.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reader, self._reader_pid = reader, os.getpid()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives, in this process and in its DataLoader workers."""
        self._epoch.fill_(epoch)

    def __iter__(self) -> Iterator[dict]:
        # Prepared on a thread a few batches ahead (reading, joining inputs, views), as
        # train-student prepares its batches: the training step does not wait for them.
        return prefetch(self._batches(self.epoch), depth=4)

    def __getstate__(self) -> dict:
        # A worker started by spawn or forkserver gets the dataset pickled: it opens its own
        # reader, and takes its place among the processes from here, where torch.distributed
        # is set up (in the worker it is not; a forked worker inherits it).
        return {**self.__dict__, "_reader": None, "_placement": self._placement or _distributed()}

    def _opened(self) -> CacheReader:
        """The reader of the process that reads (a DataLoader worker opens its own), opened
        once: opening a cache checks its attributes and arrays, 15 ms, which every epoch paid."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = CacheReader(self.cache), os.getpid()
        return self._reader

    def _batches(self, epoch: int) -> Iterator[dict]:
        share, shares = _share(self._placement or _distributed())
        reader = self._opened()
        names = ("index", *reader.soft_arrays, *(name for name in ("labels", "lengths", "trained", "view_seeds") if name in reader.arrays))
        rows = reader.batches(self.batch_size, seed=self.seed, epoch=epoch, buffer_chunks=self.buffer_chunks,
                              shuffle=self.shuffle, names=names, rank=share, world=shares)
        rng = np.random.default_rng([self.seed, epoch, 2, share])
        for batch in rows:
            if self.views is not None:
                batch = one_view_each(batch, reader.soft_arrays, self.view_policy, rng, epoch)
            check_against_dataset(batch, self.split, reader)
            inputs = inputs_at(self.split, batch["index"])
            if self.augment is not None:
                inputs = self.augment(inputs, batch["view_seeds"])
            yield {"inputs": inputs, **{name: torch.from_numpy(values) for name, values in batch.items()},
                   "kind": self.kind, "temperature": self.temperature}


def _share(placement: tuple[int, int]) -> tuple[int, int]:
    """This reader's share of an epoch's chunks and the number of shares: one per DataLoader
    worker of every process, for this process's (rank, world size)."""
    worker = torch.utils.data.get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    rank, world = placement
    return rank * workers + worker_id, world * workers


def _distributed() -> tuple[int, int]:
    """(rank, world size) of this process under torch.distributed; (0, 1) without it."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def check_against_dataset(batch: Rows, split: Split, reader: CacheReader) -> None:
    """The labels and lengths a batch took from the cache are the dataset's: its fingerprint
    matched the split's when the cache was opened, so a difference is damage (a labels chunk
    replaced, a length lowered), named with the chunks holding it. One gather and comparison per
    batch, of the labels the dataset holds (in memory, or read by index out of core)."""
    for name, ours in (("labels", split.labels), ("lengths", getattr(split, "lengths", None))):
        if name not in batch or ours is None:
            continue
        theirs = batch[name]
        differ = np.flatnonzero((np.asarray(ours[batch["index"]]) != theirs).reshape(len(theirs), -1).any(-1))
        if len(differ):
            rows = np.flatnonzero(np.isin(reader.read_rows(0, reader.num_samples, ("index",))["index"], batch["index"][differ]))
            chunks = sorted({int(row) // reader.grid.chunk_rows for row in rows})
            raise CacheDamagedError(f"cache {reader.path}: array {name}: chunk{'s' if len(chunks) > 1 else ''} "
                                    f"{', '.join(map(str, chunks[:5]))} hold{'' if len(chunks) > 1 else 's'} {name} that differ "
                                    f"from the dataset's ({len(differ)} of a batch's {len(theirs)} rows); run pipeline verify")


# The entry point group through which the installed package resolves the dataset spec a cache
# records (stages knows no dataset specs: they are pipeline's, and pipeline imports stages).
DATASET_RESOLVERS = "kd_pipeline.datasets"


def _recorded_split(cache: CacheLocation, attrs: dict) -> Split:
    """The split a cache records that it was made from, resolved by the `DATASET_RESOLVERS` entry point."""
    resolvers = sorted(importlib.metadata.entry_points(group=DATASET_RESOLVERS), key=lambda point: point.name)
    if not resolvers:
        raise InputError(f"no package resolves the dataset spec {attrs['dataset'].get('spec')!r} that cache {cache} records "
                         f"(none declares a {DATASET_RESOLVERS!r} entry point): pass the dataset to CacheDataset")
    return resolvers[0].load()(cache, attrs)


def one_view_each(rows: Rows, soft_arrays: tuple[str, ...], policy: str, rng: np.random.Generator, epoch: int) -> Rows:
    """Rows of a view cache reduced to one view per sample: its soft labels (and features) and
    seed, and which view ("view"): drawn from `rng` ("random") or the epoch's ("cycle")."""
    count, views = rows["view_seeds"].shape
    pick = rng.integers(0, views, size=count) if policy == "random" else np.full(count, epoch % views)
    return {**rows, **{name: rows[name][np.arange(count), pick] for name in (*soft_arrays, "view_seeds") if name in rows},
            "view": pick}


def kd_loss(student_logits: torch.Tensor | HiddenAndHead, batch: dict, *, alpha: float, temperature: float | None = None,
            divergence: str = divergences.DEFAULT) -> torch.Tensor:
    """The distillation loss of the student's logits ((B, C), or (B, L, C) for a token cache) on
    a CacheDataset batch, or of its last hidden states and output layer (`HiddenAndHead(hidden,
    head)`, hidden (B, L, H)), whose logits are then taken a piece of positions at a time, never
    all of B x L x C at once (the same loss, float32 rounding aside): `divergence` (stages.divergences: forward-kl, reverse-kl, jsd[:BETA],
    tv) between the teacher and the student over the support of the cache's kind (stages.kinds)
    at `temperature` (default: the cache's T; another T re-tempers the cached values, exactly for a
    dense cache and for a top-k cache's kept classes; a sampled cache refuses it, and any divergence
    but forward-kl), mixed with cross-entropy on the labels by
    `alpha` (1: soft labels only), over valid tokens only. The loss train-student trains with."""
    kind = KINDS[batch["kind"]]
    # Only what the loss reads: the inputs went to the model already, and a copy per step is no small thing on a GPU.
    device = (student_logits.hidden if isinstance(student_logits, HiddenAndHead) else student_logits).device
    tensors = {name: batch[name].to(device) for name in ("labels", "lengths", "trained", *kind.soft_arrays) if name in batch}
    cache_temperature = float(batch["temperature"])
    loss, _ = soft_label_loss(student_logits, tensors, kind, alpha=alpha, temperature=temperature or cache_temperature,
                              cache_temperature=cache_temperature, divergence=divergence)
    return loss


def soft_label_loss(student: torch.Tensor | HiddenAndHead, batch: dict[str, torch.Tensor], kind: Kind | None, *, alpha: float,
                    temperature: float | None, cache_temperature: float | None, divergence: str = divergences.DEFAULT
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the student's output on one batch of tensors and its named parts: cross-entropy
    with the hard labels without a kind, else the kind's distillation loss. The output is its
    logits, or its last hidden states and output layer (HiddenAndHead), whose logits are then
    taken a piece of positions at a time (stages.losses.piecewise_loss: the same loss, never all
    of B x L x C at once). Per token ((B, L, ...), with the batch's "lengths"), only valid tokens
    are rows of the loss, and of those only the trained ones where the batch has "trained" (B, L):
    padding and untrained positions get no gradient, in the soft and the hard-label term alike."""
    y = batch.get("labels")
    soft = {name: batch[name] for name in (kind.soft_arrays if kind else ())}
    pieces = isinstance(student, HiddenAndHead)
    rows = student.hidden if pieces else student
    if "lengths" in batch and rows.ndim == 3:
        valid = torch.arange(rows.shape[1], device=rows.device) < batch["lengths"].unsqueeze(1)
        if "trained" in batch:  # the positions the student learns from (chat data: the assistant's tokens)
            valid &= batch["trained"].bool()
        rows, y = rows[valid], None if y is None else y[valid]
        soft = {name: values[valid] for name, values in soft.items()}
    if pieces:
        return piecewise_loss(kind, HiddenAndHead(rows, student.head), soft, y, alpha=alpha, temperature=temperature,
                              cache_temperature=cache_temperature, divergence=divergence)
    logits = rows
    if kind is None:
        hard = F.cross_entropy(logits, y)
        return hard, {"ce": hard.detach()}
    return kind.loss(logits, soft, y, alpha=alpha, temperature=temperature, cache_temperature=cache_temperature,
                     divergence=divergence)
