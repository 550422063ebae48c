"""The library shows its progress from a plain Python script, and only once when the
application configures logging itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
    import logging
    from pathlib import Path
    from pipeline.datasets import resolve_dataset
    from pipeline.models import resolve_model
    from stages import cache_teacher
    {configure}
    split = resolve_dataset("digits").split("train")
    teacher = resolve_model("mlp-64", num_classes=10, input_shape=(64,))
    cache_teacher.run(cache_teacher.CacheTeacherConfig(teacher="mlp-64", dataset="digits", out=Path({out!r})), teacher, split)
"""


@pytest.mark.parametrize("configure", ["", "logging.basicConfig(level=logging.INFO, format='app: %(message)s')"],
                         ids=["no logging configured", "the application's own logging"])
def test_a_script_sees_the_stages_progress_once(tmp_path, configure):
    script = textwrap.dedent(SCRIPT).format(configure=configure, out=str(tmp_path / "c.zarr"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "teacher pass over" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("app: ") == bool(configure)
