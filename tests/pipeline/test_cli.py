"""The CLI as a user drives it: the whole pipeline on tiny data, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pipeline.jobs
from tests.conftest import DATASET, invoke, invoke_json

REPO = Path(__file__).resolve().parents[2]


def test_end_to_end_on_tiny_data(tmp_path, monkeypatch):
    teacher = invoke_json("train-teacher", "--model", "mlp-128", "--dataset", DATASET, "--epochs", "6",
                          "--augment", "none", "--out", tmp_path / "t.safetensors")
    assert Path(teacher["weights"]).is_file() and teacher["test_samples"] == 200

    cache = invoke_json("cache-teacher", "--teacher", "mlp-128", "--teacher-weights", teacher["weights"],
                        "--dataset", DATASET, "--out", tmp_path / "c.zarr", "--temperature", "4", "--batch-size", "50")
    assert {"cache", "num_samples", "num_classes", "temperature", "bytes_on_disk", "seconds", "teacher_accuracy"} <= set(cache)
    assert (cache["num_samples"], cache["num_classes"], cache["temperature"]) == (600, 4, 4.0)
    assert cache["bytes_on_disk"] > 600 * 4 * 2 * 0.5 and cache["teacher_accuracy"] > 0.5

    built = []
    real_resolve = pipeline.jobs.resolve_model
    monkeypatch.setattr(pipeline.jobs, "resolve_model", lambda spec, **kw: built.append(spec) or real_resolve(spec, **kw))
    student = invoke_json("train-student", "--cache", cache["cache"], "--student", "mlp-64", "--epochs", "4",
                          "--out", tmp_path / "kd")
    assert built == ["mlp-64"]  # the teacher's spec is never resolved in stage two
    assert {"run_dir", "test_accuracy", "test_errors", "test_samples", "seconds"} <= set(student)
    assert student["test_samples"] == 200 and student["test_errors"] == round(200 * (1 - student["test_accuracy"]))
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["dataset"] == DATASET  # from the cache

    scratch = invoke_json("train-student", "--student", "mlp-64", "--dataset", DATASET, "--epochs", "4", "--out", tmp_path / "s")
    assert scratch["mode"] == "scratch"


def test_default_paths_go_under_the_data_root(tmp_path, teacher_weights):
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET)
    assert Path(cache["cache"]) == tmp_path / "data" / "caches" / "mlp-64-synthetic-train-T4.zarr"
    run = invoke_json("train-student", "--cache", cache["cache"], "--student", "mlp-64", "--epochs", "1")
    assert Path(run["run_dir"]) == tmp_path / "data" / "runs" / "mlp-64-kd-s0"


def test_human_output_is_a_table(tmp_path, cache_path):
    code, out, _ = invoke("train-student", "--cache", cache_path, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "r")
    assert code == 0 and "test_errors" in out and not out.lstrip().startswith("{")


def test_toml_config_with_command_line_override(tmp_path, cache_path):
    config = tmp_path / "student.toml"
    config.write_text(f'student = "mlp-64"\ncache = "{cache_path}"\nepochs = 2\nalpha = 0.5\nbatch-size = 64\n')
    run = invoke_json("train-student", "--config", config, "--alpha", "0.25", "--out", tmp_path / "r")
    resolved = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert (resolved["epochs"], resolved["alpha"], resolved["batch_size"], resolved["model"]) == (2, 0.25, 64, "mlp-64")
    assert len((Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()) == 2


def _student_file(tmp_path, classes):
    path = tmp_path / "five.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn
        def build(num_classes):
            return nn.Linear(8, {classes})
    """))
    return f"{path}:build"


def _bad_inputs(tmp_path: Path, cache: Path) -> dict[str, tuple[list, int, str]]:
    """name -> (arguments, exit code, words the one-line error must contain)."""
    (tmp_path / "bad.toml").write_text("epochs = [")
    return {
        "missing cache": (["train-student", "--cache", tmp_path / "none.zarr", "--student", "mlp-64"], 2, "cache not found"),
        "folder that is not a cache": (["train-student", "--cache", tmp_path, "--student", "mlp-64"], 2, "not a cache"),
        "missing dataset file": (["train-student", "--student", "mlp-64", "--dataset", tmp_path / "no.npz"], 2, "dataset file not found"),
        "unknown dataset spec": (["train-student", "--student", "mlp-64", "--dataset", "imagenet-99"], 2, "unknown dataset spec"),
        "unknown model spec": (["train-student", "--cache", cache, "--student", "resnet-9000"], 2, "unknown model spec"),
        "missing model module": (["train-student", "--cache", cache, "--student", "no_such_pkg.models:build"], 2, "not found"),
        "missing model file": (["train-student", "--cache", cache, "--student", tmp_path / "none.py:build"], 2, "file not found"),
        "student class count differs": (["train-student", "--cache", cache, "--student", _student_file(tmp_path, 5)], 3, "5 classes but the cache has 4"),
        "cache of other data": (["train-student", "--cache", cache, "--student", "mlp-64", "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=9"], 3, "does not match the cache"),
        "no labels without cache": (["train-student", "--student", "mlp-64"], 2, "missing option"),
        "existing cache without --overwrite": (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", cache], 2, "--overwrite"),
        "temperature zero": (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", tmp_path / "t0.zarr", "--temperature", "0"], 2, "temperature"),
        "negative student temperature": (["train-student", "--cache", cache, "--student", "mlp-64", "--temperature", "-1"], 2, "temperature"),
        "alpha above one": (["train-student", "--cache", cache, "--student", "mlp-64", "--alpha", "2"], 2, "alpha"),
        "unknown dtype": (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", tmp_path / "d.zarr", "--dtype", "int8"], 2, "dtype"),
        "missing weights file": (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", tmp_path / "w.safetensors", "--dataset", DATASET, "--out", tmp_path / "w.zarr"], 2, "weights file not found"),
        "weights that do not fit": (["cache-teacher", "--teacher", "mlp-128", "--teacher-weights", "TEACHER", "--dataset", DATASET, "--out", tmp_path / "f.zarr"], 2, "does not fit"),
        "cnn on flat inputs": (["cache-teacher", "--teacher", "cnn", "--dataset", DATASET, "--out", tmp_path / "cnn.zarr"], 2, "image inputs"),
        "bad TOML": (["train-student", "--config", tmp_path / "bad.toml"], 2, "not valid TOML"),
        "missing split": (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--split", "valid", "--out", tmp_path / "v.zarr"], 2, "no split 'valid'"),
        "bad augment": (["train-student", "--cache", cache, "--student", "mlp-64", "--augment", "shift:x"], 2, "augment"),
        "cuda without a GPU": (["train-student", "--cache", cache, "--student", "mlp-64", "--device", "cuda"], 2, "CUDA"),
    }


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(_bad_inputs(Path("/tmp"), Path("/tmp/c.zarr"))))
def test_bad_input_gives_one_line_and_changes_nothing(case, tmp_path, cache_path, teacher_weights):
    args, code, words = _bad_inputs(tmp_path, cache_path)[case]
    args = [teacher_weights if a == "TEACHER" else a for a in args]
    if "cuda" in args and _has_cuda():
        pytest.skip("this machine has a GPU")
    before = _tree(tmp_path)
    exit_code, out, err = invoke(*args)
    assert exit_code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err + out
    assert _tree(tmp_path) == before


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_errors_from_a_real_process_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train-student", "--cache", str(tmp_path / "none.zarr"), "--student", "mlp-64"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: cache not found: {tmp_path / 'none.zarr'}"]


def test_npz_dataset_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    np.savez(tmp_path / "mine.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    run = invoke_json("train-teacher", "--model", "mlp-64", "--dataset", tmp_path / "mine.npz", "--epochs", "20",
                      "--augment", "none", "--out", tmp_path / "t.safetensors")
    assert run["test_accuracy"] > 0.6  # 4 classes: chance is 0.25
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", run["weights"],
                        "--dataset", tmp_path / "mine.npz", "--out", tmp_path / "c.zarr")
    assert cache["num_samples"] == 200 and cache["num_classes"] == 4
