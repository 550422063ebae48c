"""The headtail kind (a top-k head with a sampled tail): its head is a qtopk row, its draws come
from the tail alone, and its loss is an unbiased estimate of the dense loss and of its gradient,
at a language model's vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages import divergences
from stages.cache.layout import Layout
from stages.errors import InputError
from stages.kinds import KINDS
from stages.teacher_rows import stored_rows
from tests.conftest import cache_with_cli, invoke, invoke_json
from tests.doc_examples import example

HEADTAIL = KINDS["headtail"]
CLASSES = 8192


def _layout(classes: int, top_k: int, samples: int, rows: int, value_bits: int = 8, tokens: int | None = None,
            kind: str = "headtail") -> Layout:
    options = {"top_k": top_k, "value_bits": value_bits}
    if kind == "headtail":
        options |= {"samples": samples, "sample_seed": 0}
    return Layout(kind=kind, num_samples=rows, num_classes=classes, chunk_rows=rows, dtype="float32", options=options, tokens=tokens)


def _teacher_row(seed: int) -> torch.Tensor:
    """A language model's row of logits / T over 8,192 classes: a few dozen likely classes above a
    long tail that holds a fair share of the mass."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(CLASSES, generator=generator) * 1.5
    likely = torch.randperm(CLASSES, generator=generator)[:40]
    return logits.index_add_(0, likely, torch.rand(40, generator=generator) * 8)


def test_the_head_is_the_qtopk_row_and_the_draws_come_from_the_tail_alone():
    rows_count, top_k, samples = 64, 8, 12
    teacher = torch.stack([_teacher_row(seed) for seed in range(rows_count)])
    rows = stored_rows(teacher, _layout(CLASSES, top_k, samples, rows_count), row_index=torch.arange(rows_count))
    qtopk = stored_rows(teacher, _layout(CLASSES, top_k, samples, rows_count, kind="qtopk"))
    for name in qtopk:  # bit for bit qtopk's head, and its encoding error
        torch.testing.assert_close(rows[name], qtopk[name], rtol=0, atol=0)
    head = rows["qtopk_class_deltas"].long().cumsum(-1)
    ids, counts = rows["sampled_ids"].long(), rows["sampled_counts"].long()
    assert (counts.sum(-1) == samples).all()
    drawn = counts > 0
    assert not (ids[:, :, None] == head[:, None, :])[drawn].any()  # no draw is a kept class
    p = torch.softmax(teacher.double(), -1)
    tail = p.scatter(-1, head, 0.0)
    np.testing.assert_allclose(rows["qtopk_tail"].numpy(), tail.sum(-1).numpy(), rtol=1e-5)
    r = tail / tail.sum(-1, keepdim=True)
    np.testing.assert_allclose(rows["tail_entropy"].numpy(), -torch.xlogy(r, r).sum(-1).numpy(), rtol=1e-5)
    numpy_rows = {k: v.numpy() for k, v in rows.items() if k != "encoding_error"}
    assert HEADTAIL.row_problem(numpy_rows, _layout(CLASSES, top_k, samples, rows_count)) is None
    # A row's draws depend on its index and the seed alone: rows 3..5 encoded apart draw the same.
    apart = stored_rows(teacher[3:6], _layout(CLASSES, top_k, samples, 3), row_index=torch.arange(3, 6))
    torch.testing.assert_close(apart["sampled_ids"], rows["sampled_ids"][3:6], rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_expected_headtail_loss_and_its_gradient_are_the_dense_ones(temperature):
    """Over N = 3,000 independent draws of S = 12 tail classes for one teacher row of 8,192
    classes with K = 8 kept (N rows with the same logits: each row index draws independently),
    the mean loss lies within 4 standard errors of the dense loss T^2 KL(p' || q), and the mean
    gradient in the student's logits within 5 standard errors of the dense gradient for every
    class. p' is the distribution the cache encodes: its head as the codes decode (value_bits 8)
    and the teacher's own probabilities elsewhere."""
    draws, top_k, samples = 3000, 8, 12
    teacher = _teacher_row(7)
    student = torch.randn(CLASSES, generator=torch.Generator().manual_seed(8)) * 2
    rows = stored_rows(teacher.expand(draws, CLASSES).contiguous(), _layout(CLASSES, top_k, samples, draws),
                       row_index=torch.arange(draws))
    soft = {name: rows[name] for name in HEADTAIL.soft_arrays}

    s = student.expand(draws, CLASSES).clone().requires_grad_(True)  # each row's gradient its own
    terms = temperature**2 * HEADTAIL.soft_terms(s / temperature, soft, divergences.parse("forward-kl"), ratio=1.0, cache_temperature=temperature)
    terms.sum().backward()
    losses, grads = terms.detach().double(), s.grad.double()

    p = torch.softmax(teacher.double(), -1)
    head = rows["qtopk_class_deltas"][0].long().cumsum(-1)
    decoded = HEADTAIL.probabilities({k: v[:1].numpy() for k, v in rows.items()}, CLASSES, 1.0)[0, :top_k]
    encoded = p.clone().scatter_(-1, head, torch.from_numpy(decoded))
    dense_s = student.clone().requires_grad_(True)
    log_q = torch.log_softmax(dense_s.double() / temperature, -1)
    dense = temperature**2 * (encoded * (encoded.log() - log_q)).sum()
    dense.backward()
    loss_error = float(losses.std() / draws**0.5)
    dense = float(dense.detach())
    assert loss_error > 0 and abs(float(losses.mean()) - dense) <= 4 * loss_error, (float(losses.mean()), dense, loss_error)
    # The gradient of T^2 t sum_i (c_i / S) (-log q(id_i)) in s is T t (q - c / S) over the tail:
    # the entry of a set of tail classes R, summed, varies as T^2 t^2 r_R (1 - r_R) / S, r = p / t
    # on the tail (0 on the head, whose gradient is exact: float32's rounding allowed). Per class
    # where N S r_j >= 25 (its count over the draws near normal); the rarer classes, whose means
    # a single draw moves by many of their standard errors, as one set.
    tail = p.scatter(-1, head, 0.0)
    t = tail.sum()
    r = tail / t
    difference = grads.mean(0) - dense_s.grad.double()
    common = draws * samples * r >= 25
    rare = ~common & (r > 0)
    grad_error = temperature * t * (r * (1 - r) / samples / draws).sqrt()
    assert (difference[~common & ~rare].abs() <= 1e-6).all()  # the head
    assert (difference[common].abs() <= 5 * grad_error[common]).all()
    r_rare = r[rare].sum()
    rare_error = temperature * t * (r_rare * (1 - r_rare) / samples / draws).sqrt()
    assert abs(float(difference[rare].sum())) <= 4 * float(rare_error), (float(difference[rare].sum()), float(rare_error))
    assert t > 0.1 and common.sum() > 100 and r_rare > 0.05  # a tail with mass, in classes of both sorts


def test_with_every_class_kept_there_are_no_draws_and_the_loss_is_qtopks():
    classes = 40
    teacher = torch.randn(6, classes, generator=torch.Generator().manual_seed(9)) * 3
    student = torch.randn(6, classes, generator=torch.Generator().manual_seed(10))
    rows = stored_rows(teacher, _layout(classes, classes, 12, 6), row_index=torch.arange(6))
    assert (rows["sampled_counts"] == 0).all() and (rows["tail_entropy"] == 0).all() and (rows["qtopk_tail"] == 0).all()
    qtopk = stored_rows(teacher, _layout(classes, classes, 12, 6, kind="qtopk"))
    ours = HEADTAIL.loss(student, rows, None, alpha=1.0, temperature=2.0, cache_temperature=2.0)[0]
    theirs = KINDS["qtopk"].loss(student, qtopk, None, alpha=1.0, temperature=2.0, cache_temperature=2.0)[0]
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    assert HEADTAIL.row_problem({k: v.numpy() for k, v in rows.items()}, _layout(classes, classes, 12, 6)) is None


@pytest.mark.parametrize("divergence", ["reverse-kl", "jsd", "jsd:0.2", "tv"])
def test_divergences_without_an_unbiased_estimate_and_other_temperatures_are_refused(divergence):
    teacher = torch.randn(4, 50, generator=torch.Generator().manual_seed(11))
    rows = stored_rows(teacher, _layout(50, 4, 8, 4), row_index=torch.arange(4))
    student = torch.randn(4, 50)
    with pytest.raises(InputError, match=f"unbiased estimate of forward-kl only, not of `divergence` {divergence}"):
        HEADTAIL.loss(student, rows, None, alpha=1.0, temperature=1.0, cache_temperature=1.0, divergence=divergence)
    with pytest.raises(InputError, match="trains at that temperature only"):
        HEADTAIL.loss(student, rows, None, alpha=1.0, temperature=2.0, cache_temperature=1.0)
    with pytest.raises(InputError, match="cannot be re-tempered"):
        HEADTAIL.probabilities({k: v.numpy() for k, v in rows.items()}, 50, 2.0)


def test_a_headtail_cache_is_made_verified_inspected_against_a_dense_reference_and_trained_from(tmp_path, teacher_weights):
    """Through the command line: its options are flags, verify redraws the tail and rechecks the
    codes, inspect gives the tail's mass, the distinct draws and, against a dense cache of the
    same teacher, the total variation of the row it estimates (its kept classes, the tail's mass
    shared among the drawn classes by their counts), and a student trains on it."""
    options = ("--format", "headtail", "--top-k", 2, "--samples", 3, "--value-bits", 4)
    cache = cache_with_cli(tmp_path / "h.zarr", teacher_weights, *options)["cache"]
    dense = cache_with_cli(tmp_path / "dense.zarr", teacher_weights)["cache"]
    assert invoke_json("verify", cache, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "40")["ok"]
    described = invoke_json("inspect", cache)
    assert (described["top_k"], described["samples"], described["value_bits"]) == (2, 3, 4)
    assert 0 < described["tail_mass"]["mean"] < 1 and 1 <= described["distinct_sampled_ids"]["mean"] <= 2
    assert described["encoding_error"]["positions"] == described["num_samples"]

    import zarr

    group, reference = zarr.open_group(str(cache), mode="r"), zarr.open_group(str(dense), mode="r")
    z = reference["logits"][:].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rows = {name: group[name][:] for name in HEADTAIL.soft_arrays}
    estimate = np.zeros_like(p)
    support, probabilities = HEADTAIL.support(rows), HEADTAIL.probabilities(rows, p.shape[1], 1.0)
    np.add.at(estimate, (np.arange(len(p))[:, None], support), probabilities)
    np.testing.assert_allclose(estimate.sum(-1), 1.0, atol=1e-6)
    # The documented recipe (example headtail-decode), run as written: the kind's own decoding, and a
    # head whose kept classes are the teacher's most probable, with the teacher's probabilities to within a step.
    decoded: dict = {}
    exec(compile(example("headtail-decode", path=repr(str(cache))), "example headtail-decode", "exec"), decoded)  # noqa: S102
    np.testing.assert_allclose(np.concatenate([decoded["p"], decoded["estimate"]], -1), probabilities, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate([decoded["classes"], decoded["ids"]], -1), support)
    np.testing.assert_array_equal(np.sort(decoded["classes"], -1), np.sort(np.argsort(-p, -1)[:, :2], -1))
    np.testing.assert_allclose(decoded["p"], np.take_along_axis(p, decoded["classes"], -1), rtol=0.15)
    np.testing.assert_allclose(decoded["tail"], 1 - np.take_along_axis(p, decoded["classes"], -1).sum(-1), atol=1e-3)
    measured = invoke_json("inspect", cache, "--reference", dense)["against_reference"]
    assert measured["total_variation"] == pytest.approx(0.5 * np.abs(p - estimate).sum(-1).mean(), rel=1e-6)

    code, _, err = invoke("train-student", "--cache", cache, "--student", "mlp:width=16", "--divergence", "tv", "--out",
                          tmp_path / "refused")
    assert code == 2 and "unbiased estimate of forward-kl only" in err and not (tmp_path / "refused").exists(), err
    run = invoke_json("train-student", "--cache", cache, "--student", "mlp:width=16", "--epochs", 6, "--batch-size", 64,
                      "--device", "cpu", "--out", tmp_path / "run")
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0] and run["test_accuracy"] > 0.5, (losses, run)
