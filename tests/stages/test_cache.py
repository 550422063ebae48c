"""The teacher pass's progress reports and its default batch. (The cache package's own tests are in
tests/stages/cache/, one file per module; this one tests stages.cache_teacher.)"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.kinds import KINDS
from stages.weights import save_weights
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


VOCAB_TEACHER = "gpt2:layers=1,dim=16,heads=2,vocab=32000,positions=16"
# Each kind at a real vocabulary, in several chunks of sequences of 16 bytes, the first one measured.
# Dense is uncompressed (its estimate is exact) and 64 kB a token: fewer rows, in smaller chunks.
SIZED_KINDS = {
    "dense": ("stdlib-bytes:seq=16,train=600,test=50", 8, ("--format", "dense")),
    "topk": ("stdlib-bytes:seq=16,train=4000,test=50", 32, ("--format", "topk", "--top-k", 32)),
    "qtopk": ("stdlib-bytes:seq=16,train=4000,test=50", 32, ("--format", "qtopk", "--top-k", 32)),
    "sampled": ("stdlib-bytes:seq=16,train=4000,test=50", 32, ("--format", "sampled", "--samples", 12)),
    "headtail": ("stdlib-bytes:seq=16,train=4000,test=50", 32, ("--format", "headtail", "--top-k", 8, "--samples", 12)),
}
# The size measured on the first chunk, or for a cache of uncompressed arrays (dense, topk), the exact one said before.
MEASURED = re.compile(r"soft labels: [\d,]+ bytes per token position \(([\d,.]+) per valid token\).*(measured on chunk 0|\(uncompressed\))")


@pytest.mark.parametrize("kind", list(SIZED_KINDS))
def test_the_size_measured_on_the_first_chunk_is_within_10_percent_of_the_bytes_on_disk(tmp_path, caplog, kind):
    """The estimate before the pass said 102 bytes a token for a qtopk cache that took 27.2: the
    size is measured on the first chunk's compressed arrays as stored (an uncompressed array's is
    exact beforehand), and is then within 10% of the cache's soft labels on disk, for every kind."""
    pytest.importorskip("transformers")
    caplog.set_level(logging.INFO)
    dataset, chunk_rows, options = SIZED_KINDS[kind]
    out = tmp_path / "c.zarr"
    result = invoke_json("cache-teacher", "--teacher", VOCAB_TEACHER, "--dataset", dataset, *options, "--chunk-rows", chunk_rows,
                         "--device", "cpu", "--out", out)
    assert result["chunks_total"] >= 4
    described = invoke_json("inspect", out)
    tokens = described["num_tokens"]
    on_disk = sum(described["bytes_per_array"][name] for name in KINDS[kind].soft_arrays) / tokens
    (measured,) = [float(m.group(1).replace(",", "")) for m in map(MEASURED.search, caplog.messages) if m]
    assert abs(measured - on_disk) <= 0.1 * on_disk, (measured, on_disk)


def test_a_cache_over_max_gib_by_its_measured_size_stops_after_its_first_chunk_and_resumes(tmp_path, monkeypatch):
    """A byte model that says a cache fits is checked again by the first chunk's measured size: over
    `max_gib`, one line, exit 2, the chunk kept; the same command with a larger limit resumes."""
    pytest.importorskip("transformers")
    qtopk = type(KINDS["qtopk"])
    monkeypatch.setattr(qtopk, "position_bytes", lambda self, layout: dict.fromkeys(self.soft_arrays, 0.001))
    dataset, chunk_rows, options = SIZED_KINDS["qtopk"]
    weights = tmp_path / "teacher.safetensors"  # the same teacher for the resume
    save_weights(resolve_model(VOCAB_TEACHER, num_classes=32000, input_shape=(16,)), weights)
    args = ["cache-teacher", "--teacher", VOCAB_TEACHER, "--teacher-weights", weights, "--dataset", dataset, *options,
            "--chunk-rows", chunk_rows, "--device", "cpu", "--out", tmp_path / "c.zarr"]
    code, _, err = invoke(*args, "--max-gib", 0.0001)  # 107 kB: the qtopk cache takes about 150
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "measured on its chunk 0" in err and "more than --max-gib 0.0001" in err, err
    done = int(zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["chunk_done"][:].sum())
    assert done >= 1
    result = invoke_json(*args, "--max-gib", 1)
    assert result["chunks_computed"] == result["chunks_total"] - done
