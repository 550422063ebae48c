"""The qtopk kind at its edges: every class kept (no tail), one class kept, a class the teacher
masks at -inf, and one bit per code. What it gives at real vocabularies, decoded with plain zarr
as docs/cache-format.md says, is tested in tests/stages/test_real_vocabularies.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.cache.layout import Layout
from stages.kinds import KINDS
from stages.kinds.qtopk import QTOPK_MIN_STEP
from stages.losses import distillation_loss
from stages.teacher_rows import stored_rows

QTOPK = KINDS["qtopk"]


def _layout(samples: int, classes: int, top_k: int, bits: int) -> Layout:
    return Layout(kind="qtopk", num_samples=samples, num_classes=classes, chunk_rows=4, dtype="float32",
                  options={"top_k": top_k, "value_bits": bits})


def _rows(logits: torch.Tensor, top_k: int, bits: int) -> dict[str, np.ndarray]:
    rows = stored_rows(logits, _layout(len(logits), logits.shape[-1], top_k, bits), row_index=torch.arange(len(logits)))
    return {name: values.numpy() for name, values in rows.items()}


def test_keeping_every_class_leaves_no_tail_and_trains_as_the_dense_loss_on_the_decoded_probabilities():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3
    rows = _rows(logits, top_k=10, bits=8)
    assert (rows["qtopk_tail"] == 0).all() and (rows["qtopk_class_deltas"][:, 0] == 0).all()
    assert (rows["qtopk_class_deltas"][:, 1:] == 1).all()  # classes 0..9 in order
    probabilities = QTOPK.probabilities(rows, 10, 1.0)
    assert probabilities.shape == (6, 11) and np.allclose(probabilities[:, :10].sum(-1), 1.0, atol=1e-6)
    student, labels = torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    soft = {name: torch.from_numpy(values) for name, values in rows.items()}
    loss, _ = QTOPK.loss(student, soft, labels, alpha=0.6, temperature=2.0, cache_temperature=2.0)
    expected, _ = distillation_loss(student, torch.from_numpy(np.log(probabilities[:, :10])), labels, alpha=0.6, temperature=2.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert np.abs(probabilities[:, :10] - torch.softmax(logits.double(), -1).numpy()).max() < 0.01


def test_one_kept_class_is_code_zero_at_the_smallest_step_with_its_exact_probability():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    rows = _rows(logits, top_k=1, bits=4)
    assert (rows["qtopk_codes"] == 0).all() and (rows["qtopk_scale"] == np.float16(QTOPK_MIN_STEP)).all()
    np.testing.assert_array_equal(rows["qtopk_class_deltas"][:, 0], logits.argmax(-1).numpy())
    top = torch.softmax(logits.double(), -1).max(-1).values.numpy()
    np.testing.assert_allclose(QTOPK.probabilities(rows, 50, 1.0)[:, 0], top, rtol=1e-6)
    assert QTOPK.row_problem(rows, _layout(5, 50, 1, 4)) is None


def test_a_class_masked_at_minus_infinity_gets_the_last_code_and_nothing_goes_non_finite():
    """Only a top k larger than the unmasked classes keeps one; its step then spans QTOPK_MAX_SPREAD."""
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    logits[:, 5] = float("-inf")
    rows = _rows(logits, top_k=8, bits=8)
    classes = np.cumsum(rows["qtopk_class_deltas"].astype(np.int64), -1)
    assert (rows["qtopk_codes"][classes == 5] == 255).all()
    assert all(np.isfinite(rows[name]).all() for name in ("qtopk_scale", "qtopk_tail", "encoding_error"))
    assert QTOPK.probabilities(rows, 8, 1.0)[:, :8][classes == 5].max() < 1e-25 and QTOPK.row_problem(rows, _layout(4, 8, 8, 8)) is None


def test_one_bit_codes_are_the_top_half_and_the_bottom_half_of_the_kept_spread():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)) * 2
    rows = _rows(logits, top_k=16, bits=1)
    assert set(np.unique(rows["qtopk_codes"])) == {0, 1}
    below_top = np.take_along_axis(logits.max(-1, keepdim=True).values.numpy() - logits.numpy(),
                                   np.cumsum(rows["qtopk_class_deltas"].astype(np.int64), -1), -1)
    spread = below_top.max(-1, keepdims=True)
    np.testing.assert_array_equal(rows["qtopk_codes"], (below_top > spread / 2).astype(np.uint8))
    # What the codes lose, per row: a coarse encoding loses measurably more than an 8-bit one.
    assert rows["encoding_error"][:, 2].mean() > 20 * _rows(logits, top_k=16, bits=8)["encoding_error"][:, 2].mean()


def test_a_torn_encoding_error_record_is_damage_that_verify_names_inspect_refuses_and_a_resume_recomputes(tmp_path, teacher_weights):
    """The record of what a write unit lost is its own object: a flipped byte in it fails verify's
    check of it and inspect (exit 4, one line), and the same cache-teacher command recomputes that
    unit and nothing else."""
    from tests.conftest import cache_with_cli, invoke, invoke_json

    options = ("--format", "qtopk", "--top-k", 2, "--value-bits", 4)
    cache = cache_with_cli(tmp_path / "q.zarr", teacher_weights, *options)["cache"]
    before = invoke_json("inspect", cache)["encoding_error"]
    record = tmp_path / "q.zarr" / "encoding_error" / "c" / "1" / "0"
    data = bytearray(record.read_bytes())
    data[3] ^= 0xFF
    record.write_bytes(bytes(data))

    code, out, _ = invoke("verify", cache, "--json")
    failed = {c["check"]: c["detail"] for c in json.loads(out)["checks"] if not c["ok"]}
    assert code == 4 and set(failed) == {"encoding_error"} and "unreadable" in failed["encoding_error"], failed
    code, _, err = invoke("inspect", cache)
    assert code == 4 and "encoding_error record cannot be read" in err and len(err.strip().splitlines()) == 1, err

    resumed = cache_with_cli(tmp_path / "q.zarr", teacher_weights, *options)
    assert resumed["chunks_computed"] == 1, resumed
    assert invoke_json("verify", cache)["ok"] and invoke_json("inspect", cache)["encoding_error"] == before
