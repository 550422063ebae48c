"""Online KD (stages.online.OnlineTeacher): the teacher's soft labels computed per batch are
those a dense float32 cache stores, and train-student trains from them as from a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.online import OnlineTeacher
from tests.conftest import DATASET

LM = "stdlib-bytes:seq=16,train=3000,test=600"


@pytest.mark.parametrize("dataset, model", [(DATASET, "mlp-64"), (LM, "bytelm:dim=16,layers=1,heads=2")], ids=["rows", "tokens"])
def test_online_rows_are_the_dense_float32_caches_rows(tmp_path, dataset, model):
    split = resolve_dataset(dataset).split("train")
    torch.manual_seed(0)
    teacher = resolve_model(model, num_classes=split.num_classes, input_shape=tuple(split.inputs(np.zeros(1, dtype=np.int64)).shape[1:]))
    config = cache_teacher.CacheTeacherConfig(teacher=model, dataset=dataset, out=tmp_path / "c.zarr", temperature=2.0,
                                              dtype="float32", batch_size=50, chunk_rows=50, device="cpu")
    stored = zarr.open_group(str(cache_teacher.run(config, teacher, split).cache), mode="r")["logits"]
    online = OnlineTeacher(teacher, split, 2.0, torch.device("cpu"))
    assert (online.num_classes, online.layout.tokens) == (stored.shape[-1], None if stored.ndim == 2 else stored.shape[1])
    seen = []
    for rows in online.batches(64, seed=1, epoch=0):
        np.testing.assert_allclose(rows["logits"], stored.oindex[rows["index"]], rtol=1e-5, atol=1e-5)
        seen.append(rows["index"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(split)))  # every row once per epoch


def test_a_student_trains_from_an_online_teacher_on_padded_token_rows(tmp_path):
    data = resolve_dataset(LM)
    train, test = data.split("train"), data.split("test")
    assert (train.lengths < 16).any()  # some rows end early: padding
    torch.manual_seed(0)
    teacher = resolve_model("bytelm:dim=32,layers=1,heads=2", num_classes=256, input_shape=(16,))
    train_student.run(train_student.TrainConfig(model="bytelm", dataset=LM, out=tmp_path / "teacher", alpha=0.0, epochs=2,
                                                batch_size=32, lr=3e-3, device="cpu"), teacher, train, test)
    student = resolve_model("bytelm:dim=16,layers=1,heads=2", num_classes=256, input_shape=(16,))
    config = train_student.TrainConfig(model="bytelm", dataset=LM, out=tmp_path / "online", alpha=0.5, temperature=1.0,
                                       epochs=8, batch_size=32, lr=1e-2, device="cpu")
    result = train_student.run(config, student, train, test, soft_labels=OnlineTeacher(teacher, train, 1.0, torch.device("cpu")))
    assert result.mode == "distilled" and result.test_tokens == int(test.lengths.sum())
    assert result.test_nll < np.log(256)  # it learned from the teacher's labels
