"""Measure a model on a split: quality, agreement with a cached teacher, size and speed.

    pipeline evaluate --model mlp-400 --weights data/runs/mlp-400-kd-s0/model.safetensors \\
        --dataset mnist-5k --split test --cache data/caches/cnn-mnist-5k-train-T4.zarr

Quality is measured per sample, or per valid token for a model with logits per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stages import losses
from stages.augment import Augmentation
from stages.cache.reader import CacheReader
from stages.data import Split, inputs_at, sequence_lengths
from stages.errors import InputError
from stages.kinds.base import valid_positions


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 512, logit_pieces: bool = True) -> dict:
    """Accuracy, error count and mean NLL (nats) of `model` on a labelled split: per sample,
    or per valid token for a model with logits per token (then also `num_tokens`). A model with
    `hidden_and_head` (a causal LM) gives its logits a piece of positions at a time
    (stages.losses.rows_per_piece), unless `logit_pieces` is False: what evaluation holds then
    does not grow with batch x length x classes."""
    correct, nll, count, per_token = 0, 0.0, 0, False
    for (logits,), y, tokens in _logit_pieces([model], split, device, batch_size, logit_pieces):
        correct += int((logits.argmax(-1) == y).sum())
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
        per_token |= tokens
    metrics = {"accuracy": correct / count, "errors": count - correct, "nll": nll / count, "num_samples": len(split)}
    if per_token:
        metrics["num_tokens"] = count
    return metrics


@torch.inference_mode()
def top_mass(model: torch.nn.Module, split: Split, device: torch.device, top_ks: tuple[int, ...], batch_size: int = 64) -> dict[int, float]:
    """The mean probability (at temperature 1) that `model`'s K most likely classes hold on the
    split's valid tokens (or samples), for each K of `top_ks`: how much of its distribution a
    top-K cache of it keeps."""
    sums, count = dict.fromkeys(top_ks, 0.0), 0
    for (logits,), _, _ in _logit_pieces([model], split, device, batch_size):
        ranked = logits.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
        for k in top_ks:
            sums[k] += float(ranked[:, min(k, ranked.shape[1]) - 1].sum())
        count += len(logits)
    return {k: total / count for k, total in sums.items()}


@torch.inference_mode()
def kl_from_reference(reference: torch.nn.Module, models: list[torch.nn.Module], split: Split, device: torch.device,
                      batch_size: int = 64) -> list[float]:
    """The mean KL(reference || model) in nats (at temperature 1) on the split's valid tokens (or
    samples), for each of `models`: how far each is from a teacher, a lower-variance measure than
    its loss on the labels. The reference runs once for all the models, and every model's logits
    are held a piece of positions at a time, never (batch, length, classes) at once."""
    sums, count = [0.0] * len(models), 0
    for (target, *logits), _, _ in _logit_pieces([reference, *models], split, device, batch_size):
        p_log = target.log_softmax(-1)
        for i, student in enumerate(logits):
            sums[i] += float((p_log.exp() * (p_log - student.log_softmax(-1))).sum())
        count += len(target)
    return [total / count for total in sums]


def _logit_pieces(models: list[torch.nn.Module], split: Split, device: torch.device, batch_size: int,
                  logit_pieces: bool = True) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, bool]]:
    """Each model's float32 logits on the same piece of the split's labelled rows (per sample),
    or of their valid tokens (per token: those before each row's length and, where the split says
    which, trained), with the labels there and whether they are per token. A model with
    `hidden_and_head` gives its logits a piece of positions at a time (stages.losses.rows_per_piece),
    unless `logit_pieces` is False. Raises InputError on a split without labels or valid rows."""
    if split.labels is None:
        raise InputError(f"cannot evaluate on split {split.name!r}: it has no labels")
    for model in models:
        model.eval()
    forwards = [getattr(model, "hidden_and_head", None) if logit_pieces else None for model in models]
    lengths, count = None, 0
    for start in range(0, len(split), batch_size):
        index = np.arange(start, min(start + batch_size, len(split)), dtype=np.int64)
        inputs = inputs_at(split, index).to(device)
        outputs = [forward(inputs) if forward is not None else (model(inputs), None) for model, forward in zip(models, forwards, strict=True)]
        y = torch.from_numpy(split.labels[index]).to(device)
        per_token = y.ndim == 2
        if per_token:
            lengths = sequence_lengths(split, y.shape[1]) if lengths is None else lengths
            valid = torch.arange(y.shape[1], device=device) < torch.from_numpy(lengths[index]).to(device).unsqueeze(1)
            if hasattr(split, "trained_positions"):
                valid &= torch.from_numpy(split.trained_positions(index)).to(device)
            outputs, y = [(hidden[valid], head) for hidden, head in outputs], y[valid]
        step = min((losses.rows_per_piece(hidden, head) for hidden, head in outputs if head is not None), default=max(1, len(y)))
        for first in range(0, len(y), step):
            yield [(hidden[first : first + step] if head is None else head(hidden[first : first + step])).float()
                   for hidden, head in outputs], y[first : first + step], per_token
        count += len(y)
    if count == 0:
        raise InputError(f"cannot evaluate on split {split.name!r}: it has no rows (or no valid tokens)")


@torch.inference_mode()
def teacher_agreement(model: torch.nn.Module, cache: CacheReader, split: Split, device: torch.device,
                      augment: Augmentation | None = None) -> float:
    """The fraction of the cache's rows (or valid tokens, or views: each replayed by `augment`
    from its seed) on which the model's top-1 class is the cached teacher's. `split` must be the
    cache's own split (callers check it)."""
    model.eval()
    views = cache.layout.views
    if views is not None and augment is None:
        raise InputError("a cache of augmented views needs the augmentation that made them, to replay each view")
    agree, count = 0, 0
    for chunk in range(cache.grid.num_chunks):
        rows = cache.read_chunk(chunk)
        teacher = cache.layout.soft_kind.top1(rows)
        inputs = split.inputs(rows["index"])
        if views is not None:
            inputs = augment(inputs.repeat_interleave(views, dim=0), rows["view_seeds"].reshape(-1))
        predicted = model(inputs.to(device)).argmax(-1).cpu().numpy().reshape(teacher.shape)
        same = predicted == teacher
        if "lengths" in rows:
            same = same[valid_positions(rows, same.shape[1])]
        agree += int(same.sum())
        count += same.size
    return agree / count


@torch.inference_mode()
def speed(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int, batches: int = 20,
          warmup: int = 3) -> dict:
    """Inference latency of one batch (median and spread over `batches` timed forwards, after
    `warmup`) and the throughput it implies, on the split's first rows."""
    model.eval()
    inputs = split.inputs(np.arange(min(batch_size, len(split)), dtype=np.int64)).to(device)
    seconds = []
    for step in range(warmup + batches):
        started = time.perf_counter()
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "batch_size": len(inputs),
        "latency_ms_median": 1000 * median,
        "latency_ms_min": 1000 * min(seconds),
        "latency_ms_max": 1000 * max(seconds),
        "samples_per_second": len(inputs) / median,
    }
