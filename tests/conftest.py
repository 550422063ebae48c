"""Shared fixtures: a tiny real dataset, a teacher with saved weights, and a cache of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from pipeline.jobs import run_training
from stages import cache_teacher, train_student

# 600 training rows in chunks of 64 (the last one short), 4 classes, 8 features.
DATASET = "synthetic:n=600,test=200,features=8,classes=4,seed=3"
CHUNK_ROWS = 64
TEMPERATURE = 3.0


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Keep every default output of the CLI inside the test's own folder."""
    monkeypatch.setattr("pipeline.cli.DATA_ROOT", tmp_path / "data")
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> Path:
    """An mlp-64 teacher trained for a few epochs on the tiny dataset, saved as safetensors."""
    folder = tmp_path_factory.mktemp("teacher")
    config = train_student.TrainConfig(
        model="mlp-64", dataset=DATASET, out=folder / "run", weights_out=folder / "teacher.safetensors",
        alpha=0.0, epochs=8, batch_size=32, seed=7, device="cpu",
    )
    return run_training(config).weights


@pytest.fixture
def cache_path(tmp_path, teacher_weights) -> Path:
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(
        teacher="mlp-64", teacher_weights=teacher_weights, dataset=DATASET, out=tmp_path / "cache.zarr",
        temperature=TEMPERATURE, chunk_rows=CHUNK_ROWS, device="cpu",
    )
    return cache_teacher.run(config, teacher, split).cache


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def invoke_json(*args: str) -> dict:
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
