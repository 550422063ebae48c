"""Each divergence of stages.divergences, through every kind that can train with it, against the
definition computed directly in float64 (value and gradient), zero for a student equal to its
teacher; the generalized JSD's ends; and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages import divergences
from stages.cache.layout import Layout
from stages.errors import InputError
from stages.kinds import KINDS
from stages.teacher_rows import stored_rows
from tests.conftest import invoke

CLASSES, ROWS, T = 40, 6, 2.0
OPTIONS = {"dense": None, "topk": {"top_k": 7}, "qtopk": {"top_k": 7, "value_bits": 8}}
SPECS = ("forward-kl", "reverse-kl", "jsd", "jsd:0.1", "jsd:0", "jsd:1", "tv")


def _reference(p: torch.Tensor, q: torch.Tensor, spec: str) -> torch.Tensor:
    """The mean over rows of the divergence `spec` from its textbook definition (float64)."""
    name, _, argument = spec.partition(":")
    if name == "forward-kl":
        return (p * (p.log() - q.log())).sum(-1).mean()
    if name == "reverse-kl":
        return (q * (q.log() - p.log())).sum(-1).mean()
    if name == "tv":
        return (p - q).abs().sum(-1).mean() / 2
    beta = float(argument or 0.5)
    if beta == 0:
        return _reference(p, q, "forward-kl")
    if beta == 1:
        return _reference(p, q, "reverse-kl")
    m = beta * p + (1 - beta) * q
    return (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean()


def _rows(name: str, logits: torch.Tensor) -> tuple[Layout, dict[str, np.ndarray]]:
    layout = Layout(kind=name, num_samples=ROWS, num_classes=CLASSES, chunk_rows=ROWS, dtype="float32", options=OPTIONS[name])
    return layout, {k: v.numpy() for k, v in stored_rows(logits, layout, row_index=torch.arange(ROWS)).items()}


def _collapsed(probs: torch.Tensor, support: np.ndarray | None) -> torch.Tensor:
    """A distribution over every class reduced to a kind's support: its classes, then the rest's mass."""
    if support is None:
        return probs
    kept = probs.gather(-1, torch.from_numpy(support))
    return torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("ratio", [1.0, 0.8])
def test_each_divergence_of_each_kind_equals_its_definition_in_value_and_gradient(name, spec, ratio):
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(ROWS, CLASSES, generator=generator) * 3
    layout, rows = _rows(name, teacher)
    kind = layout.soft_kind
    if ratio != 1.0 and not kind.exact_at_any_temperature:
        pytest.skip("at another temperature a top-k tail is an estimate (tests/stages/test_losses.py)")
    temperature = T / ratio
    student = (torch.randn(ROWS, CLASSES, generator=generator) * 2).requires_grad_()
    soft = {array: torch.from_numpy(rows[array]) for array in kind.soft_arrays}
    loss, parts = kind.loss(student, soft, None, alpha=1.0, temperature=temperature, cache_temperature=T, divergence=spec)
    (gradient,) = torch.autograd.grad(loss, student)

    exact = student.detach().double().requires_grad_()
    p = torch.from_numpy(kind.probabilities(rows, CLASSES, ratio))  # the teacher on the kind's support, float64
    q = _collapsed(torch.softmax(exact / temperature, -1), kind.support(rows))
    expected = temperature**2 * _reference(p, q, spec)
    (expected_gradient,) = torch.autograd.grad(expected, exact)
    assert float(parts["kd"]) == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", OPTIONS)
def test_a_student_equal_to_its_teacher_is_at_zero(name, spec):
    teacher = torch.randn(ROWS, CLASSES, generator=torch.Generator().manual_seed(2)) * 3
    layout, rows = _rows(name, teacher)
    kind = layout.soft_kind
    soft = {array: torch.from_numpy(rows[array]) for array in kind.soft_arrays}
    decoded = torch.from_numpy(kind.probabilities(rows, CLASSES, 1.0))
    if decoded.shape[-1] != CLASSES:  # a top-k teacher: every class outside the kept ones at the tail's even share
        full = torch.full((ROWS, CLASSES), 0.0, dtype=torch.float64)
        full += (decoded[:, -1:] / (CLASSES - decoded.shape[-1] + 1))
        full.scatter_(-1, torch.from_numpy(kind.support(rows)), decoded[:, :-1])
        decoded = full
    student = decoded.log().float() * T  # logits whose softmax at T is the teacher's
    loss, _ = kind.loss(student, soft, None, alpha=1.0, temperature=T, cache_temperature=T, divergence=spec)
    assert abs(float(loss)) < 1e-5, float(loss)


def test_the_generalized_jsd_tends_to_forward_kl_and_to_reverse_kl_at_its_ends():
    generator = torch.Generator().manual_seed(3)
    log_p = torch.log_softmax(torch.randn(5, 30, generator=generator, dtype=torch.float64) * 2, -1)
    log_q = torch.log_softmax(torch.randn(5, 30, generator=generator, dtype=torch.float64) * 2, -1)
    forward, reverse = divergences.parse("forward-kl")(log_p, log_q), divergences.parse("reverse-kl")(log_p, log_q)
    torch.testing.assert_close(divergences.parse("jsd:1e-06")(log_p, log_q) / 1e-6, forward, rtol=1e-3, atol=0)
    torch.testing.assert_close(divergences.parse("jsd:0.999999")(log_p, log_q) / 1e-6, reverse, rtol=1e-3, atol=0)
    torch.testing.assert_close(divergences.parse("jsd:0")(log_p, log_q), forward)
    torch.testing.assert_close(divergences.parse("jsd:1")(log_p, log_q), reverse)
    assert divergences.parse("jsd").spec == "jsd:0.5"


def test_reverse_kl_against_a_teacher_that_gives_an_outcome_nothing_is_finite():
    log_p = torch.tensor([[0.0, float("-inf")]])  # a top-k row whose tail rounded to 0
    log_q = torch.log(torch.tensor([[0.9, 0.1]])).requires_grad_()
    value = divergences.parse("reverse-kl")(log_p, log_q)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(log_q.grad).all() and float(value.detach()) > 8


@pytest.mark.parametrize("spec, words", [
    ("kl", "`divergence` must be one of forward-kl, reverse-kl, jsd, tv"),
    ("jsd:2", "BETA between 0 and 1"),
    ("jsd:half", "BETA between 0 and 1"),
    ("tv:3", "takes no parameter"),
])
def test_an_unknown_divergence_is_an_input_error(spec, words):
    with pytest.raises(InputError, match=words):
        divergences.parse(spec)


def test_a_sampled_cache_trains_with_forward_kl_only_and_says_so_before_any_work(tmp_path, teacher_weights):
    from tests.conftest import cache_with_cli

    sampled = KINDS["sampled"]
    with pytest.raises(InputError, match="unbiased estimate of forward-kl only"):
        sampled.check_divergence("reverse-kl")
    sampled.check_divergence("forward-kl")
    cache = cache_with_cli(tmp_path / "s.zarr", teacher_weights, "--format", "sampled", "--samples", "8")["cache"]
    code, _, err = invoke("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--device", "cpu",
                          "--divergence", "jsd:0.5", "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and "not of --divergence jsd:0.5" in err, err
    assert not (tmp_path / "run").exists()


def test_train_student_records_its_divergence_and_names_its_run_after_it(tmp_path, teacher_weights, monkeypatch):
    from tests.conftest import cache_with_cli, invoke_json

    cache = cache_with_cli(tmp_path / "d.zarr", teacher_weights)["cache"]
    monkeypatch.chdir(tmp_path)
    result = invoke_json("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--device", "cpu",
                         "--divergence", "reverse-kl", "--out", tmp_path / "run")
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["divergence"] == "reverse-kl"
    assert result["mode"] == "distilled"
