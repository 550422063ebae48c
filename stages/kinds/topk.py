"""topk: the K largest logits / T of each row in descending order, their classes and the
log-sum-exp of the whole row. Exact probabilities of the kept classes and the tail's total mass
at the cache's T; at another T the kept classes' ratios re-temper exactly, the tail's mass only
as an estimate (stages.losses.topk_teacher_log_probs)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.errors import InputError
from stages.kinds.base import (
    ArraySpec,
    Kind,
    KindOptions,
    any_in_use,
    index_dtype,
    mean_and_max,
    np,
    option,
    over_positions,
    torch,
    zero_padding,
)
from stages.lazy import lazy_module

losses = lazy_module("stages.losses")


@dataclass(frozen=True)
class TopKOptions(KindOptions):
    top_k: int | None = option(help="Classes kept per row (or token).", low=1)

    def suffix(self, kind):
        return f"-top{self.top_k}"


def check_top_k(layout) -> None:
    """K between 1 and the number of classes."""
    if not 1 <= layout.options.top_k <= layout.num_classes:
        raise InputError(f"`top_k` must be between 1 and the number of classes ({layout.num_classes}), got {layout.options.top_k}")


def retempered(values: torch.Tensor, logsumexp: torch.Tensor, num_classes: int, ratio: float) -> np.ndarray:
    """A top-k row's kept probabilities and tail (float64, (..., K + 1); a tail of 0 when K = C)
    at T' = T_cache / ratio, from its kept logits / T and log-sum-exp; the tail's mass at another
    T is an estimate (stages.losses.topk_teacher_log_probs)."""
    probs = losses.topk_teacher_log_probs(values, logsumexp, num_classes, ratio).double().exp().numpy()
    return probs if probs.shape[-1] > values.shape[-1] else np.concatenate([probs, np.zeros((*probs.shape[:-1], 1))], -1)


def top_and_logsumexp(rounded: torch.Tensor, k: int, scratch: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
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


def ordered_keys(values: np.ndarray) -> np.ndarray:
    """Integers in the order of finite floats `values` (float16 or float32), -0 equal to 0: numpy
    compares float16 in software, 4x slower than these few integer operations."""
    bits = values.view(f"i{values.itemsize}")
    negative = (bits >> (8 * values.itemsize - 1)) & 1  # 1 for a negative float, else 0
    # A negative float's magnitude bits flipped, then one added: -0 becomes 0, and below it in order.
    return (bits ^ (negative * ((1 << (8 * values.itemsize - 1)) - 1)).astype(bits.dtype)) + negative.astype(bits.dtype)


class TopK(Kind):
    """The K largest logits / T of each row in descending order, their classes (the smallest
    unsigned type holding C - 1) and the log-sum-exp of the whole row (float32)."""

    name = "topk"
    summary = "the --top-k largest logits / T per row or token, their classes and the row's log-sum-exp"
    Options = TopKOptions
    soft_arrays = ("topk_values", "topk_indices", "logsumexp")
    last_axis = "rank"
    # At another T the kept classes' ratios re-temper exactly, the tail's mass only as an estimate.
    exact_at_any_temperature = False
    entropy_of = "the kept classes and the tail (a lower bound)"
    can_combine = False
    statistics_arrays = ("topk_values", "logsumexp")
    class_ids_array = "topk_indices"

    def width(self, layout):
        return layout.options.top_k

    def check(self, layout):
        check_top_k(layout)

    def arrays(self, layout):
        soft, ranked = layout.codec != "none", ("sample", *layout.row_axes)
        return {
            "topk_values": ArraySpec(layout.row_shape, layout.dtype, float("nan"), soft, ranked),
            "topk_indices": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, soft, ranked),
            "logsumexp": ArraySpec(layout.position_shape, "float32", float("nan"), soft, ("sample", *layout.position_axes)),
        }

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        values, indices, logsumexp, _ = top_and_logsumexp(rounded, layout.options.top_k, scratch)
        # Padding is zeroed while the classes are int64: torch has no masked_fill for uint16/32.
        return {
            "topk_values": zero_padding(values.to(rounded.dtype), padding),
            "topk_indices": zero_padding(indices, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            "logsumexp": zero_padding(logsumexp, padding),
        }

    def probabilities(self, rows, num_classes, ratio):
        if ratio == 1.0:  # exact
            kept = np.exp(rows["topk_values"].astype(np.float64) - rows["logsumexp"][..., None])
            return np.concatenate([kept, np.clip(1.0 - kept.sum(-1, keepdims=True), 0.0, 1.0)], axis=-1)
        return retempered(torch.from_numpy(rows["topk_values"]), torch.from_numpy(rows["logsumexp"]), num_classes, ratio)

    def support(self, rows):
        return rows["topk_indices"].astype(np.int64)

    def confidence(self, probabilities):
        # The tail bucket is many classes, not one: a top-k row's confidence is its first kept class.
        return probabilities[..., 0]

    def top1(self, rows):
        return rows["topk_indices"][..., 0].astype(np.int64)

    def support_log_probs(self, student_over_t, soft, *, ratio):
        teacher = losses.topk_teacher_log_probs(soft["topk_values"], soft["logsumexp"], student_over_t.shape[-1], ratio)
        return teacher, losses.topk_student_log_probs(student_over_t, soft["topk_indices"].long())

    def loss_problems(self, soft, num_classes):
        return {"non-finite topk_values": ~torch.isfinite(soft["topk_values"].sum(-1, dtype=torch.float32)).all(),
                "non-finite logsumexp": ~torch.isfinite(soft["logsumexp"]).all(),
                f"topk_indices outside [0, {num_classes})": (soft["topk_indices"].long() >= num_classes).any()}

    def row_problem(self, rows, layout):
        """As its encoder writes them: K distinct classes in [0, C), their values / T in
        descending order, and a log-sum-exp of the whole row that leaves the kept classes at most
        all of its mass."""
        problem = super().row_problem(rows, layout)
        if problem or not {"topk_values", "topk_indices", "logsumexp"} <= rows.keys():
            return problem
        values, indices, logsumexp = rows["topk_values"], rows["topk_indices"], rows["logsumexp"]
        held = (logsumexp != 0) | (indices[..., 0] != 0)
        if indices.max(initial=0) >= layout.num_classes:
            return f"topk_indices outside [0, {layout.num_classes})"
        # Sorted as 32-bit integers (numpy's vectorised sort takes those 10x faster than uint8/16),
        # in place in the one copy.
        ranked = indices.astype(np.uint32)
        ranked.sort(-1)
        if any_in_use(ranked[..., 1:] == ranked[..., :-1], rows, layout, held):
            return "topk_indices repeating a class within a row"
        if any_in_use(ordered_keys(values[..., 1:]) > ordered_keys(values[..., :-1]), rows, layout, held):
            return "topk_values out of descending order"
        # The kept mass, sum exp(v_k - lse), is at most 1, so the first value lies at most 0 and the
        # last at most -log K from the log-sum-exp: bounds from two values a row, where the sum
        # would take an exp of every value (most of the check's time). The slack is float32's.
        top, last = values[..., 0].astype(np.float32), values[..., -1].astype(np.float32)
        slack = 1e-3 * np.maximum(np.abs(logsumexp), 1)
        if any_in_use((top > logsumexp + slack) | (last > logsumexp - np.log(values.shape[-1]) + slack), rows, layout, held):
            return "logsumexp below what the kept topk_values add up to (their probabilities sum past 1)"
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
        return over_positions(
            np.clip(1.0 - np.exp(rows["topk_values"].astype(np.float32) - rows["logsumexp"][..., None]).sum(-1), 0.0, 1.0), rows)

    def summarise(self, parts):
        return {"tail_mass": mean_and_max(parts)}
