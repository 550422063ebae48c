"""Stage two: training from a cache, the baseline, and refusing caches that do not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_caching
from pipeline.models import resolve_model
from stages import train_student
from stages.cache_teacher import CacheTeacherConfig
from stages.errors import CacheMismatchError, InputError
from tests.conftest import DATASET, TEMPERATURE

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, cache, model=None, dataset=DATASET, name="run", **overrides):
    data = resolve_dataset(dataset)
    model = model or resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    options = {"epochs": 3, "batch_size": 32, "device": "cpu", **overrides}
    config = train_student.TrainConfig(model="mlp-64", dataset=dataset, out=tmp_path / name, cache=cache, **options)
    return train_student.run(config, model, data.split("train"), data.split("test"))


def test_distilled_run_writes_a_complete_run_folder(tmp_path, cache_path):
    result = _train(tmp_path, cache_path, alpha=0.8)
    assert result.mode == "distilled" and result.test_samples == 200
    assert sorted(p.name for p in result.run_dir.iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.jsonl", "model.safetensors", "summary.json"]
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert {"train_loss", "train_ce", "train_kd", "test_accuracy", "test_errors", "test_nll"} <= set(lines[0])
    assert lines[-1]["train_kd"] < lines[0]["train_kd"]  # it learns the teacher
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["temperature"] == TEMPERATURE  # defaulted to the cache's T
    assert config["cache_provenance"]["teachers"][0]["spec"] == "mlp-64"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["test_errors"] == lines[-1]["test_errors"] == result.test_errors


def test_student_learns_to_agree_with_the_teacher(tmp_path, cache_path, teacher_weights):
    """With alpha=1 the student only sees soft labels; it must end up agreeing with the teacher."""
    result = _train(tmp_path, cache_path, alpha=1.0, epochs=15, lr=3e-3)
    data = resolve_dataset(DATASET).split("test")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights).eval()
    student = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=result.weights).eval()
    with torch.no_grad():
        x = data.inputs(np.arange(len(data)))
        agreement = (teacher(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert agreement > 0.9


def test_retempered_run_records_its_temperature(tmp_path, cache_path):
    result = _train(tmp_path, cache_path, temperature=1.5)
    assert json.loads((result.run_dir / "config.json").read_text())["temperature"] == 1.5


def test_baseline_trains_on_hard_labels(tmp_path):
    result = _train(tmp_path, None, epochs=10)
    assert result.mode == "scratch" and result.test_accuracy > 0.5  # 4 classes: chance is 0.25


def test_same_seed_same_result(tmp_path, cache_path):
    a = _train(tmp_path, cache_path, name="a", seed=3, model=_seeded_model(3))
    b = _train(tmp_path, cache_path, name="b", seed=3, model=_seeded_model(3))
    assert (a.run_dir / "metrics.jsonl").read_text().split('"seconds"')[0] == (b.run_dir / "metrics.jsonl").read_text().split('"seconds"')[0]
    assert a.test_nll == b.test_nll


def _seeded_model(seed):
    torch.manual_seed(seed)
    return resolve_model("mlp-64", num_classes=4, input_shape=(8,))


def test_class_count_mismatch_is_refused(tmp_path, cache_path):
    five = resolve_model("mlp-64", num_classes=5, input_shape=(8,))
    with pytest.raises(CacheMismatchError, match="5 classes but the cache has 4"):
        _train(tmp_path, cache_path, model=five)


def test_cache_of_another_dataset_is_refused(tmp_path, cache_path):
    other = "synthetic:n=600,test=200,features=8,classes=4,seed=4"  # same shape, other data
    with pytest.raises(CacheMismatchError, match="does not match the cache"):
        _train(tmp_path, cache_path, dataset=other)


def test_cache_of_another_split_is_refused(tmp_path, cache_path):
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path, device="cpu")
    with pytest.raises(CacheMismatchError, match="num_samples"):
        train_student.run(config, resolve_model("mlp-64", num_classes=4, input_shape=(8,)), data.split("test"), None)


def test_existing_run_folder_needs_overwrite(tmp_path, cache_path):
    _train(tmp_path, cache_path, epochs=1)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(InputError, match="`overwrite`"):
        _train(tmp_path, cache_path, epochs=1)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    _train(tmp_path, cache_path, epochs=1, overwrite=True)


@pytest.mark.parametrize(("bad", "words"), [
    ({"alpha": 1.5}, ("`alpha`", "got 1.5")), ({"temperature": 0.0}, ("`temperature`", "got 0.0")),
    ({"temperature": -2.0}, ("`temperature`", "got -2.0")), ({"epochs": 0}, ("`epochs`", "got 0")), ({"lr": 0.0}, ("`lr`", "got 0.0")),
    ({"augment": "warp"}, ("augment spec 'warp'",)),
])
def test_invalid_options_are_input_errors(tmp_path, cache_path, bad, words):
    """Each bad value is exit code 2, with a message naming the option and the value."""
    with pytest.raises(InputError) as error:
        _train(tmp_path, cache_path, **bad)
    assert error.value.exit_code == 2 and all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_teacher_is_never_imported_or_loaded(tmp_path):
    """Cache a user-file teacher, then booby-trap its code and weights: train-student, in a
    fresh process, must neither import the file nor read the weights, and still succeed."""
    teacher_file = tmp_path / "my_teacher.py"
    teacher_file.write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes):
            return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, num_classes))
    """))
    weights = tmp_path / "teacher.safetensors"
    from stages.weights import save_weights
    save_weights(resolve_model(f"{teacher_file}:build", num_classes=4, input_shape=(8,)), weights)
    cache = run_caching(CacheTeacherConfig(
        teacher=f"{teacher_file}:build", teacher_weights=weights, dataset=DATASET, out=tmp_path / "c.zarr", chunk_rows=64, device="cpu",
    )).cache

    marker = tmp_path / "teacher-was-imported"
    teacher_file.write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('teacher imported')\n")
    weights.write_bytes(b"not weights")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['pipeline', 'train-student', '--cache', sys.argv[1], '--student', 'mlp-64', '--epochs', '1',"
        " '--out', sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "else:\n    code = 0\n"
        "assert not any('my_teacher' in m for m in sys.modules), 'teacher module imported'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(cache), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_samples"] == 200
    assert not marker.exists()


def test_batchnorm_student_never_gets_a_one_row_batch(tmp_path, cache_path):
    """600 rows in batches of 599 would leave a 1-row batch, which BatchNorm cannot train on."""
    bn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    result = _train(tmp_path, cache_path, model=bn, batch_size=599, epochs=2)
    assert result.test_samples == 200
    result = _train(tmp_path, None, model=bn, batch_size=599, epochs=1, name="scratch")
    assert result.mode == "scratch"


def test_progress_is_reported_up_to_the_total(tmp_path, cache_path):
    calls = []
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "p", cache=cache_path,
                                       epochs=2, batch_size=64, device="cpu")
    train_student.run(config, resolve_model("mlp-64", num_classes=4, input_shape=(8,)), data.split("train"), None,
                      progress=lambda done, total: calls.append((done, total)))
    assert [done for done, _ in calls] == list(range(1, 19)) and {total for _, total in calls} == {18}  # 600 rows / 64


class _NumpySplit:
    """A user's own split whose inputs() returns numpy rather than a tensor."""

    name, num_classes = "train", 4

    def __init__(self, split):
        self._split = split

    def __len__(self):
        return len(self._split)

    def inputs(self, index):
        return self._split.inputs(index).numpy()

    @property
    def labels(self):
        return self._split.labels


@pytest.mark.parametrize("cached", [True, False])
def test_a_split_whose_inputs_are_numpy_is_named_as_such(tmp_path, cache_path, cached):
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path if cached else None,
                                       epochs=1, device="cpu")
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        train_student.run(config, model, _NumpySplit(data.split("train")), None)
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        train_student.run(replace(config, overwrite=True), model, data.split("train"), _NumpySplit(data.split("test")))


def test_caching_a_split_whose_inputs_are_numpy_is_refused(tmp_path):
    from stages import cache_teacher

    config = CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "c.zarr", device="cpu")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        cache_teacher.run(config, teacher, _NumpySplit(resolve_dataset(DATASET).split("train")))


class _PidRecordingItems(torch.utils.data.Dataset):
    """Items of a real split that note, in a folder, the process that loaded each one."""

    def __init__(self, split, folder: Path):
        self.split, self.folder = split, folder

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        (self.folder / str(os.getpid())).touch()
        return self.split.inputs(np.array([i]))[0], int(self.split.labels[i])


@pytest.mark.parametrize("stage", ["cache-teacher", "train-student"])
def test_loader_workers_load_the_items_in_worker_processes(tmp_path, cache_path, stage):
    from stages import cache_teacher
    from stages.data import TorchDatasetSplit

    loaded_by = tmp_path / "pids"
    loaded_by.mkdir()
    split = TorchDatasetSplit("train", _PidRecordingItems(resolve_dataset(DATASET).split("train"), loaded_by))
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    if stage == "cache-teacher":
        config = CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "c.zarr", chunk_rows=64, device="cpu", loader_workers=2)
        cache_teacher.run(config, model, split)
    else:
        config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path, epochs=1,
                                           device="cpu", loader_workers=2)
        train_student.run(config, model, split, None)
    workers = {int(p.name) for p in loaded_by.iterdir()} - {os.getpid()}
    assert len(workers) == 2  # the DataLoader's two worker processes loaded items (the main one checks a few)
