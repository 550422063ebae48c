"""Stage one: run a teacher once over a dataset split and store its softened logits as a cache.

    pipeline cache-teacher --teacher cnn --teacher-weights data/teachers/cnn-mnist.safetensors \\
        --dataset mnist-5k --split train --temperature 4 --out data/caches/mnist-cnn-T4.zarr

    pipeline cache-teacher --teacher cnn --teacher-weights data/teachers/cnn-mnist.safetensors \\
        --dataset mnist-5k --temperature 4 --views 8 --augment shift:2+rotate:10

    pipeline cache-teacher --teacher bytelm-teacher --teacher-weights data/teachers/bytelm.safetensors \\
        --dataset stdlib-bytes --temperature 1 --format topk --top-k 32 --out data/caches/lm-top32.zarr

From Python, with your own module and split (see stages.data.Split):

    result = run(CacheTeacherConfig(teacher="mine", dataset="mine", out=Path("c.zarr")), teacher, split)

A cache holds its kind's soft labels (stages.kinds: every class's logit, or the K largest per
row, ...), per sample or, for a teacher that outputs logits per token, per token
(stages.teacher_rows.stored_rows). With `augment`, it holds the teacher's outputs for `views`
augmented views of every sample, each
made from a seed that the cache records, so that student training can replay the exact input
the teacher saw (stages.augment).
The teacher runs in eval mode under inference_mode. Input batches are prepared on a
background thread and finished chunks are written by another (stages.cache.writer), so
the forward pass does not wait on storage. The cache layout is described in stages.cache.format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from stages import storage
from stages.augment import Augmentation, resolved, view_seeds
from stages.cache.format import is_cache, nonfinite_rows
from stages.cache.layout import ChunkGrid, Layout, default_chunk_rows, default_shard_rows
from stages.cache.reader import prefetch
from stages.cache.writer import CacheWriter, writing
from stages.config import DEFAULT_TEACHER_BATCH, CacheTeacherConfig  # the config is defined there, torch-free, for the CLI; re-exported here
from stages.data import Split, fingerprint, joined_with_inputs, sequence_lengths, sha256
from stages.errors import InputError, PipelineError
from stages.runtime import (
    Progress, check_labels_fit, config_dict, one_blas_thread_beside_torch, output_shape,
    require, resolve_device, torch_threads,
)
from stages.storage import CacheLocation
from stages.teacher_rows import teacher_rows
from stages.weights import count_parameters, weights_fingerprint

log = logging.getLogger(__name__)

# Builds (teacher, split, augmentation) on a dask worker: workers are other processes, often
# other machines, and user code (a teacher factory, a transform) is loaded there by its spec.
WorkerLoader = Callable[[], tuple[torch.nn.Module, Split, Augmentation | None]]


@dataclass(frozen=True)
class CacheTeacherResult:
    cache: CacheLocation
    num_samples: int
    num_classes: int
    temperature: float
    bytes_on_disk: int
    seconds: float
    teacher_accuracy: float | None
    teacher_nll: float | None
    chunks_computed: int  # by this run: fewer than chunks_total when it resumed a cache (whole shards' of a sharded one)
    chunks_total: int


def run(config: CacheTeacherConfig, teacher: torch.nn.Module, split: Split, progress: Progress | None = None, *,
        augment: Augmentation | None = None, load_on_worker: WorkerLoader | None = None) -> CacheTeacherResult:
    """Write the cache for `split` at `config.out`, or finish an incomplete one that this
    same teacher, data and layout started (only its missing chunks are computed).
    `augment` is `config.augment` resolved by the caller, who knows which code may run
    (pipeline.jobs); without it, built-in augmentations are resolved here (stages.augment). The
    spec stays in `config` as provenance.

    With `config.workers` or `config.scheduler`, dask workers compute the chunks: this process
    creates the cache, holds its lock and hands out ranges of write units (shards, or chunks when
    unsharded), and each worker builds the teacher, split and augmentation once with
    `load_on_worker` (a picklable function, the same on every machine) and writes the units it
    computes (see _distributed_pass)."""
    config.validate()
    augmentation = resolved(config.augment, augment)
    started = time.perf_counter()
    device = resolve_device(config.device)
    if len(split) == 0:
        raise InputError(f"split {config.split!r} of {config.dataset} is empty")
    if not storage.is_empty(config.out) and not is_cache(config.out):
        raise InputError(f"{config.out} exists and is not a cache; choose another `out`")
    teacher = teacher.to(device).eval()

    shape = output_shape(teacher, split, device, "teacher")
    check_labels_fit(split, shape, "teacher")
    num_classes = shape[-1]
    features = _feature_size(teacher, split, device) if config.features else None
    if augmentation is not None:
        augmentation(split.inputs(np.zeros(1, dtype=np.int64)), np.zeros(1, dtype=np.uint64))  # fits the inputs?
    # A split that says which positions the student learns from (chat data: the assistant's
    # tokens, stages.data) gets soft labels there only; the rest are zeros, compressed to nothing.
    trained_mask = len(shape) == 2 and hasattr(split, "trained_positions")
    if trained_mask and config.codec == "none":
        log.info("the split marks the positions a student learns from: soft labels compressed (zstd) so that the others take no room")
    layout = Layout(
        kind=config.format, num_samples=len(split), num_classes=num_classes, chunk_rows=config.chunk_rows or 1,
        dtype=config.dtype, codec="zstd" if trained_mask else config.codec, options=config.options(),
        tokens=shape[0] if len(shape) == 2 else None, trained_mask=trained_mask,
        views=config.views if augmentation is not None else None, labelled=split.labels is not None, features=features,
    )
    if config.chunk_rows is None:
        layout = replace(layout, chunk_rows=default_chunk_rows(layout.row_bytes, len(split)))
    # None: by the cache's size (default_shard_rows); 0: never sharded.
    layout = replace(layout, shard_rows=default_shard_rows(layout) if config.shard_rows is None else config.shard_rows or None)
    if config.batch_size is None:
        config = replace(config, batch_size=min(DEFAULT_TEACHER_BATCH, layout.chunk_rows))
    lengths = None if layout.tokens is None else sequence_lengths(split, layout.tokens)
    estimate = _size_estimate(layout, layout.soft_kind.position_bytes(layout), _positions(layout, lengths))
    if any(spec.compressed for spec in layout.soft_kind.arrays(layout).values()):
        log.info("soft labels: about %s, by the %s kind's byte model (measured on the first chunk written)",
                 _size_text(layout, estimate, lengths), layout.kind)
    else:
        log.info("soft labels: %s (uncompressed)", _size_text(layout, estimate, lengths))
    _check_size(layout, estimate, lengths, config.max_gib)
    provenance = {**_provenance(config, teacher, split), "determinism": _determinism(config, device)}
    with writing(config.out, layout, provenance, overwrite=config.overwrite) as writer:
        missing = writer.missing_chunks()
        if missing and len(missing) < writer.grid.num_chunks:
            log.info("resuming %s: %d of %d %ss still to compute", config.out, len(missing), writer.grid.num_chunks,
                     layout.write_unit)
            _check_resume_determinism(config, writer.group.attrs.get("determinism"), provenance["determinism"], layout.chunk_rows)
        if config.workers or config.scheduler:
            writer.close()  # the workers write; this process only hands out chunks
            _distributed_pass(config, writer.grid, missing, load_on_worker, progress, writer.lock)
            if writer.missing_chunks():
                raise PipelineError(
                    f"the workers finished but {layout.write_unit}s {writer.missing_chunks()[:10]} are not in {config.out}: do the "
                    "workers see that location? Put the cache on a file system they share, or on an object store"
                )
        else:
            with one_blas_thread_beside_torch(), torch_threads(_recorded_threads(writer)):
                _teacher_pass(config, teacher, split, lengths, augmentation, writer, device, missing, progress)
    metrics = writer.group.attrs["teacher_metrics"]
    seconds = time.perf_counter() - started
    computed = sum(len(layout.chunks_of(unit)) for unit in missing)
    log.info("cache %s complete: %d rows x %d classes, %d chunks computed in %.1fs",
             config.out, len(split), num_classes, computed, seconds)
    return CacheTeacherResult(
        cache=config.out,
        num_samples=len(split),
        num_classes=num_classes,
        temperature=config.temperature,
        bytes_on_disk=storage.disk_usage(config.out),
        seconds=seconds,
        teacher_accuracy=metrics["accuracy"] if metrics else None,
        teacher_nll=metrics["nll"] if metrics else None,
        chunks_computed=computed,
        chunks_total=layout.grid.num_chunks,
    )


def _feature_size(teacher: torch.nn.Module, split: Split, device: torch.device) -> int:
    """F, the size of the teacher's feature vector for one sample."""
    if not callable(getattr(teacher, "logits_and_features", None)):
        raise InputError(
            "`features`: the teacher has no features to cache (it needs a logits_and_features method, "
            "as hf: and lstm models have)"
        )
    with torch.inference_mode():
        _, features = teacher.logits_and_features(split.inputs(np.zeros(1, dtype=np.int64)).to(device))
    if features.ndim != 2:
        raise InputError(f"`features`: the teacher's features must be (batch, F), got shape {tuple(features.shape)}")
    return int(features.shape[1])


def _determinism(config: CacheTeacherConfig, device: torch.device) -> dict:
    """What a row's stored bytes depend on besides the teacher and the data, recorded so that
    every run that writes chunks of this cache (a resume, a dask worker) computes them alike:
    the batches (chunk_batches of batch_size), torch's CPU thread count (CPU kernels may split a
    reduction by threads), the device and the library versions, and autocast."""
    return {
        "batch_size": config.batch_size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "amp": config.amp,
    }


def _check_resume_determinism(config: CacheTeacherConfig, recorded: dict | None, current: dict, chunk_rows: int) -> None:
    """Refuse a resume whose batches would differ from the cache's chunks already written; warn
    when only the machine or library versions differ (the rows are still the teacher's, but
    their last bits may not equal an uninterrupted run's). Threads follow the record
    (_recorded_threads), so they never differ. Batches stop at chunk boundaries (chunk_batches),
    so batch sizes of a chunk's rows or more make the same batches (a cache started at the old
    default of 256 rows resumes at today's default, one chunk)."""
    if recorded is None:
        log.warning("%s was started before caches recorded their batching: resumed rows may differ from an "
                    "uninterrupted run's in the last bit", config.out)
        return
    if min(recorded["batch_size"], chunk_rows) != min(current["batch_size"], chunk_rows):
        raise InputError(
            f"{config.out} was started with batch size {recorded['batch_size']}: resume it with the same batch size, so "
            "that its rows meet the teacher in the same batches (or start over with overwrite)"
        )
    changed = [f"{k} {recorded.get(k)} -> {current[k]}" for k in ("device", "torch") if recorded.get(k) != current[k]]
    if changed:
        log.warning("resuming %s on another setup (%s): the rows computed now may differ from an uninterrupted run's "
                    "in the last bit", config.out, "; ".join(changed))


def _recorded_threads(writer: CacheWriter) -> int | None:
    """The CPU thread count the cache's determinism record asks for (None: leave torch's as it is)."""
    return (writer.group.attrs.get("determinism") or {}).get("threads")


def _provenance(config: CacheTeacherConfig, teacher: torch.nn.Module, split: Split) -> dict:
    index = np.arange(len(split), dtype=np.int64)
    return {
        "temperature": config.temperature,
        "teacher_amp": config.amp,
        "teachers": [
            {
                "spec": config.teacher,
                "weights": None if config.teacher_weights is None else str(Path(config.teacher_weights).absolute()),
                "weights_sha256": weights_fingerprint(teacher),
                "num_parameters": count_parameters(teacher),
            }
        ],
        "combine": None,
        "augment": None if config.augment == "none" else {"spec": config.augment, "base_seed": config.view_seed},
        "dataset": {
            "spec": config.dataset,
            "split": config.split,
            "fingerprint": fingerprint(split),
            "index_sha256": sha256(index),
            # A split that is a slice of its dataset's rows (a token dataset's rows=A:B) says where it
            # starts, so that caches of other slices are compared by dataset row (stages.inspection).
            "first_row": int(getattr(split, "first_row", 0)),
        },
        "teacher_metrics": None,
        "config": config_dict(config),
    }


def _positions(layout: Layout, lengths: np.ndarray | None) -> tuple[int, int]:
    """(every position, the positions that hold soft labels): rows times views, or a token cache's
    positions and its valid tokens."""
    every = layout.num_samples * math.prod(layout.position_shape)
    return every, every if lengths is None else int(lengths.sum())


def _size_estimate(layout: Layout, per_position: dict[str, float], positions: tuple[int, int]) -> float:
    """The soft labels' bytes on disk, from each array's bytes per position that holds soft labels:
    a compressed array stores padding in next to nothing, an uncompressed one at full size."""
    every, valid = positions
    specs = layout.soft_kind.arrays(layout)
    return sum(per_position[name] * (valid if spec.compressed else every) for name, spec in specs.items())


def _size_text(layout: Layout, total: float, lengths: np.ndarray | None) -> str:
    every, valid = _positions(layout, lengths)
    if layout.tokens is None:
        return f"{total / layout.num_samples:,.0f} bytes per row over {layout.num_samples:,} rows, {total / 2**30:,.3g} GiB in all"
    return (f"{total / every:,.0f} bytes per token position ({total / max(valid, 1):,.1f} per valid token) over {every:,} token "
            f"positions, {total / 2**30:,.3g} GiB in all")


def _check_size(layout: Layout, total: float, lengths: np.ndarray | None, max_gib: float, measured: str = "") -> None:
    """Refuse a cache whose soft labels would take more than `max_gib`: a dense token cache at a
    language model's vocabulary is 2 bytes per class per token (a 150k vocabulary over a billion
    tokens is 300 TB). `measured` says where the figure was measured, and what is kept."""
    if max_gib and total > max_gib * 2**30:
        every, _ = _positions(layout, lengths)
        per, unit, count = (total / every, "token position", every) if layout.tokens else (total / layout.num_samples, "row", layout.num_samples)
        raise InputError(
            f"this cache's soft labels would take {total / 2**30:,.1f} GiB ({per:,.0f} bytes per {unit} over {count:,} {unit}s"
            f"{measured}), more than `max_gib` {max_gib:g}: keep the top k classes (`format` topk or qtopk) or raise `max_gib` "
            "(0: no limit)"
        )


class _FirstChunkSize:
    """The compressed soft-label arrays of the first read chunk a pass stores, encoded as the
    cache's arrays encode them (their own codecs, in memory): the whole cache's size measured
    rather than modelled (an uncompressed array's size is exact beforehand), logged, and checked
    against `max_gib` again. A refusal then keeps what is written (the writer finishes the write
    units queued): the same command with a larger `max_gib` resumes."""

    def __init__(self, writer: CacheWriter, chunk: int, lengths: np.ndarray | None, max_gib: float):
        self.writer, self.chunk, self.lengths, self.max_gib = writer, chunk, lengths, max_gib
        self.start, self.stop = writer.layout.grid.rows(chunk)
        specs = writer.layout.soft_kind.arrays(writer.layout)
        self.parts: dict[str, list[np.ndarray]] | None = {name: [] for name, spec in specs.items() if spec.compressed}
        self.filled = 0

    def add(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Rows [start, start + len) as stored; the chunk's rows arrive in order."""
        low, high = max(start, self.start), min(start + len(rows["index"]), self.stop)
        if self.parts is None or low >= high:
            return
        for name, parts in self.parts.items():
            parts.append(rows[name][low - start : high - start])
        self.filled += high - low
        if self.filled == self.stop - self.start:
            parts, self.parts = self.parts, None
            self._measure({name: np.concatenate(values) for name, values in parts.items()})

    def _measure(self, rows: dict[str, np.ndarray]) -> None:
        layout = self.writer.layout
        every = (self.stop - self.start) * math.prod(layout.position_shape)
        valid = every if self.lengths is None else int(self.lengths[self.start : self.stop].sum())
        skip = len(layout.position_shape)
        per_position = {name: np.dtype(spec.dtype).itemsize * math.prod(spec.shape[skip:])
                        for name, spec in layout.soft_kind.arrays(layout).items()}
        per_position.update({name: _encoded_bytes(self.writer.group[name], values) / max(valid, 1) for name, values in rows.items()})
        total = _size_estimate(layout, per_position, _positions(layout, self.lengths))
        log.info("soft labels: %s, measured on chunk %d", _size_text(layout, total, self.lengths), self.chunk)
        _check_size(layout, total, self.lengths, self.max_gib,
                    f", measured on its chunk {self.chunk}; the chunks written are kept and the same command resumes them")


def _encoded_bytes(array: zarr.Array, values: np.ndarray) -> int:
    """The bytes `values`, one chunk of `array`'s rows, take stored as `array` stores a chunk."""
    store: dict = {}
    copy = zarr.create_array(store=store, shape=values.shape, chunks=values.shape, dtype=array.dtype, fill_value=array.fill_value,
                             filters=array.filters, serializer=array.serializer, compressors=array.compressors,
                             config={"write_empty_chunks": True})
    copy[...] = values
    return sum(len(value) for key, value in store.items() if key != "zarr.json")


def _teacher_pass(
    config: CacheTeacherConfig, teacher: torch.nn.Module, split: Split, lengths: np.ndarray | None,
    augmentation: Augmentation | None, writer: CacheWriter, device: torch.device, missing: list[int], progress: Progress | None,
) -> None:
    """Forward every row of the missing write units and hand the stored values to the writer.

    On CUDA the loop never waits for a batch it has just launched: the stored arrays are
    computed on the GPU (top-k included) and copied device-to-host asynchronously into pinned
    buffers (a small ring per array, reused), and a batch is taken off the GPU only once
    MAX_IN_FLIGHT newer batches are queued behind it."""
    if missing:
        log.info("teacher pass over %d %ss of %d rows on %s", len(missing), writer.layout.write_unit, writer.grid.chunk_rows,
                 device)
    if config.batch_size > writer.layout.chunk_rows:
        log.info("teacher batches stop at chunk boundaries (so that a resume equals a whole pass): batches of %d rows, "
                    "not %d; make chunks at least a batch (chunk_rows) for full batches", writer.layout.chunk_rows,
                    config.batch_size)
    cuda = device.type == "cuda"
    in_flight: deque[tuple[int, dict[str, torch.Tensor], torch.cuda.Event | None]] = deque()
    rings: dict[str, _PinnedRing] = {}
    # Progress counts every row of the cache, so a resumed pass reports from where it stopped.
    rows_total = writer.grid.num_samples
    rows_done = rows_total - sum(stop - start for start, stop in map(writer.grid.rows, missing))
    last_report = time.perf_counter()
    views = writer.layout.views
    if progress is not None:  # the total from the start, before the first batch
        progress(rows_done, rows_total)
    size = _FirstChunkSize(writer, writer.layout.chunks_of(missing[0])[0], lengths, config.max_gib) if missing else None
    if size is not None and not size.parts:  # no compressed array: the size said before the pass is exact
        size = None
    batches = _input_batches(split, writer, missing, config.batch_size, pin=cuda, workers=config.loader_workers)
    if augmentation is not None:
        batches = _augmented_views(batches, augmentation, views, config.view_seed, pin=cuda)
    for start, inputs in prefetch(batches, depth=2):
        count = len(inputs) // (views or 1)
        batch_lengths = None if lengths is None else torch.from_numpy(lengths[start : start + count])
        trained = (torch.from_numpy(split.trained_positions(np.arange(start, start + count))) if writer.layout.trained_mask
                   else None)
        with torch.inference_mode():
            stored = teacher_rows(teacher, inputs.to(device, non_blocking=cuda), writer.layout, config.temperature,
                                  config.amp, batch_lengths, row_index=torch.arange(start, start + count), trained=trained)
        if cuda:
            host = {}
            for name, values in stored.items():
                ring = rings.setdefault(name, _PinnedRing(MAX_IN_FLIGHT + 1))
                host[name] = ring.next(values.shape, values.dtype).copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            in_flight.append((start, host, done))
        else:
            in_flight.append((start, stored, None))
        while in_flight and (len(in_flight) > MAX_IN_FLIGHT or in_flight[0][2] is None or in_flight[0][2].query()):
            rows_done += _store(writer, split, lengths, config, *in_flight.popleft(), size=size)
            if progress is not None:
                progress(rows_done, rows_total)
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            log.info("teacher pass: rows up to %d of %d", start + count, len(split))
    while in_flight:
        rows_done += _store(writer, split, lengths, config, *in_flight.popleft(), size=size)
        if progress is not None:
            progress(rows_done, rows_total)


def _distributed_pass(
    config: CacheTeacherConfig, grid: ChunkGrid, missing: list[int], load_on_worker: WorkerLoader | None,
    progress: Progress | None, lock,
) -> None:
    """Compute the missing write units (`missing` of `grid`, the write grid: shards, or chunks
    when unsharded) on dask workers, in tasks of whole, adjacent units.

    A worker owns the units of the task it runs, so no two writers share a shard or chunk. When a
    worker dies, the scheduler gives its unfinished tasks to others (up to distributed's
    allowed-failures), and a retried task skips the units its first attempt finished
    (chunk_done). Chunk values do not depend on which worker or batch computed them, so the
    cache equals a single-process one."""
    distributed = require("distributed", "scale", "`workers` / `scheduler`")
    if load_on_worker is None:
        raise InputError("caching on dask workers needs load_on_worker: a picklable function returning (teacher, split, augmentation)")
    if not missing:
        return
    with _dask_client(distributed, config) as client:
        workers = max(1, len(client.scheduler_info()["workers"]))
        per_task = min(TASK_CHUNKS_MAX, max(1, -(-len(missing) // (TASKS_PER_WORKER * workers))))
        tasks = [missing[i : i + per_task] for i in range(0, len(missing), per_task)]
        log.info("teacher pass over %d write units in %d tasks on %d dask workers", len(missing), len(tasks), workers)
        options = storage.storage_options(config.out)
        futures = [client.submit(_worker_chunks, config, chunks, load_on_worker, options, pure=False)
                   for chunks in tasks]
        rows_total = grid.num_samples
        rows_done = rows_total - sum(stop - start for start, stop in map(grid.rows, missing))
        if progress is not None:
            progress(rows_done, rows_total)
        try:
            for future in distributed.as_completed(futures):
                rows_done += future.result()
                lock.check_held()
                if progress is not None:
                    progress(rows_done, rows_total)
        except distributed.scheduler.KilledWorker as exc:
            raise PipelineError(
                f"dask workers kept dying on one task ({exc}); the shards or chunks finished so far are kept: re-run to resume"
            ) from exc
        finally:
            client.cancel(futures)


# Tasks per worker (at least): enough to balance uneven workers, and a dead worker loses little;
# and write units (shards, or chunks) per task (at most).
TASKS_PER_WORKER = 4
TASK_CHUNKS_MAX = 16


@contextlib.contextmanager
def _dask_client(distributed, config: CacheTeacherConfig):
    """A client of the scheduler at `config.scheduler`, or of a local cluster of
    `config.workers` processes (one thread each: a worker runs one teacher) started for this pass."""
    if config.scheduler:
        try:
            client = distributed.Client(config.scheduler, timeout=SCHEDULER_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise PipelineError(f"cannot reach the dask scheduler at {config.scheduler}: {exc}") from exc
        with client:
            yield client
        return
    # A nanny sets OMP_NUM_THREADS=1 (and more) in os.environ before it spawns a worker, and leaves
    # them there: this process, and every process it starts later, would inherit them.
    environment = dict(os.environ)
    try:
        with distributed.LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(environment)


SCHEDULER_TIMEOUT_SECONDS = 30

# On a dask worker process: the teacher, split, augmentation, device and lengths of the cache it
# is working on, built once by the first task and reused by the later ones.
_WORKER_STATE: dict[str, tuple] = {}
_WORKER_STATE_LOCK = threading.Lock()


def _worker_chunks(config: CacheTeacherConfig, chunks: list[int], load_on_worker: WorkerLoader, options: dict) -> int:
    """A dask task: compute and write write units `chunks` of the cache (those not already done)
    and return the rows written."""
    if options:
        storage.set_storage_options(options, config.out)
    key = json.dumps(config_dict(config), sort_keys=True)
    with _WORKER_STATE_LOCK:
        if key not in _WORKER_STATE:
            _WORKER_STATE.clear()  # one cache at a time: let the previous teacher go
            teacher, split, augmentation = load_on_worker()
            _check_same_teacher(teacher, config.out)
            device = _worker_device(config.device)
            _WORKER_STATE[key] = (teacher.to(device).eval(), split, resolved(config.augment, augmentation), device, {})
        teacher, split, augmentation, device, lengths_by_tokens = _WORKER_STATE[key]
    with CacheWriter(config.out) as writer:  # the coordinating process holds the lock and marks the cache complete
        tokens = writer.layout.tokens
        if tokens is not None and tokens not in lengths_by_tokens:
            lengths_by_tokens[tokens] = sequence_lengths(split, tokens)
        todo = sorted(set(chunks) & set(writer.missing_chunks()))
        with one_blas_thread_beside_torch(), torch_threads(_recorded_threads(writer)):
            _teacher_pass(config, teacher, split, lengths_by_tokens.get(tokens), augmentation, writer, device, todo, None)
    return sum(stop - start for start, stop in map(writer.grid.rows, todo))


def _worker_device(name: str) -> torch.device:
    """`device` auto or cuda on a machine with several GPUs: a local cluster's worker N takes
    GPU N (mod their count), so its workers spread over the GPUs. Workers started by hand choose
    theirs with CUDA_VISIBLE_DEVICES and see one."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        from distributed import get_worker

        worker = get_worker().name
        if isinstance(worker, int):
            device = torch.device("cuda", worker % torch.cuda.device_count())
    return device


def _check_same_teacher(teacher: torch.nn.Module, location: CacheLocation) -> None:
    """A worker's teacher must be the one the cache records: a factory that initialises at
    random, without weights, would build another teacher on every worker."""
    recorded = zarr.open_group(str(location), mode="r").attrs["teachers"][0]["weights_sha256"]
    if weights_fingerprint(teacher) != recorded:
        raise InputError(
            f"the teacher built on dask worker {socket.gethostname()} has other weights than the one recorded in the cache; "
            "give `teacher_weights` (a factory without weights initialises at random on each worker)"
        )


# Batches a CUDA teacher may run ahead of the host copies it has queued.
MAX_IN_FLIGHT = 4


class _PinnedRing:
    """A few reusable page-locked host buffers: allocating pinned memory per batch is slow."""

    def __init__(self, size: int):
        self._buffers: list[torch.Tensor | None] = [None] * size
        self._next = 0

    def next(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        buffer = self._buffers[i]
        if buffer is None or buffer.dtype != dtype or buffer.shape[1:] != shape[1:] or len(buffer) < shape[0]:
            buffer = self._buffers[i] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buffer[: shape[0]]


def _store(writer: CacheWriter, split: Split, lengths: np.ndarray | None, config: CacheTeacherConfig, start: int,
           stored: dict[str, torch.Tensor], done: torch.cuda.Event | None, size: _FirstChunkSize | None = None) -> int:
    """Check one batch of stored values (after rounding to the cache dtype, so an overflow of
    float16 is caught as well as a NaN), hand it to the writer (and to `size`, which measures the
    first chunk's), and return its row count."""
    if done is not None:
        done.synchronize()
    # A pinned buffer is reused for a later batch: copy out of it.
    rows = {name: values.numpy().copy() if done is not None else values.numpy() for name, values in stored.items()}
    count = len(next(iter(rows.values())))
    bad_by_array = {name: start + nonfinite_rows(rows[name]) for name in writer.layout.float_arrays if name in rows}
    bad = sorted({int(r) for found in bad_by_array.values() for r in found})
    if bad:
        what = "features" if all(len(found) == 0 for name, found in bad_by_array.items() if name != "features") else "logits"
        hint = f" (or {what}{' / T' if what == 'logits' else ''} beyond float16's range: try `dtype` float32)" \
            if config.dtype == "float16" else ""
        raise PipelineError(
            f"teacher produced NaN or infinite {what}{hint} for samples {bad[:10]}"
            f"{' and more' if len(bad) > 10 else ''}; chunks already written are kept"
        )
    stop = start + count
    rows["index"] = np.arange(start, stop, dtype=np.int64)
    if split.labels is not None:
        rows["labels"] = split.labels[start:stop]
    if lengths is not None:
        rows["lengths"] = lengths[start:stop]
    if writer.layout.trained_mask:
        rows["trained"] = split.trained_positions(rows["index"]).astype(np.uint8)
    if writer.layout.views is not None:
        rows["view_seeds"] = view_seeds(config.view_seed, rows["index"], writer.layout.views)
    writer.write_rows(start, rows)
    if size is not None:  # after the writer has the rows: a refusal keeps the chunk they complete
        size.add(start, rows)
    return count


def chunk_batches(grid: ChunkGrid, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) rows of the teacher batches of `chunk` (of the read grid, Layout.grid): the
    chunk tiled from its first row in batches of `batch_size` (the last one shorter), never
    crossing into another chunk.

    This is what makes a resumed or distributed pass equal to a whole one, and a sharded cache
    equal to the unsharded one of the same teacher, byte for byte: CPU
    kernels may round differently for another batch size or company (an outside trial saw the
    same rows give other float16 values in a batch of 256 than of 32), so a row must meet the teacher
    in the same batch whichever chunks a run computes. A batch that crossed a chunk boundary
    would depend on whether the neighbouring chunk is computed in the same run."""
    start, stop = grid.rows(chunk)
    return [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]


def _input_batches(
    split: Split, writer: CacheWriter, units: list[int], batch_size: int, pin: bool, workers: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, inputs) for the batches of the chunks of the given write units (chunk_batches),
    in row order."""
    layout = writer.layout
    rows = (
        {"index": np.arange(start, stop, dtype=np.int64)}
        for unit in units for chunk in layout.chunks_of(unit) for start, stop in chunk_batches(layout.grid, chunk, batch_size)
    )
    for batch in joined_with_inputs(rows, split, workers):
        yield int(batch["index"][0]), batch["inputs"].pin_memory() if pin else batch["inputs"]


def _augmented_views(batches: Iterator[tuple[int, torch.Tensor]], augmentation: Augmentation, views: int, base_seed: int,
                     pin: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """Each batch as its samples' augmented views, the views of one sample adjacent: (B * V, ...).
    Sample i's view v is made from seed view_seeds(base_seed, i, V)[v], which the cache stores."""
    for start, inputs in batches:
        seeds = view_seeds(base_seed, np.arange(start, start + len(inputs)), views)
        augmented = augmentation(inputs.repeat_interleave(views, dim=0), seeds.reshape(-1))
        yield start, augmented.pin_memory() if pin else augmented
