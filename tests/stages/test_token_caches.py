"""Token-level caches of a byte-level language model, dense and top-k: what is stored, how it is
read, and that padding never counts."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.cache import CacheReader, index_dtype
from stages.data import TensorSplit
from stages.errors import InputError
from stages.inspection import describe_cache
from stages.losses import distillation_loss
from stages.train_student import batch_loss
from stages.weights import save_weights

LM_DATA = "stdlib-bytes:seq=16,train=4000,test=800"
TEACHER = "bytelm:dim=32,layers=1,heads=2"
STUDENT = "bytelm:dim=16,layers=1,heads=2"
SEQ, CLASSES, T = 16, 256, 2.0


def _padded(split: TensorSplit, seed: int) -> TensorSplit:
    """The real text with random sequence lengths, so that about half the positions are padding."""
    lengths = np.random.default_rng(seed).integers(1, SEQ + 1, size=len(split))
    return dataclasses.replace(split, lengths=lengths)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A small byte-level teacher (trained one epoch), padded splits, and its caches."""
    folder = tmp_path_factory.mktemp("lm")
    data = resolve_dataset(LM_DATA)
    train, test = _padded(data.split("train"), 0), _padded(data.split("test"), 1)
    torch.manual_seed(0)
    teacher = resolve_model(TEACHER, num_classes=CLASSES, input_shape=(SEQ,))
    train_student.run(train_student.TrainConfig(model=TEACHER, dataset=LM_DATA, out=folder / "teacher", alpha=0.0,
                                                epochs=1, batch_size=32, lr=3e-3, device="cpu"), teacher, train, test)
    save_weights(teacher, folder / "teacher.safetensors")
    caches = {}
    for name, kind, k in (("dense", "dense", None), ("top8", "topk", 8), ("top256", "topk", 256)):
        config = cache_teacher.CacheTeacherConfig(
            teacher=TEACHER, dataset=LM_DATA, out=folder / f"{name}.zarr", temperature=T, format=kind, kind_options={"top_k": k},
            chunk_rows=32, batch_size=50, device="cpu",
        )
        caches[name] = cache_teacher.run(config, teacher, train).cache
    return {"teacher": teacher.eval(), "train": train, "test": test, "folder": folder, **caches}


def _teacher_over_t(lm) -> np.ndarray:
    with torch.no_grad():
        return (lm["teacher"](lm["train"].x).double() / T).numpy()


def _valid(lengths: np.ndarray) -> np.ndarray:
    return np.arange(SEQ)[None, :] < lengths[:, None]


def test_dense_token_cache_holds_the_teachers_logits_per_token_and_zeros_at_padding(lm):
    group = zarr.open_group(str(lm["dense"]), mode="r")
    valid = _valid(lm["train"].lengths)
    assert group.attrs["row_axes"] == ["token", "class"] and group.attrs["row_shape"] == [SEQ, CLASSES]
    assert group["logits"].shape == (len(lm["train"]), SEQ, CLASSES) and group["logits"].chunks == (32, SEQ, CLASSES)
    np.testing.assert_array_equal(group["lengths"][:], lm["train"].lengths)
    stored = group["logits"][:].astype(np.float64)
    np.testing.assert_allclose(stored[valid], _teacher_over_t(lm)[valid], atol=1e-2, rtol=1e-3)
    assert (stored[~valid] == 0).all() and (~valid).sum() > len(valid) * SEQ / 3


def test_topk_token_cache_gives_exact_probabilities_of_the_kept_classes(lm):
    """With plain zarr: exp(value - logsumexp) is the teacher's softmax at T for each kept class."""
    group = zarr.open_group(str(lm["top8"]), mode="r")
    valid = _valid(lm["train"].lengths)
    assert group.attrs["kind"] == "topk" and group.attrs["kind_options"] == {"top_k": 8} and group.attrs["row_axes"] == ["token", "rank"]
    assert group["topk_indices"].dtype == np.uint8 and group["logsumexp"].dtype == np.float32
    values, indices, lse = group["topk_values"][:], group["topk_indices"][:], group["logsumexp"][:]
    teacher = _teacher_over_t(lm)
    probs = np.exp(teacher - np.log(np.exp(teacher).sum(-1, keepdims=True)))
    kept = np.exp(values.astype(np.float64) - lse[..., None])
    np.testing.assert_allclose(kept[valid], np.take_along_axis(probs, indices.astype(np.int64), -1)[valid], atol=2e-3)
    assert (np.diff(values[valid].astype(np.float32), axis=-1) <= 0).all()  # descending
    assert (values[~valid] == 0).all() and (lse[~valid] == 0).all()


def test_topk_with_k_equal_to_classes_is_the_dense_cache_sorted(lm):
    dense = zarr.open_group(str(lm["dense"]), mode="r")["logits"][:]
    full = zarr.open_group(str(lm["top256"]), mode="r")
    valid = _valid(lm["train"].lengths)
    values, indices = full["topk_values"][:], full["topk_indices"][:].astype(np.int64)
    np.testing.assert_array_equal(values[valid], -np.sort(-dense, axis=-1)[valid])
    np.testing.assert_array_equal(np.take_along_axis(dense, indices, -1)[valid], values[valid])
    lse = torch.logsumexp(torch.from_numpy(dense).float(), -1).numpy()
    np.testing.assert_allclose(full["logsumexp"][:][valid], lse[valid], rtol=1e-6)


@pytest.mark.parametrize("batch_size", [7, 32, 100])
def test_token_reader_visits_every_sequence_once_per_epoch(lm, batch_size):
    reader = CacheReader(lm["top8"])
    group = zarr.open_group(str(lm["top8"]), mode="r")
    for epoch in range(2):
        seen = []
        for batch in reader.batches(batch_size, seed=3, epoch=epoch, buffer_chunks=2):
            assert batch["topk_values"].shape[1:] == (SEQ, 8) and batch["logsumexp"].shape[1:] == (SEQ,)
            np.testing.assert_array_equal(batch["topk_indices"], group["topk_indices"].oindex[batch["index"]])
            np.testing.assert_array_equal(batch["lengths"], lm["train"].lengths[batch["index"]])
            seen.append(batch["index"])
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == list(range(len(lm["train"])))
        assert not (seen == np.arange(len(seen))).all()  # shuffled


@pytest.mark.parametrize("cache", ["dense", "top8", None])
def test_padding_positions_get_no_gradient(lm, cache):
    reader = CacheReader(lm[cache]) if cache else None
    rows = next(iter(reader.batches(24, seed=0, epoch=0))) if reader else {"index": np.arange(24)}
    rows = {**rows, "labels": lm["train"].labels[rows["index"]], "lengths": lm["train"].lengths[rows["index"]]}
    logits = torch.randn(24, SEQ, CLASSES, requires_grad=True)
    loss, _ = batch_loss(logits, rows, reader, alpha=0.5, temperature=T)
    loss.backward()
    valid = torch.from_numpy(_valid(rows["lengths"]))
    assert (logits.grad[~valid] == 0).all() and (~valid).any()
    assert (logits.grad[valid].abs().sum(-1) > 0).all()
    # Whatever padding holds, in the inputs' labels or the cache, the loss does not change.
    noisy = {k: v.copy() for k, v in rows.items()}
    for name in ("labels", *(reader.soft_arrays if reader else ())):
        noisy[name][~valid.numpy()] = 1
    assert float(batch_loss(logits, noisy, reader, alpha=0.5, temperature=T)[0].detach()) == float(loss.detach())


def test_token_loss_averages_over_valid_tokens_only(lm):
    reader = CacheReader(lm["dense"])
    rows = next(iter(reader.batches(16, seed=0, epoch=0)))
    rows = {**rows, "labels": lm["train"].labels[rows["index"]], "lengths": lm["train"].lengths[rows["index"]]}
    logits = torch.randn(16, SEQ, CLASSES)
    valid = torch.from_numpy(_valid(rows["lengths"]))
    expected, _ = distillation_loss(logits[valid], torch.from_numpy(rows["logits"]).float()[valid],
                                    torch.from_numpy(rows["labels"])[valid], alpha=0.3, temperature=T)
    loss, _ = batch_loss(logits, rows, reader, alpha=0.3, temperature=T)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def _student_run(lm, tmp_path, cache: str | None, **overrides):
    torch.manual_seed(1)
    student = resolve_model(STUDENT, num_classes=CLASSES, input_shape=(SEQ,))
    config = train_student.TrainConfig(model=STUDENT, dataset=LM_DATA, out=tmp_path / f"run-{cache}",
                                       cache=lm[cache] if cache else None, alpha=0.5, epochs=2, batch_size=32,
                                       lr=3e-3, seed=1, device="cpu", **overrides)
    return train_student.run(config, student, lm["train"], lm["test"])


def test_students_from_a_full_topk_cache_and_the_dense_cache_train_alike(lm, tmp_path):
    """K = C: the same loss, so the same training, up to float rounding."""
    dense, full = _student_run(lm, tmp_path, "dense"), _student_run(lm, tmp_path, "top256")
    assert full.test_tokens == dense.test_tokens == int(lm["test"].lengths.sum())
    assert full.test_nll == pytest.approx(dense.test_nll, rel=1e-3)
    assert dense.test_nll < np.log(CLASSES)  # it learned something in two epochs


def test_top8_student_learns_and_retempering_changes_its_targets(lm, tmp_path):
    at_cache_t = _student_run(lm, tmp_path, "top8")
    retempered = _student_run(lm, tmp_path / "t1", "top8", temperature=1.0)
    assert at_cache_t.test_nll < np.log(CLASSES) and retempered.test_nll < np.log(CLASSES)
    assert retempered.test_nll != at_cache_t.test_nll


def test_a_different_k_does_not_resume_a_cache(lm):
    config = cache_teacher.CacheTeacherConfig(teacher=TEACHER, dataset=LM_DATA, out=lm["top8"], temperature=T,
                                              format="topk", kind_options={"top_k": 16}, chunk_rows=32, device="cpu")
    with pytest.raises(InputError, match="top_k: cache has 8, this run 16"):
        cache_teacher.run(config, lm["teacher"], lm["train"])


def test_indices_take_the_smallest_unsigned_type():
    assert [index_dtype(c) for c in (2, 256, 257, 65536, 65537)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]


def test_inspect_reports_bytes_per_token_and_the_tail_mass(lm):
    report = describe_cache(lm["top8"])
    group = zarr.open_group(str(lm["top8"]), mode="r")
    valid = _valid(lm["train"].lengths)
    tokens = int(lm["train"].lengths.sum())
    assert report["num_tokens"] == tokens and report["padded_positions"] == valid.size - tokens
    assert report["bytes_per_token"] == pytest.approx(report["bytes_on_disk"] / tokens)
    soft = sum(report["bytes_per_array"][name] for name in ("topk_values", "topk_indices", "logsumexp"))
    assert report["soft_label_bytes_per_token"] == pytest.approx(soft / tokens)
    tail = 1 - np.exp(group["topk_values"][:].astype(np.float64) - group["logsumexp"][:][..., None]).sum(-1)
    assert report["tail_mass"]["mean"] == pytest.approx(np.clip(tail[valid], 0, 1).mean(), rel=1e-4)
    assert 0 < report["tail_mass"]["mean"] < report["tail_mass"]["max"] <= 1
    dense = describe_cache(lm["dense"])
    assert "tail_mass" not in dense
    assert dense["soft_label_bytes_per_token"] > 5 * report["soft_label_bytes_per_token"]


def test_a_killed_topk_token_cache_resumes_to_the_same_cache(lm, tmp_path):
    copy = tmp_path / "top8.zarr"
    shutil.copytree(lm["top8"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["chunk_done"][1] = 0  # as if killed before chunk 1 was written
    group["topk_values"][32:64] = np.nan
    group["logsumexp"][32:64] = np.nan
    group.attrs["complete"] = False
    config = cache_teacher.CacheTeacherConfig(teacher=TEACHER, dataset=LM_DATA, out=copy, temperature=T, format="topk",
                                              kind_options={"top_k": 8}, chunk_rows=32, batch_size=50, device="cpu")
    assert cache_teacher.run(config, lm["teacher"], lm["train"]).chunks_computed == 1
    reference = zarr.open_group(str(lm["top8"]), mode="r")
    for name in ("topk_values", "topk_indices", "logsumexp", "lengths", "labels", "index"):
        np.testing.assert_array_equal(zarr.open_group(str(copy), mode="r")[name][:], reference[name][:])
