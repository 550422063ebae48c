"""Ensemble caches: combining teachers' caches, and refusing caches that do not belong together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_training
from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.cache import CacheReader
from stages.ensemble import CombineConfig, run
from stages.errors import CacheMismatchError, InputError
from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE

OTHER_DATA = "synthetic:n=600,test=200,features=8,classes=4,seed=9"


def _cache(tmp_path, weights, name, dataset=DATASET, split="train", temperature=TEMPERATURE, **options):
    split_data = resolve_dataset(dataset).split(split)
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=weights)
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", teacher_weights=weights, dataset=dataset, split=split,
                                              out=tmp_path / name, temperature=temperature, chunk_rows=CHUNK_ROWS,
                                              device="cpu", **options)
    return cache_teacher.run(config, teacher, split_data).cache


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher2")
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=folder / "run", weights_out=folder / "t.safetensors",
                                       alpha=0.0, epochs=8, batch_size=32, seed=8, device="cpu")
    return run_training(config).weights


def _probs(stored: np.ndarray) -> np.ndarray:
    z = stored.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("rule", ["mean-probs", "mean-logits"])
def test_ensemble_cache_holds_the_combined_teachers(tmp_path, teacher_weights, second_teacher, rule):
    a, b = _cache(tmp_path, teacher_weights, "a.zarr"), _cache(tmp_path, second_teacher, "b.zarr")
    result = run(CombineConfig(caches=(a, b), out=tmp_path / "e.zarr", rule=rule))
    assert result.num_teachers == 2 and result.chunks_computed == CacheReader(a).grid.num_chunks
    group = zarr.open_group(str(result.cache), mode="r")
    za, zb = (zarr.open_group(str(c), mode="r")["logits"][:].astype(np.float64) for c in (a, b))
    if rule == "mean-probs":
        np.testing.assert_allclose(_probs(group["logits"][:]), (_probs(za) + _probs(zb)) / 2, atol=2e-3)
    else:
        np.testing.assert_allclose(group["logits"][:].astype(np.float64), (za + zb) / 2, atol=2e-3)
    attrs = group.attrs
    assert [t["weights"] for t in attrs["teachers"]] == [str(teacher_weights), str(second_teacher)]
    assert attrs["combine"]["rule"] == rule and [s["path"] for s in attrs["combine"]["sources"]] == [str(a), str(b)]
    assert attrs["dataset"] == zarr.open_group(str(a), mode="r").attrs["dataset"] and attrs["complete"]
    np.testing.assert_array_equal(group["labels"][:], resolve_dataset(DATASET).split("train").labels)
    again = run(CombineConfig(caches=(a, b), out=tmp_path / "e.zarr", rule=rule))
    assert again.chunks_computed == 0  # a finished ensemble is left as it is


def test_ensemble_cache_trains_a_student(tmp_path, teacher_weights, second_teacher):
    a, b = _cache(tmp_path, teacher_weights, "a.zarr"), _cache(tmp_path, second_teacher, "b.zarr")
    ensemble = run(CombineConfig(caches=(a, b), out=tmp_path / "e.zarr")).cache
    split = resolve_dataset(DATASET)
    torch.manual_seed(0)
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "run", cache=ensemble, epochs=3, device="cpu")
    result = train_student.run(config, model, split.split("train"), split.split("test"))
    assert result.mode == "distilled" and result.test_accuracy > 0.5


@pytest.mark.parametrize(("other", "words"), [
    ({"dataset": OTHER_DATA}, "dataset"),
    ({"split": "test"}, "split ('test' vs 'train')"),
    ({"temperature": 2.0}, "temperature"),
    ({"format": "topk", "kind_options": {"top_k": 2}}, "only dense caches can be combined"),
])
def test_caches_that_do_not_belong_together_are_refused(tmp_path, teacher_weights, other, words):
    a = _cache(tmp_path, teacher_weights, "a.zarr")
    b = _cache(tmp_path, teacher_weights, "b.zarr", **other)
    with pytest.raises(CacheMismatchError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run(CombineConfig(caches=(a, b), out=tmp_path / "e.zarr"))
    assert not (tmp_path / "e.zarr").exists()


def test_combine_options_are_checked(tmp_path, cache_path):
    with pytest.raises(InputError, match="at least two"):
        run(CombineConfig(caches=(cache_path,), out=tmp_path / "e.zarr"))
    with pytest.raises(InputError, match="`rule`"):
        run(CombineConfig(caches=(cache_path, cache_path), out=tmp_path / "e.zarr", rule="vote"))
    with pytest.raises(InputError, match="one of the caches"):
        run(CombineConfig(caches=(cache_path, cache_path), out=cache_path))
