"""`pipeline gpu-check` at --device cpu at its test size (every step's path in seconds, at the
small size's 4,096-class teacher; the bench one section): every step runs, reports
real figures, writes valid caches and a torchrun run that joined a gloo group. Its figures are
not judged here: speed belongs to the check on its machine, never to a test."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import gpu_check
from stages.cache import CacheReader
from stages.errors import PipelineError
from stages.verify import verify
from tests.conftest import invoke

REPO = Path(__file__).resolve().parents[2]
STEPS = ["cache-teacher fp32", "cache-teacher bf16", "bench", "train-student", "torchrun"]


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[int, dict, str, Path]:
    """The real command, once for the module, in a process of its own (a session of its own too,
    so that whatever it starts is killed with it if the test is stopped): (exit code, the JSON
    report, stderr, the kept folder)."""
    folder = tmp_path_factory.mktemp("gpu-check") / "kept"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "gpu-check", "--device", "cpu", "--size", "test", "--keep", str(folder), "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, json.loads(out), err, folder


def _rows(report: dict, step: str) -> list[dict]:
    return [row for row in report["steps"] if row["step"] == step]


def test_the_check_reports_every_step_with_a_finite_positive_throughput(check):
    code, report, err, _ = check
    assert code == 0, err[-3000:]
    assert (report["size"], report["torch"], report["cuda"], report["failed"]) == ("test", torch.__version__, torch.version.cuda, [])
    assert report["device"].startswith("cpu") and report["tokens"] > 0
    assert [row["step"] for row in report["steps"]] == STEPS
    assert all(row["ok"] and row["device"] == "cpu" for row in report["steps"])
    for step in STEPS:
        (row,) = _rows(report, step)
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, step
        if step != "bench":  # the bench's figures are its ratios, below
            assert row["unit"] == "tokens/s" and math.isfinite(row["throughput"]) and row["throughput"] > 0, step
    for amp in ("fp32", "bf16"):  # the stage over the bare forward on the same batches
        ratio = _rows(report, f"cache-teacher {amp}")[0]["ratio"]
        assert math.isfinite(ratio) and ratio > 0
    ratios = _rows(report, "bench")[0]["ratios"]
    assert "lm_cache_vs_forward" in ratios and all(math.isfinite(v) and v > 0 for v in ratios.values())


def test_the_caches_the_check_writes_are_valid_top_k_caches_of_the_teacher_at_each_autocast(check):
    _, report, _, folder = check
    for amp, recorded in (("fp32", "none"), ("bf16", "bf16")):
        cache = Path(_rows(report, f"cache-teacher {amp}")[0]["cache"])
        assert cache.parent == folder
        verified = verify(cache)
        assert verified.ok, [c for c in verified.checks if not c["ok"]]
        reader = CacheReader(cache)
        assert reader.num_samples == report["rows"] and reader.layout.kind == "topk"
        assert reader.layout.options.top_k == report["sizes"]["top_k"] and reader.num_classes == 4096  # the teacher's vocabulary
        assert reader.attrs["teacher_amp"] == recorded and reader.attrs["teachers"][0]["spec"] == report["sizes"]["teacher"]


def test_the_torchrun_step_trains_in_a_gloo_group_of_one_and_exits_with_0(check):
    _, report, _, folder = check
    (row,) = _rows(report, "torchrun")
    assert (row["ok"], row["backend"], row["returncode"]) == (True, "gloo", 0)
    assert "process 0 of 1 in a gloo process group" in (folder / "student-torchrun-process.log").read_text()
    run = folder / "student-torchrun"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and (run / "model.safetensors").is_file()
    assert json.loads((folder / "student-torchrun-process.out").read_text().splitlines()[-1])["mode"] == "distilled"


def test_failing_steps_are_reported_the_others_still_run_and_the_exit_code_says_so(monkeypatch):
    """Steps made to fail or succeed at once, so that only the check's own bookkeeping and table run."""
    ran = []

    def fails(error):
        def step(*args):
            raise error
        return step

    def succeeds(name, **figures):
        def step(*args):
            ran.append(name)
            return {"seconds": 1.0, **figures}
        return step

    monkeypatch.setattr(gpu_check, "_cache_teacher", fails(RuntimeError("the device fell over")))
    monkeypatch.setattr(gpu_check, "_bench", succeeds("bench", ratios={"a_ratio_added_later": 1.25}))
    monkeypatch.setattr(gpu_check, "_train_student", succeeds("train-student", throughput=10.0, unit="tokens/s"))
    monkeypatch.setattr(gpu_check, "_torchrun", fails(PipelineError("exit code 1: no rendezvous")))
    code, out, err = invoke("gpu-check", "--device", "cpu")
    assert code == 1 and ran == ["bench", "train-student"]
    assert err.strip() == "error: 3 of 5 steps failed; cache-teacher fp32: RuntimeError: the device fell over"
    rows = {cells[0]: cells for line in out.splitlines() if line.startswith("│")
            for cells in [[c.strip() for c in line.strip("│").split("│")]]}
    assert list(rows) == [*STEPS[:3], "a_ratio_added_later", *STEPS[3:]]  # the bench's ratios below it, whatever their names
    assert [rows[step][-1] for step in STEPS] == ["FAILED", "FAILED", "yes", "yes", "FAILED"]
    assert rows["a_ratio_added_later"][4] == "1.250" and rows["train-student"][3] == "10 tokens/s"
    assert rows["torchrun"][4] == "exit code 1: no rendezvous"
    assert f"torch {torch.__version__}" in out and "size small" in out
