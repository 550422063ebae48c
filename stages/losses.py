"""Distillation losses as plain functions on explicit tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":

        loss = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    student_logits: (B, C) raw student logits s.
    teacher_logits_over_t: (B, C) teacher logits already divided by T (what a cache stores,
        re-tempered with `retemper` when T differs from the cache's).
    labels: (B,) int64 hard labels, or None when alpha == 1 (an unlabeled transfer set).
    The T^2 factor keeps the soft term's gradient scale independent of T. KL and CE are
    averaged over the batch. Returns the loss and its named parts for logging.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits_over_t.float(), dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    soft = temperature**2 * kl
    if alpha >= 1.0:
        return alpha * soft, {"kd": soft.detach()}
    if labels is None:
        raise ValueError("hard labels are needed when alpha < 1")
    hard = F.cross_entropy(student_logits.float(), labels)
    loss = (1.0 - alpha) * hard + alpha * soft
    return loss, {"ce": hard.detach(), "kd": soft.detach()}
