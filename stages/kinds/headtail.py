"""headtail: a top-k head with a sampled tail. The K most probable classes of each row at T as
qtopk stores them (delta-coded classes, value_bits-bit codes, the tail's mass), and S classes
drawn with replacement from the tail's own distribution (the others, renormalised) as the
sampled kind stores its draws, with that distribution's entropy: the head's loss is exact, the
tail's an unbiased estimate, so the whole is an unbiased estimate of the dense forward-KL loss
(of the distribution the codes give), at the cache's T only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.errors import InputError, PipelineError
from stages.kinds.base import (
    ArraySpec,
    Kind,
    any_in_use,
    index_dtype,
    mean_and_max,
    np,
    padding_problem,
)
from stages.kinds.qtopk import (
    QuantisedTopK,
    QuantisedTopKOptions,
    dequantised_log_probs,
)
from stages.kinds.sampled import Sampled, SampledOptions, centred_logits, draw_distinct, stored_draws
from stages.lazy import lazy_module

losses = lazy_module("stages.losses")

# The head is a qtopk row and the draws a sampled row: their encoders, checks and comparisons are
# those kinds' own, applied to this kind's arrays of the same names.
_HEAD, _DRAWS = QuantisedTopK(), Sampled()


@dataclass(frozen=True)
class HeadTailOptions(QuantisedTopKOptions, SampledOptions):
    """top_k and value_bits of the head (as qtopk's), samples and sample_seed of the tail's draws (as sampled's)."""

    def suffix(self, kind):
        return f"-head{self.top_k}-{self.value_bits}bit-tail{self.samples}-seed{self.sample_seed}"


class HeadTail(Kind):
    """The K most probable classes at T as a qtopk row (qtopk_class_deltas, qtopk_codes,
    qtopk_scale, qtopk_tail: stages.kinds.qtopk), and S classes drawn with replacement from the
    tail's distribution r = p / tail over the C - K others, kept as sampled_ids (the distinct
    classes in ascending order) and sampled_counts (uint8, summing to S) as the sampled kind keeps
    its draws (stages.kinds.sampled), with tail_entropy (float32), H(r) in nats. Draw j of
    position l of the row with dataset index i is the inverse CDF over r, the kept classes at
    weight 0, of draw_uniforms(sample_seed, i, l, j). A row whose tail holds no mass (every other
    class masked) has no draws: counts 0 and tail_entropy 0."""

    name = "headtail"
    summary = ("the --top-k most probable classes as qtopk keeps them, and --samples classes drawn from the rest "
               "as distinct classes and counts: an unbiased estimate of the dense loss")
    soft_arrays = (*_HEAD.soft_arrays, "sampled_ids", "sampled_counts", "tail_entropy")
    last_axis = "kept"  # the head's; the draws' arrays end in a `draw` axis of S
    exact_at_any_temperature = False  # the tail was drawn at the cache's T
    entropy_of = "the kept classes and the drawn classes' share of the tail (an estimate)"
    can_combine = False
    Options = HeadTailOptions
    supported_divergences = ("forward-kl",)  # the draws estimate the tail's cross-entropy term, and nothing else
    statistics_arrays = ("qtopk_tail", "sampled_counts")
    lossy = True  # the head's codes, as qtopk's (encoding_error)
    class_ids_array = "qtopk_class_deltas"  # the head's kept ids (the tail's drawn ids are counted as sampled's are: not)

    def width(self, layout):
        return layout.options.top_k

    def check(self, layout):
        _HEAD.check(layout)

    def arrays(self, layout):
        drawn = ("sample", *layout.position_axes, "draw")
        shape = (*layout.position_shape, layout.options.samples)
        return {
            **_HEAD.arrays(layout),
            # Always zstd, as the sampled kind's: integers with zeros in every unused slot and at padding.
            "sampled_ids": ArraySpec(shape, index_dtype(layout.num_classes), 0, True, drawn),
            "sampled_counts": ArraySpec(shape, "uint8", 0, True, drawn),
            "tail_entropy": ArraySpec(layout.position_shape, "float32", float("nan"), True, ("sample", *layout.position_axes)),
        }

    def position_bytes(self, layout):
        draws = _DRAWS.position_bytes(layout)
        return {**_HEAD.position_bytes(layout), "sampled_ids": draws["sampled_ids"], "sampled_counts": draws["sampled_counts"],
                "tail_entropy": 4}

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        if row_index is None:
            raise PipelineError("internal: a headtail cache's draws need the rows' dataset indices")
        z = centred_logits(rounded)  # first: the head's encoder may overwrite `rounded` when it is the scratch space
        head = _HEAD.encode(rounded, layout, padding, scratch)
        kept = head["qtopk_class_deltas"].long().cumsum(-1)  # class 0 throughout at padding, whose draws are zeroed
        kept = kept if kept.ndim == 3 else kept.unsqueeze(1)
        weights = z.exp().scatter_(-1, kept, 0.0)
        ids, counts, entropy = draw_distinct(z, weights, layout.options.sample_seed, layout.options.samples, row_index,
                                             first_position)
        empty = weights.sum(-1) == 0  # no mass outside the head: no draws
        counts = counts.masked_fill_(empty.unsqueeze(-1), 0)
        ids = ids.masked_fill_(empty.unsqueeze(-1), 0)
        entropy = entropy.masked_fill_(empty, 0.0).clamp_(min=0.0)
        ids, counts, entropy = stored_draws(ids, counts, entropy, rounded, layout, padding)
        return {**head, "sampled_ids": ids, "sampled_counts": counts, "tail_entropy": entropy}

    def probabilities(self, rows, num_classes, ratio):
        """The head's probabilities as decoded, then the tail's mass shared among the drawn classes
        by their counts: an unbiased estimate of each drawn class's probability."""
        if ratio != 1.0:
            raise InputError("a headtail cache's tail was drawn at its own temperature and cannot be re-tempered")
        head = _HEAD.probabilities(rows, num_classes, 1.0)
        counts = rows["sampled_counts"].astype(np.float64)
        return np.concatenate([head[..., :-1], head[..., -1:] * counts / counts.shape[-1]], axis=-1)

    def support(self, rows):
        return np.concatenate([_HEAD.support(rows), rows["sampled_ids"].astype(np.int64)], axis=-1)

    def top1(self, rows):
        return _HEAD.top1(rows)

    def check_temperature(self, temperature, cache_temperature):
        if temperature != cache_temperature:
            raise InputError(f"a headtail cache holds a tail drawn at T={cache_temperature:g}: it trains at that temperature "
                             f"only, not at {temperature:g} (leave `temperature` unset)")

    def soft_terms(self, student_over_t, soft, divergence, *, ratio, cache_temperature):
        """The head's forward KL exactly and the tail's estimated from its draws (stages.losses.headtail_kl)."""
        classes, log_p = dequantised_log_probs(*(soft[name] for name in _HEAD.soft_arrays))
        return losses.headtail_kl(student_over_t, classes, log_p, soft["sampled_ids"], soft["sampled_counts"],
                                  soft["qtopk_tail"], soft["tail_entropy"])

    def loss_problems(self, soft, num_classes):
        counts, entropy, summed = soft["sampled_counts"], soft["tail_entropy"], soft["sampled_counts"].long().sum(-1)
        # No draws only where the tail holds no mass: counts zeroed elsewhere would drop the tail's cross-entropy.
        drawn = (summed == counts.shape[-1]) | ((summed == 0) & (soft["qtopk_tail"] == 0))
        return {**_HEAD.loss_problems(soft, num_classes),
                f"sampled_ids outside [0, {num_classes})": (soft["sampled_ids"].long() >= num_classes).any(),
                "sampled_counts that do not sum to the number of draws where the tail holds mass": ~drawn.all(),
                "tail_entropy outside [0, log(num_classes)]": ~((entropy >= -1e-4) & (entropy <= math.log(num_classes) + 1e-4)).all()}

    def row_problem(self, rows, layout):
        """The head as a qtopk row's (QuantisedTopK.row_problem), a tail_entropy in [0, log C], S
        draws wherever the tail holds mass, and the draws as a sampled row's (Sampled.row_problem,
        with tail_entropy for its entropy)."""
        problem = padding_problem(rows, layout, self.soft_arrays) or _HEAD.row_problem(rows, layout)
        if problem or not set(self.soft_arrays) <= rows.keys():
            return problem
        entropy, tail, counts = rows["tail_entropy"], rows["qtopk_tail"], rows["sampled_counts"]
        if not ((entropy >= -1e-4) & (entropy <= np.log(layout.num_classes) + 1e-4)).all():
            return "tail_entropy outside [0, log(num_classes)]"
        held = (rows["qtopk_scale"] != 0) | (tail != 0)  # as the head's check: a position holding soft labels
        if any_in_use((tail > 0) & (counts.sum(-1, dtype=np.int64) != counts.shape[-1]), rows, layout, held):
            return "sampled_counts that do not sum to the number of draws where the tail holds mass"
        # A position holding soft labels without draws (its tail empty: no mass outside the head)
        # is checked as one whose S draws all gave class 0, the first slot's id there.
        empty = (rows["qtopk_scale"] != 0) & (counts.sum(-1, dtype=np.int64) == 0)
        counts = np.where(empty[..., None] & (np.arange(counts.shape[-1]) == 0), counts.shape[-1], counts)
        draws = {name: rows[name] for name in ("sampled_ids", *layout.position_arrays) if name in rows}
        return _DRAWS.row_problem({**draws, "sampled_counts": counts, "entropy": entropy}, layout)

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        # The head's codes compared as qtopk's; the draws redrawn with the recorded seeds, as sampled's.
        return {**_HEAD.verify_pairs(stored, fresh_rounded, fresh, padding), **_DRAWS.verify_pairs(stored, fresh_rounded, fresh, padding)}

    def chunk_statistics(self, rows):
        """One chunk's tail mass and distinct tail classes drawn, each as (sum, largest, entries)."""
        return _HEAD.chunk_statistics(rows), _DRAWS.chunk_statistics(rows)

    def summarise(self, parts):
        return {"tail_mass": mean_and_max([part[0] for part in parts]),
                "distinct_sampled_ids": mean_and_max([part[1] for part in parts])}
