"""The distillation loss against a direct computation from its definition."""

import math

import numpy as np
import pytest
import torch

from stages.losses import distillation_loss, feature_loss, retemper, topk_distillation_loss, topk_teacher_log_probs


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


# Top-k: the loss over the K kept classes plus a tail bucket.


def _topk_cache_row(t: torch.Tensor, T: float, k: int):
    """What a top-k cache stores for teacher logits t at temperature T (in float32)."""
    values, indices = (t / T).topk(k, dim=-1)
    return values, indices, torch.logsumexp(t / T, dim=-1)


def reference_topk_loss(s, t, y, alpha, T, k):
    """(1-a)*CE + a*T^2*KL over the K+1 outcomes (the teacher's top k, then the rest), from the
    definition, one row at a time in float64."""
    s, t = s.double().numpy(), t.double().numpy()
    total = 0.0
    for row in range(len(s)):
        p = np.exp(t[row] / T) / np.exp(t[row] / T).sum()
        q = np.exp(s[row] / T) / np.exp(s[row] / T).sum()
        kept = np.argsort(-t[row])[:k]
        rest = np.setdiff1d(np.arange(len(p)), kept)
        p_k = np.append(p[kept], p[rest].sum())
        q_k = np.append(q[kept], q[rest].sum())
        kl = float((p_k * (np.log(p_k) - np.log(q_k))).sum())
        ce = -(s[row][y[row]] - math.log(np.exp(s[row]).sum()))
        total += (1 - alpha) * ce + alpha * T * T * kl
    return total / len(s)


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_loss_matches_definition(k, alpha):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(12, 10, generator=g) * 3, torch.randn(12, 10, generator=g) * 3
    y = torch.randint(0, 10, (12,), generator=g)
    loss, _ = topk_distillation_loss(s, *_topk_cache_row(t, 2.0, k), y, alpha=alpha, temperature=2.0, cache_temperature=2.0)
    assert float(loss) == pytest.approx(reference_topk_loss(s, t, y, alpha, 2.0, k), rel=1e-5)


@pytest.mark.parametrize("T_new", [4.0, 1.0, 8.0])
def test_topk_loss_with_k_equal_to_classes_is_the_dense_loss(T_new):
    """Nothing dropped: at the cache's T and re-tempered, top-k and dense losses agree."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(16, 7, generator=g) * 3, torch.randn(16, 7, generator=g) * 5
    y = torch.randint(0, 7, (16,), generator=g)
    dense, _ = distillation_loss(s, retemper(t / 4.0, 4.0, T_new), y, alpha=0.6, temperature=T_new)
    topk, _ = topk_distillation_loss(s, *_topk_cache_row(t, 4.0, 7), y, alpha=0.6, temperature=T_new, cache_temperature=4.0)
    assert float(topk) == pytest.approx(float(dense), rel=1e-5)


def test_student_equal_to_teacher_has_zero_topk_loss_on_the_same_support():
    """The known trap: normalising the teacher over its top k but the student over all classes
    leaves a loss even for a perfect student. Over the same K+1 support it is zero."""
    t = torch.randn(8, 50) * 3
    values, indices, lse = _topk_cache_row(t, 2.0, 5)
    _, parts = topk_distillation_loss(t.clone(), values, indices, lse, None, alpha=1.0, temperature=2.0, cache_temperature=2.0)
    assert float(parts["kd"]) == pytest.approx(0.0, abs=1e-5)
    renormalised_teacher = torch.log_softmax(values, dim=-1)
    student_over_all = torch.log_softmax(t / 2.0, dim=-1).gather(-1, indices)
    trap = (renormalised_teacher.exp() * (renormalised_teacher - student_over_all)).sum(-1).mean()
    assert float(trap) > 0.05


def test_topk_retempering_keeps_kept_ratios_exact_and_bounds_the_tail():
    """At T' != T the kept classes' relative probabilities are exact; the tail mass is an
    estimate that lies, like the true tail mass, between the two documented bounds."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64, 40, generator=g) * 4
    T, k = 2.0, 6
    values, indices, lse = _topk_cache_row(t, T, k)
    for T_new in (1.0, 1.5, 3.0, 6.0):
        ratio = T / T_new
        estimated = topk_teacher_log_probs(values, lse, 40, ratio).double().exp()
        true = torch.softmax(t.double() / T_new, dim=-1)
        true_kept = true.gather(-1, indices)
        torch.testing.assert_close(estimated[:, :k] / estimated[:, :k].sum(-1, keepdim=True),
                                   true_kept / true_kept.sum(-1, keepdim=True))
        # Bounds on the tail's sum of exp(ratio * v) over its C - K classes, given its sum of exp(v) (S) and
        # that no tail value exceeds the K-th kept value v_K: even spread, and packed at v_K.
        v = (t.double() / T).sort(-1, descending=True).values
        S = v[:, k:].exp().sum(-1)
        even = (40 - k) * (S / (40 - k)) ** ratio
        packed = S * v[:, k - 1].exp() ** (ratio - 1)
        low, high = torch.minimum(even, packed), torch.maximum(even, packed)
        true_tail = (ratio * v[:, k:]).exp().sum(-1)
        kept = (ratio * v[:, :k]).exp().sum(-1)
        estimated_tail = estimated[:, k]
        assert ((true_tail >= low * (1 - 1e-9)) & (true_tail <= high * (1 + 1e-9))).all()
        assert ((estimated_tail >= low / (kept + low) - 1e-6) & (estimated_tail <= high / (kept + high) + 1e-6)).all()


def test_topk_retempering_is_exact_for_an_evenly_spread_tail():
    kept = torch.tensor([[5.0, 3.0, 2.5]])
    t = torch.cat([kept, torch.full((1, 7), 0.5)], dim=-1)
    values, indices, lse = _topk_cache_row(t, 2.0, 3)
    true = torch.softmax(t / 0.7, dim=-1)
    expected = torch.cat([true[:, :3], true[:, 3:].sum(-1, keepdim=True)], dim=-1)
    torch.testing.assert_close(topk_teacher_log_probs(values, lse, 10, 2.0 / 0.7).exp(), expected)


def test_topk_gradient_is_finite_when_the_teacher_tail_is_empty():
    """float16 logits of a confident teacher can leave no tail mass at all: still finite."""
    s = torch.randn(4, 6, requires_grad=True)
    values = torch.tensor([[60.0, 0.0, -1.0]] * 4)  # the tail underflows to exactly 0
    indices = torch.tensor([[0, 1, 2]] * 4)
    lse = torch.logsumexp(torch.tensor([[60.0, 0.0, -1.0, -50.0, -50.0, -50.0]] * 4), dim=-1)
    loss, _ = topk_distillation_loss(s, values, indices, lse, None, alpha=1.0, temperature=1.0, cache_temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_feature_losses_against_their_definitions():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    mse = sum(float((student[i, j] - teacher[i, j]) ** 2) for i in range(6) for j in range(5)) / 30
    cosine = sum(1 - float(student[i] @ teacher[i]) / float(student[i].norm() * teacher[i].norm()) for i in range(6)) / 6
    assert float(feature_loss(student, teacher, "mse")) == pytest.approx(mse, rel=1e-5)
    assert float(feature_loss(student, teacher, "cosine")) == pytest.approx(cosine, rel=1e-5)
    assert float(feature_loss(teacher * 3, teacher, "cosine")) == pytest.approx(0.0, abs=1e-6)  # scale-free


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_training_loss_retempers_the_cached_teacher(tmp_path, teacher_weights, kind):
    """The loss train-student takes on rows of a real cache made at T=3, trained at T'=1.5, is
    the definition's with softmax(t / T') for the teacher's own logits t (a top-k cache keeping
    every class, so that nothing is estimated)."""
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages import cache_teacher
    from stages.cache import CacheReader
    from stages.train_student import batch_loss
    from tests.conftest import DATASET

    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights).eval()
    kept = {"format": "topk", "kind_options": {"top_k": 4}} if kind == "topk" else {}
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "c.zarr", temperature=3.0,
                                              dtype="float32", chunk_rows=64, device="cpu", **kept)
    reader = CacheReader(cache_teacher.run(config, teacher, split).cache)
    batch = next(reader.batches(32, seed=0, epoch=0))
    with torch.no_grad():
        t = teacher(split.inputs(batch["index"]))
    s = torch.randn(len(t), 4, generator=torch.Generator().manual_seed(5)) * 3
    y = torch.from_numpy(batch["labels"])
    for T in (3.0, 1.5, 6.0):
        loss, _ = batch_loss(s, batch, reader, alpha=0.7, temperature=T)
        assert float(loss) == pytest.approx(reference_loss(s, t, y, 0.7, T), rel=1e-5), T


PIECEWISE = [("dense", None, spec) for spec in ("forward-kl", "reverse-kl", "jsd:0.3", "tv")] + [
    ("topk", {"top_k": 9}, spec) for spec in ("forward-kl", "reverse-kl", "jsd", "tv")] + [
    ("qtopk", {"top_k": 9, "value_bits": 4}, spec) for spec in ("forward-kl", "reverse-kl", "jsd", "tv")] + [
    ("sampled", {"samples": 6}, "forward-kl"), (None, None, None)]


@pytest.mark.parametrize("kind, options, divergence", PIECEWISE)
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_the_loss_in_pieces_of_positions_equals_the_loss_on_whole_logits(monkeypatch, kind, options, divergence, alpha):
    """Loss, parts and gradients (of the hidden states and the output layer) of
    stages.losses.piecewise_loss equal those on the whole logits, padding positions included
    (they count in neither and get no gradient), with pieces that cut through rows."""
    from stages import losses
    from stages.cache.layout import Layout
    from stages.kinds import KINDS
    from stages.loop import soft_label_loss
    from stages.teacher_rows import stored_rows

    classes, length, width = 600, 7, 16
    monkeypatch.setattr(losses, "LOGIT_PIECE_BYTES", 4 * classes * 5)  # five positions a piece: 3 rows of 7 cut across
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([7, 3, 5])
    batch = {"lengths": lengths, "labels": torch.randint(0, classes, (3, length), generator=generator)}
    if kind is not None:
        layout = Layout(kind=kind, num_samples=3, num_classes=classes, chunk_rows=3, dtype="float32", tokens=length, options=options)
        teacher = torch.randn(3, length, classes, generator=generator) * 3
        batch.update({k: v for k, v in stored_rows(teacher, layout, lengths, row_index=torch.arange(3)).items()
                      if k in KINDS[kind].soft_arrays})
    head = torch.nn.Linear(width, classes)
    hidden = torch.randn(3, length, width, generator=generator, requires_grad=True)
    common = dict(kind=KINDS[kind] if kind else None, alpha=alpha if kind else 0.0, temperature=2.0 if kind else None,
                  cache_temperature=2.0 if kind else None, **({"divergence": divergence} if kind else {}))
    results = []
    for student in (head(hidden), losses.HiddenAndHead(hidden, head)):
        loss, parts = soft_label_loss(student, batch, **common)
        grads = torch.autograd.grad(loss, [hidden, *head.parameters()])
        results.append((loss, parts, grads))
    (whole, whole_parts, whole_grads), (pieces, piece_parts, piece_grads) = results
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
    assert set(piece_parts) == set(whole_parts)
    for name in whole_parts:
        torch.testing.assert_close(piece_parts[name], whole_parts[name], rtol=1e-5, atol=1e-6)
    for got, expected in zip(piece_grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    padding = torch.arange(length) >= lengths.unsqueeze(1)
    assert (piece_grads[0][padding] == 0).all() and (piece_grads[0][~padding] != 0).any()


def test_the_loss_in_pieces_never_holds_the_whole_logits(monkeypatch):
    """Each piece's logits are at most LOGIT_PIECE_BYTES (as float32): the head sees pieces only."""
    from stages import losses

    seen = []

    class Recording(torch.nn.Linear):
        def forward(self, rows):
            seen.append(len(rows))
            return super().forward(rows)

    monkeypatch.setattr(losses, "LOGIT_PIECE_BYTES", 4 * 1000 * 64)
    head, hidden = Recording(8, 1000), torch.randn(300, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (300,))
    loss, _ = losses.piecewise_loss(None, losses.HiddenAndHead(hidden, head), {}, labels, alpha=0.0, temperature=None,
                                    cache_temperature=None)
    loss.backward()
    assert seen == [64, 64, 64, 64, 44] and hidden.grad.shape == hidden.shape  # the backward ran no head again
