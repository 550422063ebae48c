"""Every cache kind of the registry, tested once: encoding teacher logits into stored rows and
decoding them back, the training loss against a direct computation, re-tempering, padding of
token positions, and class indices at real vocabularies (uint16, uint32)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from stages import config
from stages.cache.layout import Layout
from stages.cache.reader import CacheReader
from stages.cache.writer import CacheWriter
from stages.data import sha256
from stages.errors import InputError
from stages.kinds import KINDS, index_dtype, option_fields
from stages.train_student import batch_loss
from stages.teacher_rows import stored_rows

# What a kind needs besides the classes to describe a layout (a kind that needs nothing is absent).
OPTIONS = {"topk": {"top_k": 5}, "qtopk": {"top_k": 5, "value_bits": 8}, "sampled": {"samples": 12},
           "headtail": {"top_k": 5, "value_bits": 8, "samples": 12}}
# Kinds whose stored rows give an estimate of the teacher's distribution at the cache's T only
# (their own tests: tests/stages/test_sampled.py, test_headtail.py), not its probabilities on their support.
ESTIMATES = {"sampled", "headtail"}
# How far a lossy kind's probabilities may be from the teacher's (qtopk at 8 bits: a step of at
# most 1/255 of the kept logits' spread; its own tests: tests/stages/test_qtopk.py).
ATOL = {"qtopk": 0.01}


def _layout(name: str, classes: int, tokens: int | None = None, samples: int = 6) -> Layout:
    return Layout(kind=name, num_samples=samples, num_classes=classes, chunk_rows=4, dtype="float32", tokens=tokens,
                  options=OPTIONS.get(name))


def _encoded(name: str, classes: int, tokens: int | None = None, lengths: np.ndarray | None = None, seed: int = 0):
    """A layout, teacher logits / T of shape (6, [tokens,] classes), and their stored rows as numpy."""
    layout = _layout(name, classes, tokens)
    shape = (6, *(() if tokens is None else (tokens,)), classes)
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    rows = stored_rows(logits, layout, None if lengths is None else torch.from_numpy(lengths), row_index=torch.arange(6))
    return layout, logits.double(), {k: v.numpy() for k, v in rows.items()}


def _collapsed(probs: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """A full distribution over the classes reduced to a kind's support: the support's classes in
    order, then the rest's total mass (absent when the support is every class)."""
    if support is None:
        return probs
    kept = probs.gather(-1, support)
    if support.shape[-1] == probs.shape[-1]:
        return kept
    return torch.cat([kept, 1.0 - kept.sum(-1, keepdim=True)], dim=-1)


def test_the_registry_names_each_kind_once_and_is_what_configs_and_layouts_accept():
    assert all(kind.name == name for name, kind in KINDS.items())
    with pytest.raises(InputError, match=", ".join(KINDS)):
        Layout(kind="sampled-someday", num_samples=1, num_classes=2, chunk_rows=1)
    with pytest.raises(InputError, match=f"`format` must be one of {', '.join(KINDS)}"):
        config.CacheTeacherConfig(teacher="t", dataset="d", out="c.zarr", format="sampled-someday").validate()
    for name, kind in KINDS.items():  # a kind's options are set for it, and only for it
        own = {field.name for field in dataclasses.fields(kind.Options)}
        given = {option: 3 for option in own}
        config.CacheTeacherConfig(teacher="t", dataset="d", out="c.zarr", format=name, kind_options=given).validate()
        for other in set(option_fields()) - own:
            with pytest.raises(InputError, match=f"`{other}` goes with `format`"):
                config.CacheTeacherConfig(teacher="t", dataset="d", out="c.zarr", format=name,
                                          kind_options={**given, other: 3}).validate()


@pytest.mark.parametrize("name", KINDS)
def test_encode_then_decode_gives_the_teachers_probabilities_on_the_kinds_support(name):
    layout, logits, rows = _encoded(name, classes=12)
    kind = layout.soft_kind
    assert set(rows) - {"encoding_error"} == set(kind.soft_arrays) == set(kind.arrays(layout))
    assert ("encoding_error" in rows) == kind.lossy
    for array, spec in kind.arrays(layout).items():
        assert rows[array].shape == (6, *spec.shape) and str(rows[array].dtype) == spec.dtype
    if name in ESTIMATES:
        pytest.skip("its probabilities are an estimate of the teacher's (tests/stages/test_sampled.py, test_headtail.py)")
    support = kind.support(rows)
    expected = _collapsed(torch.softmax(logits, -1), None if support is None else torch.from_numpy(support))
    np.testing.assert_allclose(kind.probabilities(rows, 12, 1.0)[..., : expected.shape[-1]], expected.numpy(),
                               atol=ATOL.get(name, 1e-6))
    np.testing.assert_array_equal(kind.top1(rows), logits.argmax(-1).numpy())


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("temperature", [2.0, 1.0, 0.5, 7.0])
def test_the_loss_equals_a_direct_computation_at_the_caches_temperature(name, temperature):
    """(1 - a) CE(y, s) + a T^2 KL(p || q), p and q the teacher's and student's softmax at T over
    the kind's support, computed here from the full teacher logits in float64."""
    cache_t, alpha = 2.0, 0.7
    layout, logits_over_t, rows = _encoded(name, classes=12)
    kind = layout.soft_kind
    student = torch.randn(6, 12, generator=torch.Generator().manual_seed(1)) * 2
    labels = torch.arange(6) % 12
    if name in ESTIMATES:
        pytest.skip("its loss is an estimate of this one (tests/stages/test_sampled.py, test_headtail.py)")
    if temperature == cache_t or kind.exact_at_any_temperature:
        teacher_at_t = logits_over_t * (cache_t / temperature)
    else:
        pytest.skip("at another temperature this kind's tail is an estimate (test_retempering_keeps_the_kept_ratios)")
    support = kind.support(rows)
    support = None if support is None else torch.from_numpy(support)
    p = _collapsed(torch.softmax(teacher_at_t, -1), support)
    if kind.lossy:  # the loss is the exact one on what the cache stores
        p = torch.from_numpy(kind.probabilities(rows, 12, 1.0))
    q = _collapsed(torch.softmax(student.double() / temperature, -1), support)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    expected = (1 - alpha) * torch.nn.functional.cross_entropy(student.double(), labels) + alpha * temperature**2 * kl
    soft = {k: torch.from_numpy(v) for k, v in rows.items()}
    loss, parts = kind.loss(student, soft, labels, alpha=alpha, temperature=temperature, cache_temperature=cache_t)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert set(parts) == {"ce", "kd"}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("ratio", [0.5, 3.0])
def test_retempering_keeps_the_kept_ratios(name, ratio):
    """At T' = T / ratio the probabilities of the kept classes, relative to each other, are the
    teacher's exactly; a kind exact at any temperature gives the whole distribution exactly."""
    layout, logits_over_t, rows = _encoded(name, classes=12)
    kind = layout.soft_kind
    if name in ESTIMATES:  # drawn at the cache's T, they say nothing exact about another
        with pytest.raises(InputError, match="cannot be re-tempered"):
            kind.probabilities(rows, 12, ratio)
        return
    support = kind.support(rows)
    true = torch.softmax(logits_over_t * ratio, -1)
    retempered = kind.probabilities(rows, 12, ratio)
    if kind.exact_at_any_temperature:
        np.testing.assert_allclose(retempered[..., :12], _collapsed(true, None if support is None else
                                                                    torch.from_numpy(support)).numpy(), atol=1e-6)
    kept = true.numpy() if support is None else np.take_along_axis(true.numpy(), support, -1)
    width = kept.shape[-1]
    np.testing.assert_allclose(retempered[..., :width] / retempered[..., :width].sum(-1, keepdims=True),
                               kept / kept.sum(-1, keepdims=True), atol=ATOL.get(name, 1e-6))
    assert np.allclose(retempered.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", KINDS)
def test_padding_is_zero_in_every_array_and_never_counts_in_the_loss(name):
    lengths = np.array([1, 4, 2, 3, 4, 1])
    layout, logits_over_t, rows = _encoded(name, classes=12, tokens=4, lengths=lengths)
    kind = layout.soft_kind
    padding = np.arange(4)[None, :] >= lengths[:, None]
    for array in kind.soft_arrays:
        assert (rows[array][padding] == 0).all(), array
    student = torch.randn(6, 4, 12, generator=torch.Generator().manual_seed(2))
    labels = np.arange(24).reshape(6, 4) % 12
    cache = types.SimpleNamespace(layout=layout, soft_arrays=kind.soft_arrays, temperature=2.0)
    loss, _ = batch_loss(student, {**rows, "labels": labels, "lengths": lengths}, cache, alpha=0.5, temperature=2.0)
    valid = torch.from_numpy(~padding)
    soft = {k: torch.from_numpy(v)[valid] for k, v in rows.items()}
    expected, _ = kind.loss(student[valid], soft, torch.from_numpy(labels)[valid], alpha=0.5, temperature=2.0,
                            cache_temperature=2.0)
    assert float(loss) == float(expected)
    # What the teacher says at padding changes nothing stored.
    noisy = logits_over_t.float().clone()
    noisy[torch.from_numpy(padding)] = 1e4
    again = stored_rows(noisy, layout, torch.from_numpy(lengths), row_index=torch.arange(6))
    for array in kind.soft_arrays:
        np.testing.assert_array_equal(again[array].numpy(), rows[array])


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("classes, dtype", [(256, "uint8"), (8192, "uint16"), (70_000, "uint32")])
def test_token_rows_at_real_vocabularies_are_written_and_read_with_every_index_dtype(tmp_path, name, classes, dtype):
    """Class numbers take the smallest unsigned type; a padded token batch encodes (torch has no
    masked_fill for uint16/32), writes, reads back through the checked reader, and trains."""
    assert index_dtype(classes) == dtype
    lengths = np.array([3, 1, 2, 3, 2, 1])
    layout, logits_over_t, rows = _encoded(name, classes=classes, tokens=3, lengths=lengths)
    kind = layout.soft_kind
    # Every integer array holds class numbers, except a sampled row's counts of draws and a qtopk
    # row's codes (uint8 at any vocabulary).
    classes_of = [array for array, spec in kind.arrays(layout).items()
                  if np.issubdtype(spec.dtype, np.integer) and array not in ("sampled_counts", "qtopk_codes")]
    assert all(str(rows[array].dtype) == dtype for array in classes_of)
    support = kind.support(rows)
    valid = np.arange(3)[None, :] < lengths[:, None]
    if support is not None and name not in ESTIMATES:  # the kept classes are the teacher's largest, at every valid token
        largest = torch.topk(logits_over_t, support.shape[-1], dim=-1).indices.numpy()
        np.testing.assert_array_equal(np.sort(support[valid], -1), np.sort(largest[valid], -1))
    writer = CacheWriter.create(tmp_path / "c.zarr", layout, {"temperature": 2.0, "teachers": [],
                                                                "dataset": {"index_sha256": sha256(np.arange(6))}})
    with writer:
        writer.write_rows(0, {**rows, "index": np.arange(6), "labels": np.zeros((6, 3), dtype=np.int64),
                              "lengths": lengths.astype(np.int32)})
    writer.mark_complete({})
    read = CacheReader(tmp_path / "c.zarr").read_rows(0, 6)
    for array in kind.soft_arrays:
        np.testing.assert_array_equal(read[array], rows[array])
    student = torch.randn(6, 3, classes, generator=torch.Generator().manual_seed(3), requires_grad=True)
    cache = types.SimpleNamespace(layout=layout, soft_arrays=kind.soft_arrays, temperature=2.0)
    loss, _ = batch_loss(student, read, cache, alpha=1.0, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad[torch.from_numpy(~valid)] == 0).all()  # padding gets no gradient


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_encoding_in_the_callers_scratch_space_stores_the_same_rows(name, dtype):
    """cache-teacher lets a kind overwrite the logits / T it no longer needs (no allocation of B x L x V);
    the rows must be bit for bit those of the allocating path, and a top-k row's log-sum-exp that of the
    whole rounded row, at a real vocabulary."""
    layout = Layout(kind=name, num_samples=4, num_classes=32_000, chunk_rows=4, dtype=dtype, tokens=5, options=OPTIONS.get(name))
    logits = torch.randn(4, 5, 32_000, generator=torch.Generator().manual_seed(1)) * 4
    lengths = torch.tensor([5, 2, 1, 4])
    allocating = stored_rows(logits.clone(), layout, lengths, row_index=torch.arange(4))
    scratch = logits.clone()
    in_place = stored_rows(scratch, layout, lengths, overwrite=True, row_index=torch.arange(4))
    for array in allocating:
        torch.testing.assert_close(in_place[array], allocating[array], rtol=0, atol=0)
    if "logsumexp" in allocating:
        assert not torch.equal(scratch, logits)  # the scratch space was used
        valid = torch.arange(5)[None, :] < lengths[:, None]
        expected = torch.logsumexp(logits.to(getattr(torch, dtype)).double(), dim=-1)
        torch.testing.assert_close(allocating["logsumexp"][valid].double(), expected[valid], rtol=0, atol=2e-5)
