"""The teacher pass's progress reports. (The cache package's own tests are in tests/stages/cache/,
one file per module; this one tests stages.cache_teacher.)"""

from __future__ import annotations

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from tests.conftest import CHUNK_ROWS, DATASET


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
