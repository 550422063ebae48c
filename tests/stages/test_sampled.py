"""The sampled kind (random-sampling KD, Anshumann et al., ACL 2025): its draws are a function of
(sample_seed, row index, position, draw number) alone, and its loss is an unbiased estimate of
the dense loss and of its gradient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from stages.cache.layout import Layout
from stages.errors import InputError
from stages.kinds import KINDS
from stages.kinds.sampled import _mix
from stages.losses import distillation_loss, sampled_distillation_loss
from stages.teacher_rows import stored_rows
from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE, cache_with_cli, invoke, invoke_json


def _splitmix64(x: int) -> int:
    """The reference: SplitMix64's step in Python's unbounded integers, reduced mod 2^64."""
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def test_the_int64_mix_is_splitmix64_modulo_two_to_the_64():
    values = [0, 1, 2**62 + 12345, 2**63 - 1, -1, -(2**63)]  # as uint64: 0 .. 2^64 - 1
    mixed = _mix(torch.tensor(values, dtype=torch.int64))
    assert [int(v) % 2**64 for v in mixed] == [_splitmix64(v % 2**64) for v in values]


def _layout(classes: int, samples: int, seed: int = 0, tokens: int | None = None, rows: int = 8) -> Layout:
    return Layout(kind="sampled", num_samples=rows, num_classes=classes, chunk_rows=rows, dtype="float32",
                  options={"samples": samples, "sample_seed": seed}, tokens=tokens)


def test_a_rows_draws_do_not_depend_on_the_batch_or_the_piece_of_positions():
    layout = _layout(classes=300, samples=12, tokens=10)
    logits = torch.randn(8, 10, 300, generator=torch.Generator().manual_seed(0)) * 2
    lengths = torch.tensor([10, 3, 7, 10, 1, 5, 9, 2])
    whole = stored_rows(logits, layout, lengths, row_index=torch.arange(8))
    # Rows 3..5 alone, their positions in two pieces.
    pieces = [stored_rows(logits[3:6, first:stop], layout, lengths[3:6], first_position=first, row_index=torch.arange(3, 6))
              for first, stop in ((0, 4), (4, 10))]
    for name in whole:
        torch.testing.assert_close(torch.cat([p[name] for p in pieces], dim=1), whole[name][3:6], rtol=0, atol=0)
    # Another seed, or another row index, draws otherwise.
    other = stored_rows(logits, _layout(classes=300, samples=12, seed=1, tokens=10), lengths, row_index=torch.arange(8))
    assert not torch.equal(other["sampled_ids"], whole["sampled_ids"])
    shifted = stored_rows(logits, layout, lengths, row_index=torch.arange(1, 9))
    assert not torch.equal(shifted["sampled_ids"], whole["sampled_ids"])


def test_stored_rows_are_distinct_ascending_ids_with_counts_summing_to_s_and_the_teachers_entropy():
    layout = _layout(classes=40, samples=12)
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(1)) * 3
    rows = {k: v.numpy() for k, v in stored_rows(logits, layout, row_index=torch.arange(8)).items()}
    ids, counts = rows["sampled_ids"].astype(np.int64), rows["sampled_counts"].astype(np.int64)
    assert (counts.sum(-1) == 12).all()
    for row_ids, row_counts in zip(ids, counts):
        used = row_ids[row_counts > 0]
        assert (np.diff(used) > 0).all() and (row_counts[len(used):] == 0).all() and (row_ids[len(used):] == 0).all()
    p = torch.softmax(logits.double(), -1)
    np.testing.assert_allclose(rows["entropy"], -(p * p.log()).sum(-1).numpy(), rtol=1e-6)
    assert KINDS["sampled"].row_problem(rows, _layout(classes=40, samples=12)) is None
    counts_off = {**rows, "sampled_counts": rows["sampled_counts"].copy()}
    counts_off["sampled_counts"][2, 0] += 1
    assert "do not sum" in KINDS["sampled"].row_problem(counts_off, _layout(classes=40, samples=12))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_expected_sampled_loss_and_its_gradient_are_the_dense_ones(temperature):
    """Over N independent draws of S = 8 classes from one teacher row at C = 50 (N rows with the
    same logits: each row index draws independently), the mean sampled loss and the mean of its
    gradient in the student's logits lie within 4 standard errors of the dense loss of the cache
    (`distillation_loss`: T^2 KL(p || q)) and of its gradient, which it estimates without bias
    (5 standard errors for each of the gradient's 50 entries)."""
    classes, samples, draws = 50, 8, 4000
    teacher = torch.randn(classes, generator=torch.Generator().manual_seed(2)) * 2  # logits / T
    student = torch.randn(classes, generator=torch.Generator().manual_seed(3)) * 2
    layout = _layout(classes, samples, rows=draws)
    rows = stored_rows(teacher.expand(draws, classes).contiguous(), layout, row_index=torch.arange(draws))

    losses, grads = [], []
    for row in range(draws):  # each draw's loss and gradient on its own
        s = student.clone().requires_grad_(True)
        loss, _ = sampled_distillation_loss(s[None], rows["sampled_ids"][row : row + 1], rows["sampled_counts"][row : row + 1],
                                            rows["entropy"][row : row + 1], None, alpha=1.0, temperature=temperature)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(s.grad.double())
    losses, grads = torch.tensor(losses, dtype=torch.float64), torch.stack(grads)

    s = student.clone().requires_grad_(True)
    dense, _ = distillation_loss(s[None], teacher[None], None, alpha=1.0, temperature=temperature)
    dense.backward()
    dense, loss_error = float(dense.detach()), float(losses.std() / draws**0.5)
    assert abs(float(losses.mean()) - dense) <= 4 * loss_error, (float(losses.mean()), dense, loss_error)
    # The gradient in s of -T^2 sum_i (c_i / S) log q(id_i) is T (q - c / S) (scattered over the
    # classes): its class-j entry varies as T^2 p_j (1 - p_j) / S, the multinomial's. Per class,
    # with that exact variance (the sample one is 0 for a class never drawn): within 5 standard
    # errors, which all 50 classes meet by chance but for one in a million runs.
    p = torch.softmax(teacher.double(), -1)
    grad_error = temperature * (p * (1 - p) / samples / draws).sqrt()
    assert ((grads.mean(0) - s.grad.double()).abs() <= 5 * grad_error).all()


def test_the_sampled_loss_is_mixed_with_the_hard_labels_as_the_dense_one_and_refuses_another_temperature():
    """A direct reference: (1 - a) CE(y, s) + a T^2 (sum_i c_i / S * -log q(id_i) - H)."""
    student = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[0, 2, 5, 0], [1, 0, 0, 0], [0, 1, 2, 3]], dtype=torch.uint8)
    counts = torch.tensor([[1, 2, 1, 0], [4, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.uint8)
    entropy = torch.tensor([0.5, 0.1, 1.2])
    labels = torch.tensor([2, 1, 0])
    t, alpha = 2.0, 0.3
    log_q = torch.log_softmax(student.double() / t, -1)
    cross = torch.stack([-(counts[r].double() / 4 * log_q[r, ids[r].long()]).sum() for r in range(3)])
    expected = (1 - alpha) * torch.nn.functional.cross_entropy(student.double(), labels) + alpha * t**2 * (cross - entropy.double()).mean()
    soft = {"sampled_ids": ids, "sampled_counts": counts, "entropy": entropy}
    loss, parts = KINDS["sampled"].loss(student, soft, labels, alpha=alpha, temperature=t, cache_temperature=t)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and set(parts) == {"ce", "kd"}
    with pytest.raises(InputError, match="trains at that temperature only"):
        KINDS["sampled"].loss(student, soft, labels, alpha=alpha, temperature=1.0, cache_temperature=t)


def test_train_student_trains_from_a_sampled_cache_at_its_temperature_and_refuses_another_before_starting(tmp_path, teacher_weights):
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--format", "sampled", "--samples", "12")["cache"]
    options = ("--cache", cache, "--student", "mlp:width=16", "--epochs", 6, "--batch-size", 64, "--device", "cpu")
    code, _, err = invoke("train-student", *options, "--temperature", 1.0, "--out", tmp_path / "other-t")
    assert code == 2 and "trains at that temperature only" in err and not (tmp_path / "other-t").exists(), err
    run = invoke_json("train-student", *options, "--out", tmp_path / "run")
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0] and run["test_accuracy"] > 0.5, (losses, run)


def test_a_class_the_teacher_masks_at_minus_infinity_is_never_drawn_and_the_entropy_stays_finite():
    logits = torch.randn(8, 20, generator=torch.Generator().manual_seed(5))
    logits[:, 3] = float("-inf")
    rows = stored_rows(logits, _layout(classes=20, samples=12), row_index=torch.arange(8))
    drawn = rows["sampled_ids"][rows["sampled_counts"] > 0]
    assert (drawn != 3).all() and torch.isfinite(rows["entropy"]).all()


def test_the_sample_seed_is_recorded_changes_the_draws_and_a_cache_of_another_seed_is_not_resumed(tmp_path, teacher_weights):
    sampled = ("--format", "sampled", "--samples", "12")
    cache_with_cli(tmp_path / "seed0.zarr", teacher_weights, *sampled)
    cache_with_cli(tmp_path / "seed7.zarr", teacher_weights, *sampled, "--sample-seed", "7")
    first, second = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("seed0.zarr", "seed7.zarr"))
    options = first.attrs["kind_options"], second.attrs["kind_options"]
    assert (options[0]["sample_seed"], options[1]["sample_seed"]) == (0, 7) and options[0]["samples"] == 12
    assert not np.array_equal(first["sampled_counts"][:], second["sampled_counts"][:])
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--temperature", TEMPERATURE, "--chunk-rows", CHUNK_ROWS, "--device", "cpu", "--out",
                          tmp_path / "seed0.zarr", *sampled, "--sample-seed", "7")
    assert code == 2 and "sample_seed: cache has 0, this run 7" in err, err
