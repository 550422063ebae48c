"""Distillation losses as plain functions on explicit tensors.

Soft labels reach the student from a cache (stages.kinds): a dense row of teacher logits / T,
a top-k row (the K largest logits / T, their classes, and the log-sum-exp of the whole row; a
qtopk row decodes to the same), or a sampled row (classes drawn from the teacher's
distribution, their counts, and its entropy). The first two compare teacher and student over
the same support, by any divergence of stages.divergences: every class for a dense row; the K
kept classes plus one tail bucket holding the rest of the mass for a top-k row. The sampled
loss is an unbiased estimate of the dense forward KL.
Normalising the teacher over its top-k but the student over the whole vocabulary is a known
trap: the two would then disagree even for a student equal to its teacher.

`soft_target_loss` is where a kind and a divergence meet: the kind gives the per-row term, the
divergence compares, and the T^2 factor and the hard-label mix are applied once, here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stages import divergences


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
    log_q = F.log_softmax(student_over_t, dim=-1)
    weights = counts.float() / counts.shape[-1]
    return (weights * -log_q.gather(-1, ids.long())).sum(-1) - entropy.float()


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
    terms = kind.soft_terms(student_logits.float() / temperature, soft, divergences.parse(divergence),
                            ratio=cache_temperature / temperature, cache_temperature=cache_temperature)
    return _with_hard_labels(student_logits, labels, terms.mean(), alpha, temperature)


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
