"""dense: every class's logit / T (float16 or float32; unwritten rows read as NaN). Exact at any
temperature: softmax(t / T') = softmax((t / T) * (T / T'))."""

from __future__ import annotations

from dataclasses import dataclass

from stages.kinds.base import ArraySpec, Kind, KindOptions, np, torch, zero_padding
from stages.lazy import lazy_module

F = lazy_module("torch.nn.functional")
losses = lazy_module("stages.losses")


@dataclass(frozen=True)
class DenseOptions(KindOptions):
    """None: a dense cache is the default, and its file name says nothing of its kind."""

    def suffix(self, kind):
        return ""


class Dense(Kind):
    """Every class's logit / T."""

    name = "dense"
    summary = "every class's logit / T, exact at any temperature"
    Options = DenseOptions
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
        return {"logits": zero_padding(rounded, padding)}

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

    def support_log_probs(self, student_over_t, soft, *, ratio):
        return F.log_softmax(soft["logits"].float() * ratio, dim=-1), F.log_softmax(student_over_t, dim=-1)

    def loss_problems(self, soft, num_classes):
        # A row's sum is non-finite where one of its values is (float32: no finite float16 row
        # overflows it), and costs one pass where isfinite on float16 costs several.
        return {"non-finite logits": ~torch.isfinite(soft["logits"].sum(-1, dtype=torch.float32)).all()}

    def combine(self, parts, rule, layout):
        """mean-probs: log of the mean of the teachers' softmax(t_i / T) (its softmax is that
        mean); mean-logits: the mean of their t_i / T (stages.ensemble)."""
        stacked = torch.stack([torch.from_numpy(part["logits"]).float() for part in parts])
        if rule == "mean-logits":
            combined = stacked.mean(0)
        else:
            combined = torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - np.log(len(parts))
        return {"logits": combined.numpy().astype(layout.dtype)}
