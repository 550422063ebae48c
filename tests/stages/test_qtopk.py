"""The qtopk kind at its edges: every class kept (no tail), one class kept, a class the teacher
masks at -inf, and one bit per code; its companded codes (value_root), and caches from before that
option. What it gives at real vocabularies, decoded with plain zarr as docs/cache-format.md says,
is tested in tests/stages/test_real_vocabularies.py."""

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


def _layout(samples: int, classes: int, top_k: int, bits: int, root: int = 1, tokens: int | None = None) -> Layout:
    return Layout(kind="qtopk", num_samples=samples, num_classes=classes, chunk_rows=4, dtype="float32", tokens=tokens,
                  options={"top_k": top_k, "value_bits": bits, "value_root": root})


def _rows(logits: torch.Tensor, top_k: int, bits: int, root: int = 1) -> dict[str, np.ndarray]:
    rows = stored_rows(logits, _layout(len(logits), logits.shape[-1], top_k, bits, root), row_index=torch.arange(len(logits)))
    return {name: values.numpy() for name, values in rows.items()}


def _language_model_logits(rows: int, classes: int, seed: int) -> torch.Tensor:
    """Logits / T shaped like a language model's next-token rows: log-probabilities falling as
    -1.1 log(rank) (Zipf's law), with noise, over a random order of the classes."""
    generator = torch.Generator().manual_seed(seed)
    ranked = -1.1 * torch.log(torch.arange(1, classes + 1, dtype=torch.float32)) + 0.3 * torch.randn(rows, classes, generator=generator)
    order = torch.argsort(torch.rand(rows, classes, generator=generator), -1)
    return torch.empty_like(ranked).scatter_(-1, order, ranked)


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


@pytest.mark.parametrize("root", [1, 2])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip_at_each_scale_as_the_documented_decoding_gives_them(root, bits):
    """At a real vocabulary: code q_k = round(L ((v_1 - v_k) / (s L))^(1/R)), L = 2^B - 1, 0 for
    the top class and L for the K-th; the documented numpy decoding (w = exp(-s L (q / L)^R)) is
    what the kind gives, each kept log-probability within half a step, s L (((q + 1/2) / L)^R -
    (q / L)^R), of the teacher's; and the cache's kind decodes by its value_root, which rows of
    another value_root would not survive."""
    logits = _language_model_logits(12, 8192, seed=5)
    layout = _layout(12, 8192, 32, bits, root)
    rows = _rows(logits, top_k=32, bits=bits, root=root)
    assert layout.soft_kind.value_root == root and layout.soft_kind.row_problem(rows, layout) is None
    classes = np.cumsum(rows["qtopk_class_deltas"].astype(np.int64), -1)
    below_top = np.take_along_axis(logits.max(-1, keepdim=True).values.numpy() - logits.numpy(), classes, -1).astype(np.float64)
    scale = rows["qtopk_scale"].astype(np.float64)[:, None]
    codes = rows["qtopk_codes"].astype(np.float64)
    levels = 2**bits - 1
    expected = np.clip(np.round(levels * (below_top / (scale * levels)) ** (1 / root)), 0, levels)
    assert (np.abs(codes - expected) <= (np.abs(codes - expected) > 0)).all() and (codes != expected).mean() < 1e-3  # float32's rounding at a tie
    assert (codes.min(-1) == 0).all() and (codes.max(-1) == levels).all()

    w = np.exp(-scale * levels * (codes / levels) ** root)
    p = (1 - rows["qtopk_tail"].astype(np.float64))[:, None] * w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(layout.soft_kind.probabilities(rows, 8192, 1.0)[:, :-1], p, rtol=1e-5)
    half_step = scale * levels * (((codes + 0.5) / levels) ** root - (codes / levels) ** root)
    assert (np.abs(scale * levels * (codes / levels) ** root - below_top) <= half_step + 1e-3).all()
    if root != 1:  # read as linear codes they say something else
        assert not np.allclose(QTOPK.probabilities(rows, 8192, 1.0)[:, :-1], p, rtol=1e-2)


def test_a_cache_from_before_value_root_reads_and_resumes_as_the_linear_codes_it_holds(tmp_path):
    """Linear caches record no value_root (as every cache before the option), their codes decode
    bit for bit as exp(-q * s), CacheDataset's batches and kd_loss decode them so, and resuming
    one finds no difference in the options; a companded cache records its root and kd_loss decodes by it."""
    from stages.cache.reader import CacheReader
    from stages.cache.writer import CacheWriter, _differences
    from stages.data import sha256
    from stages.loop import kd_loss
    from stages.train_student import batch_loss

    logits = _language_model_logits(6 * 3, 8192, seed=7).reshape(6, 3, 8192)
    lengths = np.array([3, 1, 2, 3, 2, 1], dtype=np.int32)
    students = torch.randn(6, 3, 8192, generator=torch.Generator().manual_seed(8))
    losses = {}
    for root in (1, 2):
        layout = _layout(6, 8192, 16, 3, root, tokens=3)
        rows = {k: v.numpy() for k, v in stored_rows(logits, layout, torch.from_numpy(lengths), row_index=torch.arange(6)).items()}
        path = tmp_path / f"root{root}.zarr"
        writer = CacheWriter.create(path, layout, {"temperature": 1.0, "teachers": [], "dataset": {"index_sha256": sha256(np.arange(6))}})
        with writer:
            writer.write_rows(0, {**rows, "index": np.arange(6), "labels": np.zeros((6, 3), dtype=np.int64), "lengths": lengths})
        writer.mark_complete({})
        reader = CacheReader(path)
        recorded = dict(reader.attrs["kind_options"])
        assert recorded == ({"top_k": 16, "value_bits": 3} if root == 1 else {"top_k": 16, "value_bits": 3, "value_root": 2})
        dataset = {"split": "train", "fingerprint": {}, "index_sha256": sha256(np.arange(6))}
        assert not _differences({**reader.attrs, "dataset": dataset}, {**reader.attrs, "dataset": dataset,
                                                                        "kind_options": layout.options.attributes()})
        read = reader.read_rows(0, 6)
        valid = np.arange(3)[None, :] < lengths[:, None]
        if root == 1:  # the decoding from before the option, exactly
            codes, scale = read["qtopk_codes"][valid].astype(np.float32), read["qtopk_scale"][valid].astype(np.float32)
            relative = torch.from_numpy(codes) * -torch.from_numpy(scale).unsqueeze(-1)
            kept = torch.log1p(-torch.from_numpy(read["qtopk_tail"][valid]).clamp(max=1.0 - 2.0**-24))
            before = relative - torch.logsumexp(relative, -1, keepdim=True) + kept.unsqueeze(-1)
            np.testing.assert_array_equal(reader.layout.soft_kind.probabilities({k: read[k][valid] for k in QTOPK.soft_arrays}, 8192, 1.0)[:, :-1],
                                          np.exp(before.double().numpy()))
        batch = {name: torch.from_numpy(values) for name, values in read.items()}
        cache = type("Cache", (), {"layout": reader.layout, "soft_arrays": reader.soft_arrays, "temperature": 1.0})
        expected, _ = batch_loss(students, read, cache, alpha=1.0, temperature=1.0)
        with_options = kd_loss(students, {**batch, "kind": "qtopk", "kind_options": recorded, "temperature": 1.0}, alpha=1.0)
        without = kd_loss(students, {**batch, "kind": "qtopk", "temperature": 1.0}, alpha=1.0)  # a batch made before the option
        assert float(with_options) == float(expected)
        assert (float(without) == float(expected)) == (root == 1)
        losses[root] = float(expected)
    assert losses[1] != losses[2]


def test_cache_teacher_writes_companded_codes_that_verify_against_the_teacher_and_inspect_names(tmp_path, teacher_weights):
    """--value-root through the CLI: the option recorded and in the file name, verify --teacher
    re-encodes the teacher's values at the stored classes into the stored codes, and inspect
    reports the option and what the codes lost."""
    from tests.conftest import cache_with_cli, invoke_json

    made = cache_with_cli(tmp_path / "q.zarr", teacher_weights, "--format", "qtopk", "--top-k", 3, "--value-bits", 2, "--value-root", 2)
    report = invoke_json("verify", made["cache"], "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "600")
    assert report["ok"], report
    described = invoke_json("inspect", made["cache"])
    assert described["value_root"] == 2 and described["encoding_error"]["mean_kl_nats"] > 0
