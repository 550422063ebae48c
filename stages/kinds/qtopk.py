"""qtopk: the K most probable classes of each row at T, delta-coded, with their probabilities in
`value_bits`-bit codes and the tail's mass beside them: a fraction of topk's bytes, what the
quantisation loses measured as the rows are written (`encoding_error`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.kinds.base import (
    ArraySpec,
    Kind,
    Rows,
    any_in_use,
    index_dtype,
    mean_and_max,
    np,
    option,
    over_positions,
    torch,
    zero_padding,
)
from stages.kinds.topk import TopKOptions, check_top_k, retempered, top_and_logsumexp
from stages.lazy import lazy_module

losses = lazy_module("stages.losses")

# qtopk: its class deltas compress from 50 to 38 bytes per token at level 7 instead of 3 (top-128,
# vocabulary 8,192), at 74 MB/s of deltas on one core, 290,000 tokens a second, still far ahead
# of a teacher; beyond 7 they shrink little more and compress slower (level 9: 37 at 56 MB/s).
QTOPK_DELTA_LEVEL = 7
# The widest spread of logits / T a qtopk row's codes cover: a class this far below the top has
# p < 1e-28 of it; a masked class (-inf) is held there. And the smallest step (a float16
# normal), for a row whose kept values are all equal.
QTOPK_MAX_SPREAD = 64.0
QTOPK_MIN_STEP = 2.0**-14


@dataclass(frozen=True)
class QuantisedTopKOptions(TopKOptions):
    value_bits: int = option(8, help="Bits per kept probability (codes are stored as uint8). pipeline inspect reports the error they introduce.",
                             low=1, high=8)

    def suffix(self, kind):
        return f"-qtop{self.top_k}-{self.value_bits}bit"


def dequantised_log_probs(class_deltas: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                          tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A qtopk row's kept classes (int64, ascending) and their log-probabilities at the cache's T
    (float32), from its stored arrays (class_deltas, codes (..., K); scale, tail (...)): the
    decoding docs/cache-format.md gives in numpy. Padding decodes to class 0 throughout; its values do not count."""
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
    summary = ("the --top-k most probable classes, their probabilities quantised to --value-bits, and the tail's mass: "
               "a fraction of topk's bytes")
    soft_arrays = ("qtopk_class_deltas", "qtopk_codes", "qtopk_scale", "qtopk_tail")
    last_axis = "kept"
    exact_at_any_temperature = False  # as topk: the kept classes re-temper, the tail's mass is an estimate
    entropy_of = "the kept classes and the tail (a lower bound), as quantised"
    can_combine = False
    Options = QuantisedTopKOptions
    statistics_arrays = ("qtopk_tail",)
    lossy = True

    def width(self, layout):
        return layout.options.top_k

    def check(self, layout):
        check_top_k(layout)

    def arrays(self, layout):
        # Always zstd, whatever the cache's codec: integers, and a few floats per position.
        kept, position = ("sample", *layout.row_axes), ("sample", *layout.position_axes)
        return {
            "qtopk_class_deltas": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, True, kept, QTOPK_DELTA_LEVEL),
            "qtopk_codes": ArraySpec(layout.row_shape, "uint8", 0, True, kept),
            "qtopk_scale": ArraySpec(layout.position_shape, "float16", float("nan"), True, position),
            "qtopk_tail": ArraySpec(layout.position_shape, "float32", float("nan"), True, position),
        }

    def position_bytes(self, layout):
        # zstd keeps a class delta in about the entropy of the gap between kept classes, log2(e C / K)
        # bits where they spread evenly (a trained teacher's cluster: fewer), and a code in value_bits.
        k, classes = layout.options.top_k, layout.num_classes
        delta_bits = min(8 * np.dtype(index_dtype(classes)).itemsize, math.log2(math.e * classes / k))
        return {"qtopk_class_deltas": k * delta_bits / 8, "qtopk_codes": k * layout.options.value_bits / 8,
                "qtopk_scale": 2, "qtopk_tail": 4}

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        values, indices, logsumexp, tail = top_and_logsumexp(rounded, layout.options.top_k, scratch)
        levels = 2**layout.options.value_bits - 1
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
            "qtopk_class_deltas": zero_padding(deltas, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            "qtopk_codes": zero_padding(codes, padding).to(torch.uint8),
            "qtopk_scale": zero_padding(scale, padding),
            "qtopk_tail": zero_padding(tail, padding),
            "encoding_error": zero_padding(encoding_error(log_p.gather(-1, order), decoded), padding),
        }

    def _decoded(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        classes, log_p = dequantised_log_probs(*(torch.from_numpy(rows[name]) for name in self.soft_arrays))
        return classes.numpy(), log_p.double().numpy()

    def probabilities(self, rows, num_classes, ratio):
        classes, log_p = self._decoded(rows)
        if ratio == 1.0:  # the tail as stored: exact, where 1 - the kept mass would round a small one away
            return np.concatenate([np.exp(log_p), rows["qtopk_tail"].astype(np.float64)[..., None]], axis=-1)
        return retempered(torch.from_numpy(log_p), torch.zeros(log_p.shape[:-1]), num_classes, ratio)

    def support(self, rows):
        return self._decoded(rows)[0]

    def confidence(self, probabilities):
        return probabilities[..., :-1].max(-1)  # the tail bucket is many classes, not one

    def top1(self, rows):
        """The class with code 0 (the largest probability; the smallest such class on a tie)."""
        classes = rows["qtopk_class_deltas"].astype(np.int64).cumsum(-1)
        return np.take_along_axis(classes, rows["qtopk_codes"].argmin(-1)[..., None], -1)[..., 0]

    def support_log_probs(self, student_over_t, soft, *, ratio):
        classes, log_p = dequantised_log_probs(*(soft[name] for name in self.soft_arrays))
        teacher = losses.topk_teacher_log_probs(log_p, torch.zeros(log_p.shape[:-1], device=log_p.device), student_over_t.shape[-1], ratio)
        return teacher, losses.topk_student_log_probs(student_over_t, classes)

    def loss_problems(self, soft, num_classes):
        scale, tail = soft["qtopk_scale"], soft["qtopk_tail"]
        return {f"qtopk_class_deltas giving classes outside [0, {num_classes})":
                (soft["qtopk_class_deltas"].long().sum(-1) >= num_classes).any(),
                "qtopk_scale not positive and finite": ~(torch.isfinite(scale) & (scale > 0)).all(),
                "qtopk_tail outside [0, 1)": ~((tail >= 0) & (tail < 1)).all()}

    def row_problem(self, rows, layout):
        """As `encode` writes them: K classes strictly increasing within [0, C); codes within
        value_bits, 0 for the top class and 2^value_bits - 1 for the last kept one unless the
        kept values lie within the smallest step; a step between QTOPK_MIN_STEP and the widest
        spread's; a tail in [0, (C - K) / (C - K + 1)] (the top class alone holds 1 / (C - K + 1)
        of the row at least)."""
        problem = super().row_problem(rows, layout)
        if problem or not set(self.soft_arrays) <= rows.keys():
            return problem
        deltas, codes, scale, tail = (rows[name] for name in self.soft_arrays)
        held = (scale != 0) | (tail != 0)  # a position holding soft labels has a step above 0, or no tail (K = C)
        levels, kept, num_classes = 2**layout.options.value_bits - 1, deltas.shape[-1], layout.num_classes
        if (any_in_use(deltas[..., 1:] == 0, rows, layout, held)
                or any_in_use(deltas.sum(-1, dtype=np.int64) >= num_classes, rows, layout, held)):
            return f"qtopk_class_deltas giving classes that do not strictly increase within [0, {num_classes})"
        if codes.max(initial=0) > levels:
            return f"qtopk_codes above 2^value_bits - 1 = {levels}"
        if any_in_use(codes.min(-1) != 0, rows, layout, held):
            return "qtopk_codes without code 0 for the top class"
        smallest = np.float16(QTOPK_MIN_STEP)
        if kept > 1 and any_in_use((codes.max(-1) != levels) & (scale != smallest), rows, layout, held):
            return f"qtopk_codes not reaching {levels} at the last kept class (value_bits {layout.options.value_bits} is not theirs)"
        largest = np.nextafter(np.float16(QTOPK_MAX_SPREAD / levels), np.float16(np.inf))
        if any_in_use((scale < smallest) | (scale > largest), rows, layout, held):
            return f"qtopk_scale outside [{float(smallest):g}, {float(largest):g}], the steps its encoder writes"
        others = num_classes - kept
        highest = others / (others + 1)
        # float32's rounding of the tail allowed for, and never as far as 1 (which no row can hold).
        if any_in_use((tail < 0) | (tail.astype(np.float64) > highest + (1 - highest) * 1e-3), rows, layout, held):
            return f"qtopk_tail outside [0, {highest:.6g}], the tail masses its encoder writes"
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
        return over_positions(rows["qtopk_tail"].astype(np.float32), rows)

    def summarise(self, parts):
        return {"tail_mass": mean_and_max(parts)}


def encoding_error(exact: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """Per row, (..., 3) float32: the sum and the largest absolute difference in probability over
    the K kept classes, and KL(exact || encoded), from their log-probabilities (..., K) over the
    same classes. The tail, the K + 1-th outcome, is stored exact (both sides hold the same mass),
    so it adds 0 to each."""
    p = exact.double().exp()
    difference = (p - encoded.double().exp()).abs()
    # A class the teacher masks (p = 0, log p = -inf) adds nothing, rather than 0 * -inf = NaN.
    kl = torch.where(p > 0, p * (exact.double() - encoded.double()), 0.0).sum(-1)
    return torch.stack([difference.sum(-1), difference.amax(-1), kl.clamp(min=0.0)], -1).float()
