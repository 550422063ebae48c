"""Reusing one cache: a sweep with its leaderboard and resume, concurrent readers, evaluate, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from tests.conftest import DATASET, invoke, invoke_json

REPO = Path(__file__).resolve().parents[2]


def _sweep_file(tmp_path: Path, cache: Path, **extra) -> Path:
    lines = [f'cache = "{cache}"', 'students = ["mlp-64", "mlp:width=16,depth=1"]', "alphas = [0.5, 0.9]", "seeds = [0, 1]",
             f'out = "{tmp_path / "sweep"}"', *(f"{k} = {json.dumps(v)}" for k, v in extra.items()), "[train]", "epochs = 2"]
    path = tmp_path / "sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_runs_the_grid_and_ranks_it(tmp_path, cache_path):
    board = invoke_json("sweep", _sweep_file(tmp_path, cache_path), "--jobs", "2")
    folder = tmp_path / "sweep"
    assert board["runs_total"] == 2 * 2 * (2 + 1) and board["runs_reused"] == 0 and board["failures"] == {}
    assert len(board["runs"]) == 12 and len(board["groups"]) == 2 * 3
    assert all(g["seeds"] == 2 for g in board["groups"])
    accuracies = [g["accuracy_mean"] for g in board["groups"]]
    assert accuracies == sorted(accuracies, reverse=True)
    # every run is an ordinary train-student run folder, and its figures are the leaderboard's
    run = next(r for r in board["runs"] if r["run"] == "mlp-64-a0.9-T3-s1")
    summary = json.loads((folder / "mlp-64-a0.9-T3-s1" / "summary.json").read_text())
    assert run["test_accuracy"] == summary["test_accuracy"] and summary["mode"] == "distilled"
    config = json.loads((folder / "mlp-64-a0.9-T3-s1" / "config.json").read_text())
    assert (config["alpha"], config["temperature"], config["seed"], config["epochs"]) == (0.9, 3.0, 1, 2)
    group = next(g for g in board["groups"] if g["student"] == "mlp-64" and g["mode"] == "scratch")
    seeds = [r["test_accuracy"] for r in board["runs"] if r["student"] == "mlp-64" and r["mode"] == "scratch"]
    assert group["accuracy_mean"] == pytest.approx(np.mean(seeds)) and group["accuracy_min"] == min(seeds)
    csv_lines = (folder / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("student,mode,alpha,temperature,num_parameters,seeds,accuracy_mean") and len(csv_lines) == 7
    assert (folder / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "leaderboard.json").read_text())["groups"] == board["groups"]


def test_sweep_resumes_only_what_is_left(tmp_path, cache_path):
    sweep = _sweep_file(tmp_path, cache_path)
    invoke_json("sweep", sweep)
    folder = tmp_path / "sweep"
    kept = {p: p.read_bytes() for p in folder.glob("*/metrics.jsonl")}
    (folder / "mlp-64-scratch-s1" / "summary.json").unlink()  # a run killed after its last checkpoint
    for path in (folder / "mlp-64-a0.5-T3-s0").iterdir():  # and one that never started
        path.unlink()
    (folder / "mlp-64-a0.5-T3-s0").rmdir()
    board = invoke_json("sweep", sweep)
    assert board["runs_reused"] == 10 and len(board["runs"]) == 12
    changed = [p.parent.name for p, data in kept.items() if not p.is_file() or p.read_bytes() != data]
    assert changed == ["mlp-64-a0.5-T3-s0"]  # rebuilt identically, bar the seconds
    redone = [json.loads(line) for line in (folder / "mlp-64-a0.5-T3-s0" / "metrics.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in kept[folder / "mlp-64-a0.5-T3-s0" / "metrics.jsonl"].decode().splitlines()]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in redone] == [{k: v for k, v in m.items() if k != "seconds"} for m in before]


def test_a_changed_sweep_does_not_silently_reuse_other_runs(tmp_path, cache_path):
    invoke_json("sweep", _sweep_file(tmp_path, cache_path))
    sweep = _sweep_file(tmp_path, cache_path)
    sweep.write_text(sweep.read_text().replace("epochs = 2", "epochs = 3"))
    code, out, err = invoke("sweep", sweep, "--json")
    assert code == 2 and "12 of 12 runs failed" in err and "epochs differ" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    board = json.loads(out)
    assert board["runs_reused"] == 0 and board["runs"] == [] and len(board["failures"]) == 12
    board = invoke_json("sweep", sweep, "--overwrite")
    assert board["failures"] == {} and len(board["runs"]) == 12
    assert json.loads((tmp_path / "sweep" / "mlp-64-scratch-s0" / "config.json").read_text())["epochs"] == 3


def test_concurrent_students_on_one_cache_match_sequential_ones(tmp_path, cache_path):
    """Readers take no lock: three train-student processes on one cache at once all succeed and
    give what they give one after another."""
    def command(name):
        return [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache_path), "--student", "mlp-64",
                "--epochs", "3", "--seed", name[-1], "--out", str(tmp_path / name), "--device", "cpu", "--json"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sequential = [subprocess.run(command(f"seq{s}"), capture_output=True, text=True, cwd=REPO, env=env, timeout=300) for s in "012"]
    running = [subprocess.Popen(command(f"par{s}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
               for s in "012"]
    parallel = [(p.communicate(timeout=300), p.returncode) for p in running]
    assert all(p.returncode == 0 for p in sequential) and all(code == 0 for _, code in parallel)
    for s in "012":
        one = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (tmp_path / f"seq{s}" / "metrics.jsonl").read_text().splitlines()]
        other = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (tmp_path / f"par{s}" / "metrics.jsonl").read_text().splitlines()]
        assert one == other and len(one) == 3


def test_evaluate_reports_quality_agreement_size_and_speed(tmp_path, cache_path):
    run = invoke_json("train-student", "--cache", cache_path, "--student", "mlp-64", "--epochs", "2", "--out", tmp_path / "r")
    report = invoke_json("evaluate", "--model", "mlp-64", "--weights", run["weights"], "--cache", cache_path, "--batch-size", "64")
    assert report["dataset"] == DATASET and report["split"] == "test"
    assert report["accuracy"] == run["test_accuracy"] and report["nll"] == pytest.approx(run["test_nll"], rel=1e-6)
    assert report["num_parameters"] == run["num_parameters"] and report["weights_bytes"] == Path(run["weights"]).stat().st_size
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=Path(run["weights"])).eval()
    train = resolve_dataset(DATASET).split("train")
    stored = zarr.open_group(str(cache_path), mode="r")
    with torch.no_grad():
        ours = model(train.inputs(stored["index"][:])).argmax(1).numpy()
    assert report["teacher_agreement"] == pytest.approx(float((ours == stored["logits"][:].argmax(1)).mean()))
    assert report["agreement_split"] == "train"
    speed = report["speed"]
    assert speed["batch_size"] == 64 and 0 < speed["latency_ms_min"] <= speed["latency_ms_median"] <= speed["latency_ms_max"]
    assert speed["samples_per_second"] == pytest.approx(64 / speed["latency_ms_median"] * 1000)


def test_inspect_reports_calibration_and_histograms(tmp_path, cache_path, teacher_weights):
    report = invoke_json("inspect", cache_path, "--png", tmp_path / "c.png")
    stored = zarr.open_group(str(cache_path), mode="r")
    labels, T = stored["labels"][:], stored.attrs["temperature"]
    for t in (T, 1.0):
        z = stored["logits"][:].astype(np.float64) * (T / t)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        confidence, right = p.max(1), p.argmax(1) == labels
        bins = np.minimum((confidence * 15).astype(int), 14)
        ece = sum(abs(right[bins == b].sum() - confidence[bins == b].sum()) for b in range(15)) / len(p)
        entry = report["calibration"][f"T={t:g}"]
        assert entry["ece"] == pytest.approx(ece) and entry["accuracy"] == pytest.approx(right.mean())
        assert entry["nll"] == pytest.approx(-np.log(p[np.arange(len(p)), labels]).mean(), rel=1e-6)
    assert report["calibration"]["T=1"]["nll"] == pytest.approx(report["teacher_metrics"]["nll"], rel=1e-5)
    assert sum(report["histograms"]["max_probability"]["count"]) == 600 == sum(report["histograms"]["entropy_nats"]["count"])
    assert report["bytes_per_row"] == pytest.approx(report["bytes_on_disk"] / 600)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
