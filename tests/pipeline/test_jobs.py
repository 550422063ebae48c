"""pipeline.jobs: the specs of a stage config resolved into objects and the stage run, as every
command runs them: what a cache may hand on (never code), the files a cache or run records, and
what verify and evaluate need before they run anything."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.jobs import run_caching, run_training, spec_from_cache
from pipeline.models import resolve_model
from stages.cache_teacher import CacheTeacherConfig
from stages.errors import InputError
from stages.train_student import TrainConfig
from stages.weights import save_weights
from tests.conftest import DATASET, invoke, invoke_json
from tests.doc_examples import example


def test_teacher_provenance_can_be_checked_by_a_third_party(tmp_path, monkeypatch, teacher_weights):
    """A cache made with a relative --teacher-weights records the file's absolute path, and the
    documented recipe (example weights-fingerprint) recomputes the recorded weights_sha256 from that file with no project code."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(teacher_weights, tmp_path / "teacher.safetensors")
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", "teacher.safetensors", "--dataset", DATASET, "--out", "c.zarr")
    recorded = zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["teachers"][0]
    assert recorded["weights"] == str(tmp_path / "teacher.safetensors")
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["config"]["teacher_weights"] == recorded["weights"]

    (tmp_path / "recipe.py").write_text(example("weights-fingerprint"))
    proc = subprocess.run([sys.executable, "recipe.py", recorded["weights"]], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == recorded["weights_sha256"]


def test_spec_from_cache_hands_on_builtins_and_files_but_code_only_when_the_user_named_it(tmp_path):
    cache = tmp_path / "c.zarr"
    factory = tmp_path / "their_data.py"
    factory.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef build(split):\n    return None\n")
    code = f"{factory}:build"
    for spec in ("digits", "synthetic:n=10,seed=3", str(tmp_path / "d.npz"), f"text:{tmp_path / 'd.jsonl'},tokenizer=hf:{tmp_path}"):
        assert spec_from_cache(cache, {"dataset": {"spec": spec}}, "dataset") == spec
    for spec, named in ((code, None), (code, "digits"), ("pkg.data:build", "pkg.other:build")):
        with pytest.raises(InputError) as caught:
            spec_from_cache(cache, {"dataset": {"spec": spec}}, "dataset", named=named)
        assert str(caught.value) == (f"cache {cache} records the dataset {spec!r}, which is code, and a cache never runs code; "
                                     f'if you trust it, name it yourself: --dataset {spec} (in a sweep file: dataset = "{spec}")')
    assert spec_from_cache(cache, {"dataset": {"spec": code}}, "dataset", named=code) == code
    assert not (tmp_path / "ran").exists()  # refused or handed on, the code was neither imported nor called

    assert spec_from_cache(cache, {"augment": {"spec": "shift:2+flip"}}, "augment") == "shift:2+flip"
    with pytest.raises(InputError, match=re.escape('--augment shift:2+pkg.aug:build (in a sweep file: augment = "shift:2+pkg.aug:build" under [train])')):
        spec_from_cache(cache, {"augment": {"spec": "shift:2+pkg.aug:build"}}, "augment")
    assert spec_from_cache(cache, {"augment": {"spec": "shift:2+pkg.aug:build"}}, "augment", named="shift:2+pkg.aug:build") \
        == "shift:2+pkg.aug:build"
    assert spec_from_cache(cache, {}, "augment") == "none" and spec_from_cache(cache, {"augment": None}, "augment") == "none"
    assert spec_from_cache(cache, {}, "dataset") is None


def test_a_run_records_the_files_it_names_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_weights(resolve_model("linear", num_classes=2, input_shape=(4,)), tmp_path / "start.safetensors")
    config = TrainConfig(model="linear", dataset="synthetic:n=40,test=10,features=4,classes=2", out=Path("run"),
                         model_weights=Path("start.safetensors"), weights_out=Path("final.safetensors"), epochs=1, device="cpu")
    result = run_training(config)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["model_weights"], recorded["weights_out"]) == (str(tmp_path / "start.safetensors"), str(tmp_path / "final.safetensors"))
    assert result.weights == tmp_path / "final.safetensors" and result.weights.is_file()


@pytest.fixture
def view_cache(tmp_path) -> tuple[str, Path]:
    """A cache of two flipped views of each of 64 small images, by an untrained linear teacher."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x_train=rng.random((64, 1, 4, 4), dtype=np.float32), y_train=np.arange(64) % 3,
             x_test=rng.random((16, 1, 4, 4), dtype=np.float32), y_test=np.arange(16) % 3)
    dataset = str(tmp_path / "images.npz")
    run_caching(CacheTeacherConfig(teacher="linear", dataset=dataset, out=tmp_path / "views.zarr", augment="flip", views=2,
                                   device="cpu"))
    return dataset, tmp_path / "views.zarr"


def test_naming_a_view_caches_own_augmentation_replays_its_views_and_adds_none(tmp_path, view_cache):
    dataset, cache = view_cache

    def train(augment: str, name: str) -> list[dict]:
        run_training(TrainConfig(model="linear", dataset=dataset, cache=cache, augment=augment, epochs=2, batch_size=16,
                                 device="cpu", out=tmp_path / name))
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert train("flip", "named") == train("none", "replayed")  # the same views, and nothing more
    with pytest.raises(InputError, match="the cache holds views made with 'flip' and replays them exactly; drop `augment`"):
        train("shift:1", "other")


def test_verify_with_a_teacher_refuses_what_one_teacher_cannot_check(tmp_path, cache_path, teacher_weights):
    code, _, err = invoke("verify", cache_path, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", 0)
    assert code == 2 and err == "error: --teacher with --rows 0 re-runs nothing; give --rows N\n"
    other = tmp_path / "other.safetensors"
    save_weights(resolve_model("mlp-64", num_classes=4, input_shape=(8,)), other)
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", other, "--dataset", DATASET, "--temperature", 3,
                "--chunk-rows", 64, "--device", "cpu", "--out", tmp_path / "other.zarr")
    invoke_json("combine", cache_path, tmp_path / "other.zarr", "--out", tmp_path / "ensemble.zarr")
    code, _, err = invoke("verify", tmp_path / "ensemble.zarr", "--teacher", "mlp-64", "--teacher-weights", teacher_weights)
    assert code == 2
    assert err == f"error: {tmp_path / 'ensemble.zarr'} holds an ensemble of 2 teachers; one teacher's outputs cannot match it\n"
    assert invoke_json("verify", tmp_path / "ensemble.zarr")["ok"]  # without a teacher it checks what it can


def test_evaluate_needs_a_dataset_and_a_class_count(tmp_path):
    code, _, err = invoke("evaluate", "--model", "mlp-64")
    assert code == 2 and err == "error: missing option --dataset (or --cache)\n"
    np.savez(tmp_path / "unlabeled.npz", x_test=np.ones((5, 3), dtype=np.float32))
    code, _, err = invoke("evaluate", "--model", "mlp-64", "--dataset", tmp_path / "unlabeled.npz")
    assert code == 2 and err == f"error: dataset {tmp_path / 'unlabeled.npz'} does not say how many classes it has\n"
