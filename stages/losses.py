"""Distillation losses as plain functions on explicit tensors.

Soft labels reach the student from a cache (stages.kinds): a dense row of teacher logits / T,
a top-k row (the K largest logits / T, their classes, and the log-sum-exp of the whole row; a
qtopk row decodes to the same), or a sampled row (classes drawn from the teacher's
distribution, their counts, and its entropy). The first two compare teacher and student over
the same support, by any divergence of stages.divergences: every class for a dense row; the K
kept classes plus one tail bucket holding the rest of the mass for a top-k row. The sampled
loss is an unbiased estimate of the dense forward KL, and so is a headtail row's (a top-k head,
exact, and classes drawn from the tail beyond it: `headtail_kl`).
Normalising the teacher over its top-k but the student over the whole vocabulary is a known
trap: the two would then disagree even for a student equal to its teacher.

`soft_target_loss` is where a kind and a divergence meet: the kind gives the per-row term, the
divergence compares, and the T^2 factor and the hard-label mix are applied once, here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stages import divergences
from stages.errors import CacheDamagedError


def retemper(stored: torch.Tensor, cache_temperature: float, temperature: float) -> torch.Tensor:
    """Teacher logits / T' from a dense cache's stored logits / T: exact, since
    t / T' = (t / T) * (T / T'). Shape preserved; returns float32."""
    return stored.float() * (cache_temperature / temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits_over_t: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    divergence: str = divergences.DEFAULT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":

        loss = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    with KL, the default, or another `divergence` of stages.divergences (reverse-kl, jsd:BETA, tv).

    student_logits: (B, C) raw student logits s.
    teacher_logits_over_t: (B, C) teacher logits already divided by T (what a dense cache
        stores, re-tempered with `retemper` when T differs from the cache's).
    labels: (B,) int64 hard labels, or None when alpha == 1 (an unlabeled transfer set).
    The T^2 factor keeps the soft term's gradient scale independent of T. KL and CE are
    averaged over the batch. Returns the loss and its named parts for logging.
    """
    log_p_teacher = F.log_softmax(teacher_logits_over_t.float(), dim=-1)
    log_q_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    soft = divergences.parse(divergence)(log_p_teacher, log_q_student).mean()
    return _with_hard_labels(student_logits, labels, soft, alpha, temperature)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    logsumexp: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    cache_temperature: float,
    divergence: str = divergences.DEFAULT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of `distillation_loss` with the divergence (KL by default) taken over K + 1
    outcomes: the K classes a top-k cache kept, and one tail bucket for all the others.

        KL(p_topk || q_topk),  p_topk = (p_1..p_K, 1 - sum p_k),  q_topk likewise from softmax(s / T)

    student_logits: (B, C) raw student logits.
    topk_values: (B, K) the K largest teacher logits / T_cache; topk_indices: (B, K) their classes.
    logsumexp: (B,) log-sum-exp of the whole row of teacher logits / T_cache.
    With K == C there is no tail and this equals the dense loss. A student equal to its teacher
    has zero KL. At T == T_cache the teacher's K + 1 probabilities are exact; at another T
    they come from `topk_teacher_log_probs` (exact kept ratios, estimated tail mass).
    """
    num_classes = student_logits.shape[-1]
    log_p_teacher = topk_teacher_log_probs(topk_values, logsumexp, num_classes, cache_temperature / temperature)
    log_q_student = topk_student_log_probs(student_logits.float() / temperature, topk_indices.long())
    soft = divergences.parse(divergence)(log_p_teacher, log_q_student).mean()
    return _with_hard_labels(student_logits, labels, soft, alpha, temperature)


def sampled_distillation_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    entropy: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random-sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", ACL 2025): the loss of `distillation_loss` estimated from S classes
    drawn with replacement from the teacher's p = softmax(t / T):

        KL_hat = sum_i (c_i / S) * (-log q(id_i)) - H(p),   q = softmax(s / T)

    student_logits: (B, C) raw student logits s.
    ids: (B, S) the distinct drawn classes (unused slots: any class with count 0).
    counts: (B, S) how often each was drawn, summing to S.
    entropy: (B,) H(p), the teacher's entropy at T in nats.
    The cross-entropy term's expectation over the draws is sum_c p_c (-log q_c) = H(p) + KL(p || q),
    so KL_hat is an unbiased estimate of KL(p || q), and its gradient in s of the dense KL's
    gradient (H(p) does not depend on s; it is subtracted so that the logged value is the KL
    of the other kinds, 0 in expectation for a student equal to its teacher). T^2 and alpha
    as in `distillation_loss`. The draws are at the cache's T: there is no re-tempering.
    """
    kl = sampled_kl(student_logits.float() / temperature, ids, counts, entropy).mean()
    return _with_hard_labels(student_logits, labels, kl, alpha, temperature)


def sampled_kl(student_over_t: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Per row, (B,): the estimate KL_hat of `sampled_distillation_loss` from the student's logits / T."""
    return drawn_cross_entropy(F.log_softmax(student_over_t, dim=-1), ids, counts) - entropy.float()


def drawn_cross_entropy(log_q: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, (B,): sum_i (c_i / S) (-log q(id_i)) from the student's log-probabilities (B, C) and
    the distinct classes drawn with their counts (B, S): an unbiased estimate of the cross-entropy
    E_{c ~ p}[-log q_c] of the distribution p the S classes were drawn from (0 for a row without draws)."""
    weights = counts.float() / counts.shape[-1]
    return (weights * -log_q.gather(-1, ids.long())).sum(-1)


def headtail_kl(student_over_t: torch.Tensor, head_classes: torch.Tensor, head_log_p: torch.Tensor, ids: torch.Tensor,
                counts: torch.Tensor, tail_mass: torch.Tensor, tail_entropy: torch.Tensor) -> torch.Tensor:
    """Per row, (B,): a top-k head with a sampled tail's estimate of forward KL(p || q), q = softmax(s / T):

        KL_hat = sum_k p_k (log p_k - log q_k) + t (log t - H(r)) + t sum_i (c_i / S) (-log q(id_i))

    head_classes, head_log_p (B, K): the K most probable classes and the teacher's log-probabilities
    of them; tail_mass t (B,): the probability of every other class; r = p / t on those others, the
    tail's distribution, and H(r) (B,) its entropy; ids, counts (B, S): the distinct classes drawn
    from r with their counts, summing to S (or 0 where the tail is empty). The dense KL splits into
    the head's terms, exact here, and the tail's, sum_{c not kept} p_c (log p_c - log q_c) =
    t (log t - H(r)) - t E_{c ~ r}[log q_c], whose expectation the draws estimate without bias: so
    is KL_hat of the dense KL, and its gradient in s of the dense gradient."""
    log_q = F.log_softmax(student_over_t, dim=-1)
    head = divergences.ForwardKL()(head_log_p, log_q.gather(-1, head_classes))
    t = tail_mass.float()
    return head + torch.xlogy(t, t) + t * (drawn_cross_entropy(log_q, ids, counts) - tail_entropy.float())


def soft_target_loss(kind, student_logits: torch.Tensor, soft: dict[str, torch.Tensor], labels: torch.Tensor | None, *,
                     alpha: float, temperature: float, cache_temperature: float, divergence: str = divergences.DEFAULT
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distillation loss of (M, C) student logits on (M, ...) rows of a cache of `kind`
    (stages.kinds) at temperature T, re-tempered from the cache's: T^2 times the mean over rows
    of `divergence` between the teacher and the student on the kind's support (the kind's
    `soft_terms`), mixed with cross-entropy on `labels` by alpha. A kind that cannot train at T
    or with the divergence says so (InputError)."""
    kind.check_temperature(temperature, cache_temperature)
    kind.check_divergence(divergence)
    check_soft_rows(kind, soft, student_logits.shape[-1])
    terms = kind.soft_terms(student_logits.float() / temperature, soft, divergences.parse(divergence),
                            ratio=cache_temperature / temperature, cache_temperature=cache_temperature)
    return _with_hard_labels(student_logits, labels, terms.mean(), alpha, temperature)


def check_soft_rows(kind, soft: dict[str, torch.Tensor], num_classes: int) -> None:
    """Raise a CacheDamagedError when rows of soft labels about to train ((M, ...) tensors of
    `kind`, valid positions only) hold a value that would make the loss NaN, an IndexError or of
    a sign no teacher gives (the kind's `loss_problems`), with one host sync for all its checks."""
    problems = kind.loss_problems(soft, num_classes)
    if not problems:
        return
    for what, found in zip(problems, torch.stack(list(problems.values())).tolist()):
        if found:
            raise CacheDamagedError(f"the soft labels of a batch hold {what}: the cache changed after its chunks were "
                                    "checked, or is damaged; run pipeline verify")


def topk_teacher_log_probs(values: torch.Tensor, logsumexp: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    """The teacher's log-probabilities over the K kept classes and the tail bucket (the last
    entry; absent when K == C), at the temperature T' = T_cache / ratio.

    values (..., K): kept logits / T_cache; logsumexp (...): of the whole row of logits / T_cache.
    At ratio 1 everything is exact: p_k = exp(v_k - lse), tail = 1 - sum p_k.
    At another T' the kept logits re-temper exactly (t_k / T' = ratio * v_k), so the ratios
    between kept probabilities are exact; the tail's mass at T' depends on how the mass is
    spread over the C - K classes the cache dropped, which it does not know. It is estimated
    as if spread evenly. The true value lies between that estimate and the one with the tail's
    mass packed into classes at the K-th kept value, since no dropped class exceeds it
    (sharpening, T' < T_cache: the even spread is the lower bound; softening: the upper bound).
    The estimate is exact for an evenly spread tail.
    """
    values, logsumexp = values.float(), logsumexp.float()
    kept = values - logsumexp.unsqueeze(-1)
    tail_count = num_classes - values.shape[-1]
    if tail_count == 0:
        return kept if ratio == 1.0 else F.log_softmax(ratio * values, dim=-1)
    tail = _log1mexp(torch.logsumexp(kept, dim=-1)).unsqueeze(-1)
    if ratio == 1.0:
        return torch.cat([kept, tail], dim=-1)
    # Log of the mean exp(v) over the tail classes, re-tempered as if every one held it.
    mean_tail_logit = logsumexp.unsqueeze(-1) + tail - math.log(tail_count)
    joint = torch.cat([ratio * values, math.log(tail_count) + ratio * mean_tail_logit], dim=-1)
    return F.log_softmax(joint, dim=-1)


def topk_student_log_probs(student_logits_over_t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The student's distribution softmax(s / T) collapsed onto the same K + 1 outcomes as the
    teacher's: its log-probabilities of the kept classes, then of all other classes together
    (absent when K == C). indices: (..., K) int64."""
    log_q = F.log_softmax(student_logits_over_t, dim=-1)
    kept = log_q.gather(-1, indices)
    if indices.shape[-1] == log_q.shape[-1]:
        return kept
    tail = torch.logsumexp(log_q.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([kept, tail], dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x rounded above 0 gives -inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_hard_labels(
    student_logits: torch.Tensor, labels: torch.Tensor | None, kl: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    soft = temperature**2 * kl
    if alpha >= 1.0:
        return alpha * soft, {"kd": soft.detach()}
    if labels is None:
        raise ValueError("hard labels are needed when alpha < 1")
    hard = F.cross_entropy(student_logits.float(), labels)
    loss = (1.0 - alpha) * hard + alpha * soft
    return loss, {"ce": hard.detach(), "kd": soft.detach()}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """The distance between the student's features (after its projection to the teacher's size)
    and the teacher's, both (B, F): "mse", the mean squared difference per element (FitNets,
    Romero et al. 2015), or "cosine", the mean of 1 - cosine similarity per sample (as in
    DistilBERT's cosine embedding loss, Sanh et al. 2019)."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


# The student's logits are taken a piece of rows (positions) at a time, each piece at most this
# many bytes as float32 (`in_pieces`): with the softmax, the divergence and their gradients a piece
# costs a few times that, whatever B x L (2,048 tokens of a 128,256-token vocabulary are 1 GB of
# float32 logits per copy).
LOGIT_PIECE_BYTES = 16 * 2**20


class HiddenAndHead(NamedTuple):
    """A student's output before its output layer: the last hidden states ((B, L, H), or (M, H)
    rows) and the layer that makes them logits (an nn.Module, applied a piece at a time)."""

    hidden: torch.Tensor
    head: torch.nn.Module


# A piece's loss: from the piece's float32 logits (P, C) and its rows' slice, its share of the
# loss (a scalar that requires grad) and its named parts (summed over the pieces, detached).
PieceLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _InPieces(torch.autograd.Function):
    """The sum over pieces of rows of `piece_loss(head(hidden[piece]))`, with the gradients of every
    piece taken while its logits exist (as Liger-Kernel's fused linear losses do): the backward
    only scales the gradients kept for `hidden` and the head's parameters, so no (M, C) tensor
    exists in the forward or the backward, and the head runs once per piece."""

    @staticmethod
    def forward(ctx, hidden, head, piece_loss, rows_per_piece, parts, *parameters):
        wanted = [hidden.requires_grad, *(p.requires_grad for p in parameters)]
        grad_hidden = torch.zeros_like(hidden) if wanted[0] else None
        grad_parameters = [torch.zeros_like(p) if w else None for p, w in zip(parameters, wanted[1:])]
        total = torch.zeros((), device=hidden.device)
        for start in range(0, len(hidden), rows_per_piece):
            piece = slice(start, start + rows_per_piece)
            with torch.enable_grad():
                rows = hidden[piece].detach().requires_grad_(wanted[0])
                value, named = piece_loss(head(rows).float(), piece)
                sources = [t for t, w in zip((rows, *parameters), wanted) if w]
                grads = iter(torch.autograd.grad(value, sources, allow_unused=True)) if sources and value.requires_grad else None
            if grads is not None:
                for index, w in enumerate(wanted):
                    grad = next(grads) if w else None
                    if grad is None:
                        continue
                    if index == 0:
                        grad_hidden[piece] = grad
                    else:
                        grad_parameters[index - 1] += grad
            total += value.detach()
            for name, part in named.items():
                parts[name] = parts.get(name, 0) + part.detach()
        ctx.save_for_backward(*(g if g is not None else torch.zeros(0) for g in (grad_hidden, *grad_parameters)))
        ctx.wanted = wanted
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grads = [grad * grad_output if w else None for grad, w in zip(saved, ctx.wanted)]
        return grads[0], None, None, None, None, *grads[1:]


def output_classes(hidden: torch.Tensor, head: torch.nn.Module) -> int:
    """The number of logits `head` gives a row of `hidden`."""
    return head.out_features if hasattr(head, "out_features") else head(hidden[:1]).shape[-1]


def rows_per_piece(hidden: torch.Tensor, head: torch.nn.Module) -> int:
    """How many of `hidden`'s rows one piece takes: their float32 logits at most LOGIT_PIECE_BYTES."""
    return max(1, LOGIT_PIECE_BYTES // (4 * output_classes(hidden, head)))


def in_pieces(hidden: torch.Tensor, head: torch.nn.Module, piece_loss: PieceLoss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sum over pieces of `hidden`'s rows ((M, H)) of `piece_loss` on their logits
    `head(rows)`, and the sums of its named parts, holding one piece's logits at a time (at most
    LOGIT_PIECE_BYTES as float32): what the loss of a student at a language model's vocabulary
    costs without its (M, C) logits. Differentiable in `hidden` and the head's parameters."""
    parts: dict[str, torch.Tensor] = {}
    # Without grad mode (evaluation), nothing is differentiated: the pieces' values alone.
    parameters = list(head.parameters()) if torch.is_grad_enabled() else []
    total = _InPieces.apply(hidden if torch.is_grad_enabled() else hidden.detach(), head, piece_loss,
                            rows_per_piece(hidden, head), parts, *parameters)
    return total, parts


def piecewise_loss(kind, student: HiddenAndHead, soft: dict[str, torch.Tensor], labels: torch.Tensor | None, *,
                   alpha: float, temperature: float | None, cache_temperature: float | None,
                   divergence: str = divergences.DEFAULT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`soft_target_loss` of the student's (M, H) rows of hidden states and its output layer (or,
    with `kind` None, cross-entropy with `labels` alone), computed a piece of rows at a time
    (`in_pieces`): equal to it on the logits head(hidden) (float32 rounding aside), with none
    of the (M, C) logits, log-probabilities or gradients ever whole."""
    hidden, head = student
    count = len(hidden)
    if kind is None:
        def hard_only(logits, piece):
            ce = F.cross_entropy(logits, labels[piece], reduction="sum") / count
            return ce, {"ce": ce}

        loss, parts = in_pieces(hidden, head, hard_only)
        return loss, parts
    kind.check_temperature(temperature, cache_temperature)
    kind.check_divergence(divergence)
    check_soft_rows(kind, soft, output_classes(hidden, head))
    if alpha < 1.0 and labels is None:
        raise ValueError("hard labels are needed when alpha < 1")
    measure, ratio = divergences.parse(divergence), cache_temperature / temperature

    def piece_loss(logits, piece):
        rows = {name: values[piece] for name, values in soft.items()}
        kd = temperature**2 * kind.soft_terms(logits / temperature, rows, measure, ratio=ratio, cache_temperature=cache_temperature
                                              ).sum() / count
        if alpha >= 1.0:
            return alpha * kd, {"kd": kd}
        ce = F.cross_entropy(logits, labels[piece], reduction="sum") / count
        return (1.0 - alpha) * ce + alpha * kd, {"ce": ce, "kd": kd}

    return in_pieces(hidden, head, piece_loss)
