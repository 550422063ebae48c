"""Cache kinds: what a cache stores per row of soft labels, and everything that depends on it.

A kind is one class here and one line in `KINDS`. It owns its arrays (names, shapes, dtypes,
fill values, dimension names), how the teacher's logits / T become stored rows (padding and
index types included), how stored rows become the teacher's probabilities, its top-1 class, its
training loss (the plain functions of stages.losses), its re-tempering, its checks for `verify`,
its statistics for `inspect` and how `combine` merges caches of it. The format, the writer, the
reader and the stages ask the kind and never branch on which one it is.

    dense  every class's logit / T: exact at any temperature
    topk   the K largest logits / T, their classes and the whole row's log-sum-exp: exact
           probabilities of the kept classes and the tail's total mass at the cache's T
    qtopk  the same K classes delta-coded, their probabilities in value_bits-bit codes and the
           tail's mass: a fraction of topk's bytes, the quantisation's error measured as written
    sampled  S classes drawn from softmax(logits / T), kept as the distinct ids and their
           counts, and the row's entropy: an unbiased estimate of the dense loss, at the cache's T only

A kind object holds no state: the shape parameters (classes, K, S, positions, dtype) come from the
cache's `Layout` (stages.cache.format), which every method takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from stages.errors import InputError, PipelineError
from stages.losses import (
    distillation_loss, retemper, sampled_distillation_loss, topk_distillation_loss, topk_teacher_log_probs,
)

if TYPE_CHECKING:
    from stages.cache.format import Layout

Rows = dict[str, np.ndarray]
Loss = tuple[torch.Tensor, dict[str, torch.Tensor]]


class ArraySpec(NamedTuple):
    """One array of a cache: its shape after the sample axis, dtype, fill value, whether it is
    compressed, its dimension names (the sample axis first) and, when compressed, its zstd level
    (None: the cache's, stages.cache.format.ZSTD_LEVEL)."""

    shape: tuple[int, ...]
    dtype: str
    fill: object
    compressed: bool
    dimensions: tuple[str, ...]
    zstd_level: int | None = None


# qtopk: its class deltas compress from 50 to 38 bytes per token at level 7 instead of 3 (top-128,
# vocabulary 8,192), at 74 MB/s of deltas on one core, 290,000 tokens a second, still far ahead
# of a teacher; beyond 7 they shrink little more and compress slower (level 9: 37 at 56 MB/s).
QTOPK_DELTA_LEVEL = 7
# The widest spread of logits / T a qtopk row's codes cover: a class this far below the top has
# p < 1e-28 of it; a masked class (-inf) is held there. And the smallest step (a float16
# normal), for a row whose kept values are all equal.
QTOPK_MAX_SPREAD = 64.0
QTOPK_MIN_STEP = 2.0**-14


def index_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds every class number 0..C-1."""
    return next(t for t in ("uint8", "uint16", "uint32") if num_classes - 1 <= np.iinfo(t).max)


def _zero_padding(values: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """`values` ((B, L, ...), any dtype torch computes in) with the positions where `padding`
    ((B, L) bool) is set zeroed."""
    if padding is None:
        return values
    return values.masked_fill(padding.reshape(*padding.shape, *(1,) * (values.ndim - padding.ndim)), 0)


def _over_positions(values: np.ndarray, rows: Rows) -> tuple:
    """A chunk's (sum, largest, entries) of a per-position statistic (rows, [positions]), over its
    rows, or over a token cache's valid tokens (padding does not count)."""
    if "lengths" in rows:
        values = values[np.arange(values.shape[1])[None, :] < rows["lengths"][:, None]]
    return values.sum().item(), values.max(initial=0).item(), int(values.size)


def _mean_and_max(parts: list[tuple]) -> dict:
    """Chunks' (sum, largest, entries) statistics as one mean and largest over all their entries."""
    total, count = sum(p[0] for p in parts), sum(p[2] for p in parts)
    return {"mean": total / count, "max": max(p[1] for p in parts), "entries": count}


class Kind:
    """The interface every kind implements (see the module docstring)."""

    name: str
    soft_arrays: tuple[str, ...]  # the arrays holding its soft labels
    last_axis: str  # the dimension name of a row's last axis
    exact_at_any_temperature: bool  # whether its probabilities re-temper exactly
    entropy_of: str  # what its entropy statistic is taken over
    can_combine: bool
    options: tuple[str, ...] = ()  # the config fields it takes (CacheTeacherConfig), set only for it
    option_defaults: dict = {}  # those of its options that may be left unset, and their values then
    # Whether its encoding loses more than the cache dtype's rounding: `encode` then also gives
    # "encoding_error" per position (see _encoding_error), which the writer sums per write unit.
    lossy: bool = False

    def width(self, layout: Layout) -> int:
        """The length of a row's last axis."""
        raise NotImplementedError

    def check(self, layout: Layout) -> None:
        """Raise an InputError for a layout this kind cannot store."""

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        """Its soft-label arrays, by name."""
        raise NotImplementedError

    def encode(self, rounded: torch.Tensor, layout: Layout, padding: torch.Tensor | None,
               scratch: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
               first_position: int = 0) -> dict[str, torch.Tensor]:
        """The stored rows for a batch of teacher logits / T already rounded to the cache dtype,
        with zeros at the token positions where `padding` is set. `scratch`, when given, is a
        float32 tensor of the same shape that the kind may overwrite (the caller's no longer
        needed logits / T): using it saves allocating (and page-faulting) one of that size.
        `row_index` (B,) int64, the rows' dataset indices, and `first_position`, that of the
        batch's first position (token or view), say where the rows are, for a kind whose values
        depend on it (sampled: its draws)."""
        raise NotImplementedError

    def probabilities(self, rows: Rows, num_classes: int, ratio: float) -> np.ndarray:
        """The teacher's probabilities at T' = T_cache / ratio over the kind's support (float64),
        from stored rows: every class, or the kept classes and the tail."""
        raise NotImplementedError

    def support(self, rows: Rows) -> np.ndarray | None:
        """The classes of `probabilities`' entries (..., K), or None for every class in order."""
        return None

    def confidence(self, probabilities: np.ndarray) -> np.ndarray:
        """The teacher's largest probability of a class, from `probabilities`."""
        return probabilities.max(-1)

    def label_probabilities(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """The probability of each label, when the kind knows it exactly (else None)."""
        return None

    def top1(self, rows: Rows) -> np.ndarray:
        """The teacher's most probable class of every stored row (..., without the last axis)."""
        raise NotImplementedError

    def label_nll(self, soft: dict[str, torch.Tensor], labels: torch.Tensor, temperature: float) -> float | None:
        """The summed NLL of `labels` under the teacher at T=1 (soft: (M, ...) rows), when the kind can tell."""
        return None

    def check_temperature(self, temperature: float, cache_temperature: float) -> None:
        """Raise an InputError when its rows cannot train at `temperature` (a cache at `cache_temperature`)."""

    def loss(self, student_logits: torch.Tensor, soft: dict[str, torch.Tensor], labels: torch.Tensor | None, *,
             alpha: float, temperature: float, cache_temperature: float) -> Loss:
        """The distillation loss of (M, C) student logits on (M, ...) rows of soft labels at
        temperature T (re-tempered from the cache's), mixed with the hard labels by alpha."""
        raise NotImplementedError

    def row_problem(self, rows: Rows, num_classes: int) -> str | None:
        """What is wrong with its stored values beyond non-finite floats, or None."""
        return None

    def verify_pairs(self, stored: Rows, fresh_rounded: torch.Tensor, fresh: Rows, padding: np.ndarray | None) -> dict[str, tuple]:
        """Pairs (fresh, stored) to compare besides its float arrays, from the teacher's fresh
        logits / T rounded to the cache dtype and the rows `fresh` encoded from them: what may
        legitimately differ in order is compared by value."""
        return {}

    # Its own figures for `inspect`: per chunk of `statistics_arrays` (out of core, as dask
    # tasks), then summed over the chunks of a complete cache.
    statistics_arrays: tuple[str, ...] = ()

    def chunk_statistics(self, rows: Rows) -> tuple:
        raise NotImplementedError

    def summarise(self, parts: list[tuple]) -> dict:
        raise NotImplementedError

    def combine(self, parts: list[Rows], rule: str, layout: Layout) -> Rows:
        """The soft-label arrays of the ensemble of caches' rows `parts`, by `rule` (kinds that can_combine)."""
        raise NotImplementedError


class Dense(Kind):
    """Every class's logit / T (float16 or float32; unwritten rows read as NaN)."""

    name = "dense"
    soft_arrays = ("logits",)
    last_axis = "class"
    exact_at_any_temperature = True
    entropy_of = "the full distribution"
    can_combine = True

    def width(self, layout):
        return layout.num_classes

    def arrays(self, layout):
        return {"logits": ArraySpec(layout.row_shape, layout.dtype, float("nan"), layout.codec != "none",
                                    ("sample", *layout.row_axes))}

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        return {"logits": _zero_padding(rounded, padding)}

    def probabilities(self, rows, num_classes, ratio):
        z = rows["logits"].astype(np.float64) * ratio
        z -= z.max(-1, keepdims=True)
        probs = np.exp(z)
        return probs / probs.sum(-1, keepdims=True)

    def label_probabilities(self, probabilities, labels):
        return np.take_along_axis(probabilities, labels[..., None], -1)[..., 0]

    def top1(self, rows):
        return rows["logits"].argmax(-1)

    def label_nll(self, soft, labels, temperature):
        logits = soft["logits"].float() * temperature
        return float(F.cross_entropy(logits, labels, reduction="sum"))

    def loss(self, student_logits, soft, labels, *, alpha, temperature, cache_temperature):
        teacher = retemper(soft["logits"], cache_temperature, temperature)
        return distillation_loss(student_logits, teacher, labels, alpha=alpha, temperature=temperature)

    def combine(self, parts, rule, layout):
        """mean-probs: log of the mean of the teachers' softmax(t_i / T) (its softmax is that
        mean); mean-logits: the mean of their t_i / T (stages.ensemble)."""
        stacked = torch.stack([torch.from_numpy(part["logits"]).float() for part in parts])
        if rule == "mean-logits":
            combined = stacked.mean(0)
        else:
            combined = torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - np.log(len(parts))
        return {"logits": combined.numpy().astype(layout.dtype)}


def _retempered(values: torch.Tensor, logsumexp: torch.Tensor, num_classes: int, ratio: float) -> np.ndarray:
    """A top-k row's kept probabilities and tail (float64, (..., K + 1); a tail of 0 when K = C)
    at T' = T_cache / ratio, from its kept logits / T and log-sum-exp; the tail's mass at another
    T is an estimate (stages.losses.topk_teacher_log_probs)."""
    probs = topk_teacher_log_probs(values, logsumexp, num_classes, ratio).double().exp().numpy()
    return probs if probs.shape[-1] > values.shape[-1] else np.concatenate([probs, np.zeros((*probs.shape[:-1], 1))], -1)


def _top_and_logsumexp(rounded: torch.Tensor, k: int, scratch: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The k largest of each row of `rounded` (float32, descending), their classes (int64), the
    log-sum-exp of the whole row and the probability of the classes not kept (float32).

    One float32 copy of the rounded row (into `scratch` when given) serves the top k and,
    overwritten in place, the log-sum-exp (taken about the row's largest value, the first of
    the top k): at a language model's vocabulary each further pass over B x L x V costs as much
    as the teacher's head (`pipeline bench`, section 10). The kept classes are summed apart from
    the others, so that the tail's mass is the others' share to float32's relative precision
    (1 - the kept probability would round a tail below 1e-7 to noise) and exactly 0 when k = C."""
    wide = rounded.to(torch.float32, copy=True) if scratch is None else scratch.copy_(rounded)
    values, indices = wide.topk(k, dim=-1)
    largest = values[..., :1]
    others = wide.scatter_(-1, indices, float("-inf")).sub_(largest).exp_().sum(-1)
    total = others + (values - largest).exp().sum(-1)
    return values, indices, total.log().add_(largest[..., 0]), others / total


class TopK(Kind):
    """The K largest logits / T of each row in descending order, their classes (the smallest
    unsigned type holding C - 1) and the log-sum-exp of the whole row (float32)."""

    name = "topk"
    soft_arrays = ("topk_values", "topk_indices", "logsumexp")
    last_axis = "rank"
    # At another T the kept classes' ratios re-temper exactly, the tail's mass only as an estimate.
    exact_at_any_temperature = False
    entropy_of = "the kept classes and the tail (a lower bound)"
    can_combine = False
    options = ("top_k",)
    statistics_arrays = ("topk_values", "logsumexp")

    def width(self, layout):
        return layout.top_k

    def check(self, layout):
        if not (layout.top_k is not None and 1 <= layout.top_k <= layout.num_classes):
            raise InputError(f"`top_k` must be between 1 and the number of classes ({layout.num_classes}), got {layout.top_k}")

    def arrays(self, layout):
        soft, ranked = layout.codec != "none", ("sample", *layout.row_axes)
        return {
            "topk_values": ArraySpec(layout.row_shape, layout.dtype, float("nan"), soft, ranked),
            "topk_indices": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, soft, ranked),
            "logsumexp": ArraySpec(layout.position_shape, "float32", float("nan"), soft, ("sample", *layout.position_axes)),
        }

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        values, indices, logsumexp, _ = _top_and_logsumexp(rounded, layout.top_k, scratch)
        # Padding is zeroed while the classes are int64: torch has no masked_fill for uint16/32.
        return {
            "topk_values": _zero_padding(values.to(rounded.dtype), padding),
            "topk_indices": _zero_padding(indices, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            "logsumexp": _zero_padding(logsumexp, padding),
        }

    def probabilities(self, rows, num_classes, ratio):
        if ratio == 1.0:  # exact
            kept = np.exp(rows["topk_values"].astype(np.float64) - rows["logsumexp"][..., None])
            return np.concatenate([kept, np.clip(1.0 - kept.sum(-1, keepdims=True), 0.0, 1.0)], axis=-1)
        return _retempered(torch.from_numpy(rows["topk_values"]), torch.from_numpy(rows["logsumexp"]), num_classes, ratio)

    def support(self, rows):
        return rows["topk_indices"].astype(np.int64)

    def confidence(self, probabilities):
        # The tail bucket is many classes, not one: a top-k row's confidence is its first kept class.
        return probabilities[..., 0]

    def top1(self, rows):
        return rows["topk_indices"][..., 0].astype(np.int64)

    def loss(self, student_logits, soft, labels, *, alpha, temperature, cache_temperature):
        return topk_distillation_loss(
            student_logits, soft["topk_values"], soft["topk_indices"], soft["logsumexp"], labels,
            alpha=alpha, temperature=temperature, cache_temperature=cache_temperature,
        )

    def row_problem(self, rows, num_classes):
        if "topk_indices" in rows and rows["topk_indices"].max() >= num_classes:
            return "top-k class indices outside [0, num_classes)"
        return None

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        # Near-ties may order the top k differently: check that the stored classes have the
        # stored values in the fresh row, rather than comparing class numbers.
        at_stored = fresh_rounded.float().cpu().gather(-1, torch.from_numpy(stored["topk_indices"].astype(np.int64))).numpy()
        if padding is not None:
            at_stored[padding] = 0
        return {"topk_indices": (at_stored, stored["topk_values"].astype(np.float32))}

    def chunk_statistics(self, rows):
        """One chunk's sum and largest tail mass, 1 - sum(exp(v - lse)) at the cache's T, over its
        rows (or valid tokens), and their count."""
        return _over_positions(
            np.clip(1.0 - np.exp(rows["topk_values"].astype(np.float32) - rows["logsumexp"][..., None]).sum(-1), 0.0, 1.0), rows)

    def summarise(self, parts):
        return {"tail_mass": _mean_and_max(parts)}


def dequantised_log_probs(class_deltas: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                          tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A qtopk row's kept classes (int64, ascending) and their log-probabilities at the cache's T
    (float32), from its stored arrays (class_deltas, codes (..., K); scale, tail (...)): the
    decoding the README gives in numpy. Padding decodes to class 0 throughout; its values do not count."""
    classes = class_deltas.long().cumsum(-1)
    relative = codes.float() * -scale.float().unsqueeze(-1)  # log(p_k / p_top1)
    # log(1 - tail) as log1p: 1 - tail in float32 would lose a tail below 6e-8 (a sharp row's) entirely.
    kept_mass = torch.log1p(-tail.float().clamp(max=1.0 - 2.0**-24))
    return classes, relative - torch.logsumexp(relative, -1, keepdim=True) + kept_mass.unsqueeze(-1)


class QuantisedTopK(Kind):
    """The K most probable classes of each row at T with their probabilities in `value_bits`
    bits (1-8, default 8), the tail's mass beside them.

    qtopk_class_deltas  the kept classes in ascending order, delta-coded: the first class, then
                        each minus the one before (the smallest unsigned type holding C - 1).
                        Small numbers: zstd (at QTOPK_DELTA_LEVEL) keeps them in a few bits each.
    qtopk_codes         uint8, in the same order: q_k = round((v_1 - v_k) / scale), where v are
                        the logits / T and v_1 the row's largest, so the top class has code 0.
    qtopk_scale         float16: (v_1 - v_K) / (2^value_bits - 1), the step of the codes.
    qtopk_tail          float32: 1 - the kept classes' probability, the mass of all the others
                        (float16 would round a sharp row's tail of 1e-5 to 0, or, near 1, a
                        flat row's kept mass of 5e-5 to 0).

    Decoding: classes = cumsum(deltas); w_k = exp(-q_k * scale); p_k = (1 - tail) w_k / sum(w).
    The kept mass is exact (to float32), so the K + 1 outcomes the top-k loss compares sum to 1
    and no rounding can push the tail below 0; within the kept classes the rounding moves each
    log-probability by at most scale / 2 before the normalisation. What it moves them by is
    measured when the rows are written (the teacher's unquantised values are at hand then) and
    summed per write unit into `encoding_error`, which `inspect` reports: the mean and largest
    absolute error in probability over the K + 1 outcomes and the KL(unquantised || quantised)."""

    name = "qtopk"
    soft_arrays = ("qtopk_class_deltas", "qtopk_codes", "qtopk_scale", "qtopk_tail")
    last_axis = "kept"
    exact_at_any_temperature = False  # as topk: the kept classes re-temper, the tail's mass is an estimate
    entropy_of = "the kept classes and the tail (a lower bound), as quantised"
    can_combine = False
    options = ("top_k", "value_bits")
    option_defaults = {"value_bits": 8}
    statistics_arrays = ("qtopk_tail",)
    lossy = True

    def width(self, layout):
        return layout.top_k

    def check(self, layout):
        TopK.check(self, layout)
        if not (layout.value_bits is not None and 1 <= layout.value_bits <= 8):
            raise InputError(f"`value_bits` must be between 1 and 8 (codes are stored as uint8), got {layout.value_bits}")

    def arrays(self, layout):
        # Always zstd, whatever the cache's codec: integers, and a few floats per position.
        kept, position = ("sample", *layout.row_axes), ("sample", *layout.position_axes)
        return {
            "qtopk_class_deltas": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, True, kept, QTOPK_DELTA_LEVEL),
            "qtopk_codes": ArraySpec(layout.row_shape, "uint8", 0, True, kept),
            "qtopk_scale": ArraySpec(layout.position_shape, "float16", float("nan"), True, position),
            "qtopk_tail": ArraySpec(layout.position_shape, "float32", float("nan"), True, position),
        }

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        values, indices, logsumexp, tail = _top_and_logsumexp(rounded, layout.top_k, scratch)
        levels = 2**layout.value_bits - 1
        below_top = (values[..., :1] - values).clamp_(max=QTOPK_MAX_SPREAD)  # v_1 - v_k >= 0; a masked class (-inf) capped
        # The step, rounded up to float16 so that the last class's code stays within the levels.
        step = (below_top[..., -1] / levels).clamp_(min=QTOPK_MIN_STEP)
        scale = step.half()
        # The next float16 up, by its bits (the step is positive and finite): torch.nextafter
        # has no CUDA kernel for float16 before torch 2.6, which the torch>=2.2 range allows.
        scale = torch.where(scale.float() < step, (scale.view(torch.int16) + 1).view(torch.float16), scale)
        codes = (below_top / scale.float().unsqueeze(-1)).round_().clamp_(0, levels)
        log_p = values - logsumexp.unsqueeze(-1)
        classes, order = indices.sort(-1)
        codes = codes.gather(-1, order)
        deltas = torch.diff(classes, dim=-1, prepend=torch.zeros_like(classes[..., :1]))
        _, decoded = dequantised_log_probs(deltas, codes, scale, tail)
        # Padding is zeroed while the classes are int64: torch has no masked_fill for uint16/32.
        return {
            "qtopk_class_deltas": _zero_padding(deltas, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            "qtopk_codes": _zero_padding(codes, padding).to(torch.uint8),
            "qtopk_scale": _zero_padding(scale, padding),
            "qtopk_tail": _zero_padding(tail, padding),
            "encoding_error": _zero_padding(_encoding_error(log_p.gather(-1, order), decoded), padding),
        }

    def _decoded(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        classes, log_p = dequantised_log_probs(*(torch.from_numpy(rows[name]) for name in self.soft_arrays))
        return classes.numpy(), log_p.double().numpy()

    def probabilities(self, rows, num_classes, ratio):
        classes, log_p = self._decoded(rows)
        if ratio == 1.0:  # the tail as stored: exact, where 1 - the kept mass would round a small one away
            return np.concatenate([np.exp(log_p), rows["qtopk_tail"].astype(np.float64)[..., None]], axis=-1)
        return _retempered(torch.from_numpy(log_p), torch.zeros(log_p.shape[:-1]), num_classes, ratio)

    def support(self, rows):
        return self._decoded(rows)[0]

    def confidence(self, probabilities):
        return probabilities[..., :-1].max(-1)  # the tail bucket is many classes, not one

    def top1(self, rows):
        """The class with code 0 (the largest probability; the smallest such class on a tie)."""
        classes = rows["qtopk_class_deltas"].astype(np.int64).cumsum(-1)
        return np.take_along_axis(classes, rows["qtopk_codes"].argmin(-1)[..., None], -1)[..., 0]

    def loss(self, student_logits, soft, labels, *, alpha, temperature, cache_temperature):
        classes, log_p = dequantised_log_probs(*(soft[name] for name in self.soft_arrays))
        return topk_distillation_loss(student_logits, log_p, classes, torch.zeros(log_p.shape[:-1], device=log_p.device), labels,
                                      alpha=alpha, temperature=temperature, cache_temperature=cache_temperature)

    def row_problem(self, rows, num_classes):
        if "qtopk_class_deltas" in rows:
            deltas = rows["qtopk_class_deltas"].astype(np.int64)
            if deltas.sum(-1).max(initial=0) >= num_classes:
                return "qtopk classes outside [0, num_classes)"
            repeated = deltas[..., 1:] == 0  # at a valid position the kept classes strictly increase
            if "lengths" in rows:
                repeated &= (np.arange(repeated.shape[1])[None, :] < rows["lengths"][:, None])[..., None]
                found = repeated.any()
            else:  # which positions are padding only the lengths tell: a valid one has a delta above 0
                found = (repeated & deltas[..., 1:].any(-1, keepdims=True)).any() if deltas.shape[-1] > 1 else False
            if found:
                return "qtopk classes that do not strictly increase"
        if "qtopk_tail" in rows and not ((rows["qtopk_tail"] >= 0) & (rows["qtopk_tail"] <= 1)).all():
            return "qtopk tail masses outside [0, 1]"
        if "qtopk_scale" in rows and (rows["qtopk_scale"] < 0).any():
            return "negative qtopk scales"
        return None

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        # As topk: near-ties may change which classes are kept, so the stored classes are looked
        # up in the fresh row, and what they hold there must round to the stored codes (a step
        # of the stored scale apart, give or take the float rounding verify allows elsewhere).
        classes = torch.from_numpy(stored["qtopk_class_deltas"].astype(np.int64)).cumsum(-1)
        row = fresh_rounded.float().cpu()
        below_top = (row.amax(-1, keepdim=True) - row.gather(-1, classes)).clamp_(max=QTOPK_MAX_SPREAD).numpy()
        scale = stored["qtopk_scale"].astype(np.float32)[..., None]
        codes = stored["qtopk_codes"].astype(np.float32)
        slack = (1e-3 + float(np.finfo(np.float16).eps) * np.abs(below_top)) / np.maximum(scale, QTOPK_MIN_STEP)
        in_step = np.abs(below_top / np.maximum(scale, QTOPK_MIN_STEP) - codes) <= 0.5 + slack
        found = np.where(in_step, codes, below_top / np.maximum(scale, QTOPK_MIN_STEP))
        if padding is not None:
            found[padding] = 0
        return {"qtopk_codes": (found, codes)}

    def chunk_statistics(self, rows):
        """One chunk's sum and largest tail mass over its rows (or valid tokens), and their count."""
        return _over_positions(rows["qtopk_tail"].astype(np.float32), rows)

    def summarise(self, parts):
        return {"tail_mass": _mean_and_max(parts)}


def _encoding_error(exact: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """Per row, (..., 3) float32: the sum and the largest absolute difference in probability over
    the K kept classes, and KL(exact || encoded), from their log-probabilities (..., K) over the
    same classes. The tail, the K + 1-th outcome, is stored exact (both sides hold the same mass),
    so it adds 0 to each."""
    p = exact.double().exp()
    difference = (p - encoded.double().exp()).abs()
    # A class the teacher masks (p = 0, log p = -inf) adds nothing, rather than 0 * -inf = NaN.
    kl = torch.where(p > 0, p * (exact.double() - encoded.double()), 0.0).sum(-1)
    return torch.stack([difference.sum(-1), difference.amax(-1), kl.clamp(min=0.0)], -1).float()


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch holds it."""
    return value - 2**64 if value >= 2**63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as unsigned 64-bit integers: torch shifts int64 arithmetically (sign bits in)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's step (Steele, Lea & Flood 2014) on int64 tensors, whose arithmetic wraps as uint64's does."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def draw_uniforms(seed: int, row_index: torch.Tensor, positions: torch.Tensor, draws: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, (B, P, draws)) that are a function of (seed, a row's dataset
    index, position, draw number) alone: counter-based, so a row's draws do not depend on the
    batch, the piece of positions or the process that computes them, and can be redrawn."""
    device = positions.device
    key = _mix(torch.full((1, 1, 1), seed, dtype=torch.int64, device=device))
    key = _mix(key ^ row_index.to(device, torch.int64).view(-1, 1, 1))
    key = _mix(key ^ positions.view(1, -1, 1))
    key = _mix(key ^ torch.arange(draws, device=device).view(1, 1, -1))
    return _shift_right(key, 11).double() * 2.0**-53  # the top 53 bits: every float64 in [0, 1) a multiple of 2^-53


class Sampled(Kind):
    """Random-sampling KD (Anshumann et al., ACL 2025): S classes drawn with replacement from
    softmax(rounded logits / T) per row (or token), stored as the distinct ids in ascending order
    (the smallest unsigned type holding C - 1) with their counts (uint8), unused slots id 0 and
    count 0, and the row's entropy at T (float32, for the loss's value and the checks). Draw j
    of position l of the row with dataset index i is the inverse CDF of the uniform
    draw_uniforms(sample_seed, i, l, j): the cache records sample_seed and every row's index."""

    name = "sampled"
    soft_arrays = ("sampled_ids", "sampled_counts", "entropy")
    last_axis = "draw"
    exact_at_any_temperature = False  # at no other T: the draws are at the cache's
    entropy_of = "the drawn classes' counts / S (an estimate; the `entropy` array holds the teacher's)"
    can_combine = False
    options = ("samples",)
    statistics_arrays = ("sampled_counts",)

    def width(self, layout):
        return layout.samples

    def check(self, layout):
        if not (layout.samples is not None and 1 <= layout.samples <= 255):
            raise InputError(f"`samples` must be between 1 and 255 (counts are stored as uint8), got {layout.samples}")

    def arrays(self, layout):
        # Always zstd, whatever the cache's codec: integers with zeros in every unused slot and
        # at padding compress several-fold, and decode at a fraction of the cost of floats.
        drawn = ("sample", *layout.row_axes)
        return {
            "sampled_ids": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, True, drawn),
            "sampled_counts": ArraySpec(layout.row_shape, "uint8", 0, True, drawn),
            "entropy": ArraySpec(layout.position_shape, "float32", float("nan"), True, ("sample", *layout.position_axes)),
        }

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        if row_index is None:
            raise PipelineError("internal: a sampled cache's draws need the rows' dataset indices")
        # float64 throughout: at 150,000 classes a float32 cumulative sum would lose the small classes' share.
        z = rounded.double() if rounded.ndim == 3 else rounded.double().unsqueeze(1)  # (B, P, C)
        # A class at -inf (a masked one) gets weight 0 and, at the lowest finite value, 0 * z = 0 in the entropy.
        z = z.sub_(z.amax(-1, keepdim=True)).clamp_(min=torch.finfo(z.dtype).min)
        weights = z.exp()
        cdf = weights.cumsum(-1)
        total = cdf[..., -1:]
        entropy = total[..., 0].log() - (weights * z).sum(-1) / total[..., 0]  # H = log Z - sum_c e^z_c z_c / Z
        positions = torch.arange(first_position, first_position + z.shape[1], device=z.device)
        uniforms = draw_uniforms(layout.sample_seed, row_index, positions, layout.samples)
        drawn = torch.searchsorted(cdf, uniforms * total, right=True).clamp_(max=layout.num_classes - 1).sort(-1).values
        # Distinct ids with counts: slot k holds the k-th distinct id of the sorted draws.
        new = torch.ones_like(drawn, dtype=torch.bool)
        new[..., 1:] = drawn[..., 1:] != drawn[..., :-1]
        slot = new.long().cumsum(-1) - 1
        ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
        counts = torch.zeros_like(drawn).scatter_add_(-1, slot, torch.ones_like(drawn))
        if rounded.ndim == 2:
            ids, counts, entropy = ids[:, 0], counts[:, 0], entropy[:, 0]
        return {
            "sampled_ids": _zero_padding(ids, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            "sampled_counts": _zero_padding(counts, padding).to(torch.uint8),
            "entropy": _zero_padding(entropy.float(), padding),
        }

    def probabilities(self, rows, num_classes, ratio):
        """The share of the draws each drawn class got: an unbiased estimate of its probability."""
        if ratio != 1.0:
            raise InputError("a sampled cache's classes were drawn at its own temperature and cannot be re-tempered")
        counts = rows["sampled_counts"].astype(np.float64)
        return counts / counts.shape[-1]

    def support(self, rows):
        return rows["sampled_ids"].astype(np.int64)

    def top1(self, rows):
        """The most drawn class (the smallest of those drawn most often)."""
        most = rows["sampled_counts"].argmax(-1)[..., None]
        return np.take_along_axis(rows["sampled_ids"], most, -1)[..., 0].astype(np.int64)

    def check_temperature(self, temperature, cache_temperature):
        if temperature != cache_temperature:
            raise InputError(f"a sampled cache holds classes drawn at T={cache_temperature:g}: it trains at that temperature only, "
                             f"not at {temperature:g} (leave `temperature` unset)")

    def loss(self, student_logits, soft, labels, *, alpha, temperature, cache_temperature):
        self.check_temperature(temperature, cache_temperature)
        return sampled_distillation_loss(student_logits, soft["sampled_ids"], soft["sampled_counts"], soft["entropy"], labels,
                                         alpha=alpha, temperature=temperature)

    def row_problem(self, rows, num_classes):
        if "sampled_ids" in rows and rows["sampled_ids"].max(initial=0) >= num_classes:
            return "sampled class ids outside [0, num_classes)"
        if "sampled_counts" in rows:
            counts = rows["sampled_counts"]
            sums, draws = counts.sum(-1, dtype=np.int64), counts.shape[-1]
            if "lengths" in rows:
                padding = np.arange(sums.shape[1])[None, :] >= rows["lengths"][:, None]
                wrong = not np.array_equal(sums, np.where(padding, 0, draws))
            else:  # which positions are padding, only the lengths tell: each sums to S or to 0
                wrong = not ((sums == draws) | (sums == 0)).all()
            if wrong:
                return "sampled counts that do not sum to the number of draws (0 at padding)"
        if "entropy" in rows and not ((rows["entropy"] >= -1e-4) & (rows["entropy"] <= np.log(num_classes) + 1e-4)).all():
            return "entropies outside [0, log(num_classes)]"
        return None

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        # Redrawn from the fresh logits with the recorded seeds: for a deterministic teacher, the same draws exactly.
        return {name: (fresh[name].astype(np.int64), stored[name].astype(np.int64)) for name in ("sampled_ids", "sampled_counts")}

    def chunk_statistics(self, rows):
        """One chunk's sum and largest number of distinct classes drawn, per row (or valid token), and their count."""
        return _over_positions((rows["sampled_counts"] > 0).sum(-1), rows)

    def summarise(self, parts):
        return {"distinct_sampled_ids": _mean_and_max(parts)}


# The kinds this tool writes and reads, by the name caches record in their `kind` attribute.
KINDS: dict[str, Kind] = {"dense": Dense(), "topk": TopK(), "qtopk": QuantisedTopK(), "sampled": Sampled()}
