"""Caches of augmented views: every view is made from a recorded seed, and student training
replays, bit for bit, the input the teacher saw."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.augment import parse_augment, view_seeds
from stages.cache import CacheReader
from stages.errors import InputError
from stages.loop import one_view_each
from stages.verify import verify
from tests.stages.cache.conftest import reseal

DATA = "digits"
AUGMENT = "shift:1+rotate:10"
VIEWS = 4


class Recording(nn.Module):
    """Wraps a model and keeps a hash of every input row it is given."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seen: set[bytes] = set()

    def forward(self, x):
        self.seen.update(hashlib.sha256(row.contiguous().numpy().tobytes()).digest() for row in x.detach().cpu())
        return self.model(x)


@pytest.fixture(scope="module")
def digits():
    data = resolve_dataset(DATA)
    return data.split("train"), data.split("test")


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("views")
    torch.manual_seed(0)
    teacher = Recording(resolve_model("cnn", num_classes=10, input_shape=(1, 8, 8)).eval())
    config = cache_teacher.CacheTeacherConfig(teacher="cnn", dataset=DATA, out=folder / "v.zarr", augment=AUGMENT,
                                              views=VIEWS, view_seed=5, chunk_rows=256, batch_size=100, device="cpu")
    cache_teacher.run(config, teacher, digits[0])
    return {"path": folder / "v.zarr", "teacher": teacher, "config": config}


def test_a_view_cache_records_its_views_and_their_seeds(views_cache, digits):
    group = zarr.open_group(str(views_cache["path"]), mode="r")
    n = len(digits[0])
    assert group.attrs["row_axes"] == ["view", "class"] and group.attrs["views"] == VIEWS
    assert group.attrs["augment"] == {"spec": AUGMENT, "base_seed": 5}
    assert group["logits"].shape == (n, VIEWS, 10) and group["labels"].shape == (n,)
    np.testing.assert_array_equal(group["view_seeds"][:], view_seeds(5, np.arange(n), VIEWS))
    logits = group["logits"][:].astype(np.float32)
    assert not np.allclose(logits[:, 0], logits[:, 1])  # the views differ
    assert group.attrs["teacher_metrics"]["num_views"] == n * VIEWS


def test_replayed_inputs_are_bit_for_bit_the_teachers(views_cache, digits, tmp_path):
    """Every input the student trains on is, bit for bit, one the teacher was given when caching;
    and re-running the teacher on the replayed views gives the stored logits."""
    train, test = digits
    teacher_saw = views_cache["teacher"].seen
    assert len(teacher_saw) > len(train) * VIEWS * 0.95  # (a few views may coincide)
    torch.manual_seed(1)
    student = Recording(resolve_model("mlp-64", num_classes=10, input_shape=(1, 8, 8)))
    config = train_student.TrainConfig(model="mlp-64", dataset=DATA, out=tmp_path / "run", cache=views_cache["path"],
                                       epochs=2, batch_size=64, device="cpu")
    train_student.run(config, student, train, test)
    plain = {hashlib.sha256(row.contiguous().numpy().tobytes()).digest() for row in train.inputs(np.arange(len(train)))}
    trained_on = student.seen - plain - {hashlib.sha256(row.contiguous().numpy().tobytes()).digest() for row in test.inputs(np.arange(len(test)))}
    assert len(trained_on) > len(train)  # two epochs of random views: more distinct inputs than samples
    assert trained_on <= teacher_saw
    report = verify(views_cache["path"], teacher=views_cache["teacher"].model, split=train, samples=64,
                    augment=parse_augment(AUGMENT))
    assert report.ok and report.max_abs_diff < 1e-2, report.checks


def test_verify_notices_views_that_do_not_replay(views_cache, digits, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(views_cache["path"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["augment"] = {"spec": AUGMENT, "base_seed": 6}
    seeds = group["view_seeds"][:]
    group["view_seeds"][:] = view_seeds(6, np.arange(len(seeds)), VIEWS)
    reseal(copy)  # as a writer with that base seed would have recorded it: only the teacher's rerun can tell
    report = verify(copy, teacher=views_cache["teacher"].model, split=digits[0], samples=64, augment=parse_augment(AUGMENT))
    failed = {c["check"] for c in report.checks if not c["ok"]}
    assert failed == {"teacher"}  # consistent seeds, but not the views the teacher saw


def test_view_policies_pick_one_view_per_row():
    rows = {"index": np.arange(5), "logits": np.arange(5 * 3 * 2).reshape(5, 3, 2), "view_seeds": np.arange(15).reshape(5, 3)}
    cycled = one_view_each(rows, ("logits",), "cycle", np.random.default_rng(0), epoch=4)
    assert cycled["view"].tolist() == [1] * 5 and cycled["logits"].shape == (5, 2)
    np.testing.assert_array_equal(cycled["view_seeds"], rows["view_seeds"][:, 1])
    random = one_view_each(rows, ("logits",), "random", np.random.default_rng(0), epoch=0)
    np.testing.assert_array_equal(random["logits"], rows["logits"][np.arange(5), random["view"]])


def test_a_killed_view_cache_resumes_to_the_same_cache(views_cache, digits, tmp_path):
    copy = tmp_path / "v.zarr"
    shutil.copytree(views_cache["path"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["chunk_done"][2] = 0  # as if killed before chunk 2 was written
    group["logits"][512:768] = np.nan
    group.attrs["complete"] = False
    config = cache_teacher.CacheTeacherConfig(**{**vars(views_cache["config"]), "out": copy})
    result = cache_teacher.run(config, views_cache["teacher"], digits[0])
    assert result.chunks_computed == 1
    reference = zarr.open_group(str(views_cache["path"]), mode="r")
    for name in ("logits", "view_seeds", "index", "labels"):
        np.testing.assert_array_equal(zarr.open_group(str(copy), mode="r")[name][:], reference[name][:])


def test_a_topk_view_cache_trains_a_student(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    teacher = resolve_model("cnn", num_classes=10, input_shape=(1, 8, 8))
    config = cache_teacher.CacheTeacherConfig(teacher="cnn", dataset=DATA, out=tmp_path / "t.zarr", augment="flip", views=2,
                                              format="topk", kind_options={"top_k": 3}, device="cpu")
    cache_teacher.run(config, teacher, train)
    reader = CacheReader(tmp_path / "t.zarr")
    assert reader.layout.row_shape == (2, 3) and reader.arrays["logsumexp"].shape == (len(train), 2)
    student = resolve_model("mlp-64", num_classes=10, input_shape=(1, 8, 8))
    run = train_student.run(train_student.TrainConfig(model="mlp-64", dataset=DATA, out=tmp_path / "r", cache=tmp_path / "t.zarr",
                                                      epochs=1, device="cpu"), student, train, test)
    assert run.mode == "distilled" and run.test_accuracy is not None


def test_views_need_an_augmentation_and_students_do_not_add_their_own(views_cache, digits, tmp_path):
    with pytest.raises(InputError, match="needs `augment`"):
        cache_teacher.CacheTeacherConfig(teacher="cnn", dataset=DATA, out=tmp_path / "x.zarr", views=2).validate()
    student = resolve_model("mlp-64", num_classes=10, input_shape=(1, 8, 8))
    config = train_student.TrainConfig(model="mlp-64", dataset=DATA, out=tmp_path / "r", cache=views_cache["path"],
                                       augment="shift:1", device="cpu")
    with pytest.raises(InputError, match="replays them exactly; drop `augment`"):
        train_student.run(config, student, *digits)
    assert not (tmp_path / "r").exists()
