"""sampled: S classes drawn from softmax(logits / T) per row (or token), kept as the distinct ids
and their counts, and the row's entropy: an unbiased estimate of the dense forward-KL loss, at
the cache's T only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.errors import InputError, PipelineError
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
class SampledOptions(KindOptions):
    samples: int | None = option(help="Classes drawn per row (or token), with replacement (counts are stored as uint8).",
                                 low=1, high=255)
    sample_seed: int = option(0, help="Seed of the draws (each row's draws depend on it and the row's index).",
                              low=0, high=2**32 - 1)

    def suffix(self, kind):
        return f"-sampled{self.samples}-seed{self.sample_seed}"


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


def centred_logits(rounded: torch.Tensor) -> torch.Tensor:
    """Rounded logits / T ((B, C) or (B, P, C)) as float64 (B, P, C) less each row's largest, a
    class at -inf (a masked one) at the lowest finite value: its weight exp(z) is 0, and so is
    0 * z in an entropy. float64 throughout: at 150,000 classes a float32 cumulative sum would
    lose the small classes' share."""
    z = rounded.double() if rounded.ndim == 3 else rounded.double().unsqueeze(1)
    return z.sub_(z.amax(-1, keepdim=True)).clamp_(min=torch.finfo(z.dtype).min)


def draw_distinct(z: torch.Tensor, weights: torch.Tensor, seed: int, samples: int, row_index: torch.Tensor,
                  first_position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` classes drawn with replacement from weights / sum(weights) at each position
    (weights: exp(z), or exp(z) with some classes zeroed; (B, P, C) float64 as z, from
    centred_logits), as the distinct ids in ascending order in the first slots and their counts
    (int64, (B, P, samples); unused slots 0), and that distribution's entropy (B, P). Draw j of
    position l of the row with dataset index i is the inverse CDF of draw_uniforms(seed, i, l, j)."""
    cdf = weights.cumsum(-1)
    total = cdf[..., -1:]
    entropy = total[..., 0].log() - (weights * z).sum(-1) / total[..., 0]  # H = log Z - sum_c e^z_c z_c / Z
    positions = torch.arange(first_position, first_position + z.shape[1], device=z.device)
    uniforms = draw_uniforms(seed, row_index, positions, samples)
    drawn = torch.searchsorted(cdf, uniforms * total, right=True).clamp_(max=z.shape[-1] - 1).sort(-1).values
    # Distinct ids with counts: slot k holds the k-th distinct id of the sorted draws.
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[..., 1:] = drawn[..., 1:] != drawn[..., :-1]
    slot = new.long().cumsum(-1) - 1
    ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add_(-1, slot, torch.ones_like(drawn))
    return ids, counts, entropy


def stored_draws(ids: torch.Tensor, counts: torch.Tensor, entropy: torch.Tensor, rounded: torch.Tensor, layout,
                 padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """draw_distinct's ids, counts and entropy as the cache stores them: back to the rows'
    shape when `rounded` was a batch of rows rather than of token sequences, zero at padding,
    and in the arrays' dtypes (the smallest id type for the vocabulary, uint8 counts, float32)."""
    if rounded.ndim == 2:
        ids, counts, entropy = ids[:, 0], counts[:, 0], entropy[:, 0]
    return (zero_padding(ids, padding).to(getattr(torch, index_dtype(layout.num_classes))),
            zero_padding(counts, padding).to(torch.uint8), zero_padding(entropy.float(), padding))


class Sampled(Kind):
    """Random-sampling KD (Anshumann et al., ACL 2025): S classes drawn with replacement from
    softmax(rounded logits / T) per row (or token), stored as the distinct ids in ascending order
    (the smallest unsigned type holding C - 1) with their counts (uint8), unused slots id 0 and
    count 0, and the row's entropy at T (float32, for the loss's value and the checks). Draw j
    of position l of the row with dataset index i is the inverse CDF of the uniform
    draw_uniforms(sample_seed, i, l, j): the cache records sample_seed and every row's index."""

    name = "sampled"
    summary = "--samples classes drawn from the teacher's distribution per row or token, as distinct classes and counts"
    soft_arrays = ("sampled_ids", "sampled_counts", "entropy")
    last_axis = "draw"
    exact_at_any_temperature = False  # at no other T: the draws are at the cache's
    entropy_of = "the drawn classes' counts / S (an estimate; the `entropy` array holds the teacher's)"
    can_combine = False
    Options = SampledOptions
    supported_divergences = ("forward-kl",)  # its draws estimate the cross-entropy term of forward KL, and nothing else
    statistics_arrays = ("sampled_counts",)

    def width(self, layout):
        return layout.options.samples

    def arrays(self, layout):
        # Always zstd, whatever the cache's codec: integers with zeros in every unused slot and
        # at padding compress several-fold, and decode at a fraction of the cost of floats.
        drawn = ("sample", *layout.row_axes)
        return {
            "sampled_ids": ArraySpec(layout.row_shape, index_dtype(layout.num_classes), 0, True, drawn),
            "sampled_counts": ArraySpec(layout.row_shape, "uint8", 0, True, drawn),
            "entropy": ArraySpec(layout.position_shape, "float32", float("nan"), True, ("sample", *layout.position_axes)),
        }

    def position_bytes(self, layout):
        # At most S distinct ids in ascending order: zstd keeps each in about the entropy of the gap
        # between them, log2(e C / S) bits, and a count (most of them 1, the unused slots 0) in a few bits.
        draws, classes = layout.options.samples, layout.num_classes
        id_bits = min(8 * np.dtype(index_dtype(classes)).itemsize, math.log2(math.e * classes / draws))
        return {"sampled_ids": draws * id_bits / 8, "sampled_counts": draws * min(8, math.log2(draws + 1)) / 8, "entropy": 4}

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        if row_index is None:
            raise PipelineError("internal: a sampled cache's draws need the rows' dataset indices")
        z = centred_logits(rounded)
        ids, counts, entropy = stored_draws(*draw_distinct(z, z.exp(), layout.options.sample_seed, layout.options.samples,
                                                           row_index, first_position), rounded, layout, padding)
        return {"sampled_ids": ids, "sampled_counts": counts, "entropy": entropy}

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

    def soft_terms(self, student_over_t, soft, divergence, *, ratio, cache_temperature):
        """Random-sampling KD (Anshumann et al., ACL 2025): KL_hat = sum_i (c_i / S) (-log q(id_i)) - H(p),
        an unbiased estimate of forward KL (stages.losses.sampled_distillation_loss)."""
        return losses.sampled_kl(student_over_t, soft["sampled_ids"], soft["sampled_counts"], soft["entropy"])

    def loss_problems(self, soft, num_classes):
        counts, entropy = soft["sampled_counts"], soft["entropy"]
        return {f"sampled_ids outside [0, {num_classes})": (soft["sampled_ids"].long() >= num_classes).any(),
                "sampled_counts that do not sum to the number of draws": (counts.long().sum(-1) != counts.shape[-1]).any(),
                "entropy outside [0, log(num_classes)]": ~((entropy >= -1e-4) & (entropy <= math.log(num_classes) + 1e-4)).all()}

    def row_problem(self, rows, layout):
        """As `encode` writes them: at a position holding draws, the distinct ids in ascending
        order within [0, C) in the first slots, each with a count of 1 or more, the counts
        summing to S, the unused slots id 0 and count 0; an entropy in [0, log C]."""
        problem = super().row_problem(rows, layout)
        if problem or not set(self.soft_arrays) <= rows.keys():
            return problem
        ids, counts, entropy = (rows[name] for name in self.soft_arrays)
        num_classes = layout.num_classes
        if not ((entropy >= -1e-4) & (entropy <= np.log(num_classes) + 1e-4)).all():
            return "entropy outside [0, log(num_classes)]"
        held = (entropy != 0) | (counts[..., 0] != 0)  # the first slot holds a draw wherever there are draws
        if ids.max(initial=0) >= num_classes:
            return f"sampled_ids outside [0, {num_classes})"
        if any_in_use(counts.sum(-1, dtype=np.int64) != counts.shape[-1], rows, layout, held):
            return "sampled_counts that do not sum to the number of draws at a position holding draws"
        drawn = counts > 0
        if any_in_use(drawn[..., 1:] & ~drawn[..., :-1], rows, layout, held):
            return "sampled_counts with an unused slot before a used one"
        if any_in_use((ids != 0) & ~drawn, rows, layout, held):
            return "sampled_ids other than 0 in unused slots"
        if any_in_use((ids[..., 1:] <= ids[..., :-1]) & drawn[..., 1:], rows, layout, held):
            return "sampled_ids out of ascending order or repeated"
        return None

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        # Redrawn from the fresh logits with the recorded seeds: for a deterministic teacher, the same draws exactly.
        return {name: (fresh[name].astype(np.int64), stored[name].astype(np.int64)) for name in ("sampled_ids", "sampled_counts")}

    def chunk_statistics(self, rows):
        """One chunk's sum and largest number of distinct classes drawn, per row (or valid token), and their count."""
        return over_positions((rows["sampled_counts"] > 0).sum(-1), rows)

    def summarise(self, parts):
        return {"distinct_sampled_ids": mean_and_max(parts)}
