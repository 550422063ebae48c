"""The distillation loss against a direct computation from its definition."""

import math

import numpy as np
import pytest
import torch

from stages.losses import distillation_loss, retemper


def reference_loss(s, t, y, alpha, T):
    """(1-a)*CE(y, s) + a*T^2*KL(softmax(t/T) || softmax(s/T)), one row at a time in float64."""
    s, t = s.double().numpy(), t.double().numpy()
    total = 0.0
    for row in range(len(s)):
        p = np.exp(t[row] / T - np.log(np.exp(t[row] / T).sum()))
        q = np.exp(s[row] / T - np.log(np.exp(s[row] / T).sum()))
        kl = float((p * (np.log(p) - np.log(q))).sum())
        ce = -(s[row][y[row]] - math.log(np.exp(s[row]).sum()))
        total += (1 - alpha) * ce + alpha * T * T * kl
    return total / len(s)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_loss_matches_definition(alpha, T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 7, generator=g) * 3, torch.randn(16, 7, generator=g) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    loss, parts = distillation_loss(s, t / T, y, alpha=alpha, temperature=T)
    assert float(loss) == pytest.approx(reference_loss(s, t, y, alpha, T), rel=1e-5)
    assert set(parts) == ({"kd"} if alpha == 1.0 else {"ce", "kd"})


def test_alpha_one_needs_no_labels_and_alpha_below_one_does():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    loss, _ = distillation_loss(s, t, None, alpha=1.0, temperature=2.0)
    assert float(loss) > 0
    with pytest.raises(ValueError):
        distillation_loss(s, t, None, alpha=0.5, temperature=2.0)


def test_student_equal_to_teacher_has_zero_soft_loss():
    t = torch.randn(8, 5) * 4
    loss, parts = distillation_loss(t.clone(), t / 4.0, None, alpha=1.0, temperature=4.0)
    assert float(parts["kd"]) == pytest.approx(0.0, abs=1e-6)


def test_retempering_is_exact():
    """A cache stores t/T; re-tempered to T' it must equal t/T' and give the loss at T'."""
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(10, 6, generator=g) * 5, torch.randn(10, 6, generator=g)
    y = torch.randint(0, 6, (10,), generator=g)
    stored = t / 4.0
    for T_new in (1.0, 2.0, 8.0):
        torch.testing.assert_close(retemper(stored, 4.0, T_new), t / T_new)
        loss, _ = distillation_loss(s, retemper(stored, 4.0, T_new), y, alpha=0.7, temperature=T_new)
        assert float(loss) == pytest.approx(reference_loss(s, t, y, 0.7, T_new), rel=1e-5)


def test_gradient_flows_only_to_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    loss, _ = distillation_loss(s, t, torch.tensor([0, 1, 2, 0]), alpha=0.5, temperature=2.0)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
