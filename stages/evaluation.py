"""Measure a model on a split: quality, agreement with a cached teacher, size and speed.

    pipeline evaluate --model mlp-400 --weights data/runs/mlp-400-kd-s0/model.safetensors \\
        --dataset mnist-5k --split test --cache data/caches/cnn-mnist-5k-train-T4.zarr

Quality is measured per sample, or per valid token for a model with logits per token.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from stages.augment import Augmentation
from stages.cache.reader import CacheReader
from stages.data import Split, inputs_at, sequence_lengths
from stages.errors import InputError
from stages import losses
from stages.kinds.base import valid_positions


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 512, logit_pieces: bool = True) -> dict:
    """Accuracy, error count and mean NLL (nats) of `model` on a labelled split: per sample,
    or per valid token for a model with logits per token (then also `num_tokens`). A model with
    `hidden_and_head` (a causal LM) gives its logits a piece of positions at a time
    (stages.losses.rows_per_piece), unless `logit_pieces` is False: what evaluation holds then
    does not grow with batch x length x classes."""
    if split.labels is None:
        raise InputError(f"cannot evaluate on split {split.name!r}: it has no labels")
    model.eval()
    correct, nll, count, lengths = 0, 0.0, 0, None
    split_forward = getattr(model, "hidden_and_head", None) if logit_pieces else None
    for start in range(0, len(split), batch_size):
        index = np.arange(start, min(start + batch_size, len(split)), dtype=np.int64)
        inputs = inputs_at(split, index).to(device)
        outputs, head = split_forward(inputs) if split_forward is not None else (model(inputs), None)
        y = torch.from_numpy(split.labels[index]).to(device)
        if y.ndim == 2:  # per token: those before each row's length and, where the split says which, trained
            lengths = sequence_lengths(split, y.shape[1]) if lengths is None else lengths
            valid = torch.arange(y.shape[1], device=device) < torch.from_numpy(lengths[index]).to(device).unsqueeze(1)
            if hasattr(split, "trained_positions"):
                valid &= torch.from_numpy(split.trained_positions(index)).to(device)
            outputs, y = outputs[valid], y[valid]
        step = max(1, len(outputs)) if head is None else losses.rows_per_piece(outputs, head)
        for first in range(0, len(outputs), step):
            logits = (outputs[first : first + step] if head is None else head(outputs[first : first + step])).float()
            correct += int((logits.argmax(-1) == y[first : first + step]).sum())
            nll += float(F.cross_entropy(logits, y[first : first + step], reduction="sum"))
        count += len(y)
    if count == 0:
        raise InputError(f"cannot evaluate on split {split.name!r}: it has no rows (or no valid tokens)")
    metrics = {"accuracy": correct / count, "errors": count - correct, "nll": nll / count, "num_samples": len(split)}
    if lengths is not None:
        metrics["num_tokens"] = count
    return metrics


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
