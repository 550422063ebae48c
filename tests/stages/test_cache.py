"""The teacher pass's progress reports and its default batch. (The cache package's own tests are in
tests/stages/cache/, one file per module; this one tests stages.cache_teacher.)"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from tests.conftest import CHUNK_ROWS, DATASET, assert_same_cache, invoke, invoke_json


def test_teacher_pass_reports_rows_done(tmp_path, teacher_weights):
    from stages import cache_teacher

    calls = []
    split = resolve_dataset(DATASET).split("train")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)
    config = cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "p.zarr",
                                              chunk_rows=CHUNK_ROWS, batch_size=100, device="cpu")
    cache_teacher.run(config, teacher, split, progress=lambda done, total: calls.append((done, total)))
    # A teacher batch never crosses a chunk (stages.cache_teacher.chunk_batches): batches of 100
    # over chunks of 64 rows are the chunks themselves. The total comes first, before any batch.
    assert calls == [(min(done, 600), 600) for done in range(0, 704, 64)]


def test_a_language_model_cache_at_the_default_batch_takes_a_chunk_per_batch_without_a_note(tmp_path, caplog):
    """A token cache at a real vocabulary has chunks of fewer rows than the old default batch of
    256 (about 2 MB of soft labels per chunk); at the default batch every language-model
    cache-teacher noted that its batches stopped at chunk boundaries. A batch is now one chunk."""
    pytest.importorskip("transformers")
    caplog.set_level(logging.INFO)
    code, out, err = invoke("cache-teacher", "--teacher", "gpt2:layers=1,dim=16,heads=2,vocab=32000,positions=16",
                            "--dataset", "stdlib-bytes:seq=16,train=3000,test=50", "--device", "cpu", "--out", tmp_path / "c.zarr",
                            "--json")
    assert code == 0, err
    attrs = zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs
    assert json.loads(out)["chunks_total"] > 1 and attrs["chunk_rows"] < 256
    assert attrs["determinism"]["batch_size"] == attrs["chunk_rows"]
    assert "chunk boundaries" not in caplog.text + err and "teacher pass over" in caplog.text + err


def test_a_cache_started_at_the_old_default_batch_resumes_at_the_new_one(tmp_path, teacher_weights):
    """Batches stop at chunk boundaries, so a batch of 256 over chunks of 64 rows is a batch of 64:
    a cache started so resumes at today's default (one chunk), and equals an uninterrupted one."""
    args = ["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
            "--chunk-rows", CHUNK_ROWS, "--device", "cpu"]
    invoke_json(*args, "--batch-size", 256, "--out", tmp_path / "whole.zarr")
    shutil.copytree(tmp_path / "whole.zarr", tmp_path / "resumed.zarr")
    group = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r+")
    group["chunk_done"][2] = 0
    group.attrs["complete"] = False
    assert invoke_json(*args, "--out", tmp_path / "resumed.zarr")["chunks_computed"] == 1
    assert_same_cache(tmp_path / "whole.zarr", tmp_path / "resumed.zarr")
