"""Reusing one cache: a sweep with its leaderboard and resume, concurrent readers, evaluate, inspect."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from tests.conftest import DATASET, invoke, invoke_json

REPO = Path(__file__).resolve().parents[2]


def _sweep_file(tmp_path: Path, cache: Path, epochs: int = 2, **extra) -> Path:
    keys = {"cache": str(cache), "students": ["mlp-64", "mlp:width=16,depth=1"], "alphas": [0.5, 0.9], "seeds": [0, 1],
            "out": str(tmp_path / "sweep"), **extra}
    lines = [*(f"{k} = {json.dumps(v)}" for k, v in keys.items()), "[train]", f"epochs = {epochs}"]
    path = tmp_path / "sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_runs_the_grid_and_ranks_it(tmp_path, cache_path, capfd):
    board = invoke_json("sweep", _sweep_file(tmp_path, cache_path), "--jobs", "2")
    # The workers' interleaved log lines (their stderr is the process's) each name their run.
    epochs = [line for line in capfd.readouterr().err.splitlines() if " epoch " in line]
    named = [re.fullmatch(r"\d\d:\d\d:\d\d (\S+): epoch ([12])/2 .*", line) for line in epochs]
    assert all(named) and sorted(m.groups() for m in named) == sorted((r["run"], e) for r in board["runs"] for e in "12")
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
    # Paired by seed: every run of a seed starts alike and reads the cache's batches (hard labels at alpha 0).
    scratch = json.loads((folder / "mlp-64-scratch-s1" / "config.json").read_text())
    assert (scratch["cache"], scratch["alpha"], scratch["seed"]) == (str(cache_path), 0.0, 1)
    for g in board["groups"]:
        hard = {r["seed"]: r["test_accuracy"] for r in board["runs"] if (r["student"], r["mode"]) == (g["student"], "scratch")}
        if g["mode"] == "scratch":
            assert g["vs_hard_labels_mean"] is None and g["beats_hard_labels"] is None
            continue
        mine = {r["seed"]: r["test_accuracy"] for r in board["runs"]
                if (r["student"], r["mode"], r["alpha"]) == (g["student"], "distilled", g["alpha"])}
        differences = [mine[s] - hard[s] for s in (0, 1)]
        half = 12.7062047 * abs(differences[0] - differences[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) sd / sqrt(2)
        assert g["vs_hard_labels_seeds"] == 2 and g["vs_hard_labels_mean"] == pytest.approx(np.mean(differences))
        assert (g["vs_hard_labels_low"], g["vs_hard_labels_high"]) == (pytest.approx(np.mean(differences) - half),
                                                                       pytest.approx(np.mean(differences) + half))
        assert g["beats_hard_labels"] == ("yes" if g["vs_hard_labels_low"] > 0 else "no: worse" if g["vs_hard_labels_high"] < 0
                                          else "not resolved at 2 seeds")
    csv_lines = (folder / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("student,mode,alpha,temperature,divergence,num_parameters,seeds,accuracy_mean") and len(csv_lines) == 7
    # Figures at 6 significant digits, not a mean's float noise (0.9544999999999999).
    for row, group in zip(csv.DictReader(csv_lines), board["groups"], strict=True):
        for figure in ("accuracy_mean", "seconds_mean"):
            assert row[figure] == str(float(f"{group[figure]:.6g}")), figure
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


def _start_sweep_with_grandchildren(tmp_path: Path, cache: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`pipeline sweep --jobs 2`, in the background, of 4 runs (alpha 0.5 and hard labels, seeds 0
    and 1: two in the workers, one handed to them ahead of time, one still queued) of a student
    whose factory, in a sweep worker, starts a long-lived child process of its own, as a
    DataLoader worker is one: the worker's whole tree must go with the sweep. Returns the sweep's
    process, its file, and the file listing those children's pids."""
    children = tmp_path / "children.txt"
    factory = tmp_path / "student_with_child.py"
    factory.write_text(textwrap.dedent(f"""
        import multiprocessing, subprocess
        from pipeline.models import resolve_model

        def build(num_classes):
            if multiprocessing.parent_process() is not None:  # a sweep worker, not the sweep checking its students
                child = subprocess.Popen(["sleep", "600"])
                with open({str(children)!r}, "a") as f:
                    f.write(f"{{child.pid}}\\n")
            return resolve_model("mlp-64", num_classes=num_classes, input_shape=(8,))
    """))
    sweep = _sweep_file(tmp_path, cache, epochs=6, students=[f"{factory}:build"], alphas=[0.5])
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", str(sweep), "--jobs", "2"], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_as_in_the_foreground)
    return process, sweep, children


def _as_in_the_foreground() -> None:
    """SIGINT as a sweep started from a terminal gets it: a shell starts background jobs with
    SIGINT ignored, and a test suite run in the background (CI's `.ci/run &`) would hand that on,
    so that the sweep could not be interrupted at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _started_runs(folder: Path) -> set[str]:
    return {path.parent.name for path in folder.glob("*/config.json")}


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` now, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    """The processes of `pids` still running (a zombie has stopped: only its exit status is left)."""
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except (OSError, IndexError):
            continue
    return running


def _wait_for(condition, what: str, seconds: float = 1800) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_in(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()} if path.is_file() else set()


def test_a_killed_sweep_takes_every_process_it_started_with_it(tmp_path, cache_path):
    """SIGKILL of `sweep --jobs 2` once both workers are in a run: its workers and their own
    children die with it, and none of its queued runs starts afterwards."""
    process, _, children = _start_sweep_with_grandchildren(tmp_path, cache_path)
    folder, tree = tmp_path / "sweep", set()
    try:
        _wait_for(lambda: len(_started_runs(folder)) == 2 or process.poll() is not None, "both workers to start a run")
        tree = _descendants(process.pid)
        assert process.poll() is None and len(_pids_in(children)) == 2 and _pids_in(children) <= tree
        process.kill()
        started = _started_runs(folder)
        process.wait(timeout=1800)
        _wait_for(lambda: not _alive(tree), "the processes of the killed sweep to end", seconds=1800)
        assert _started_runs(folder) == started
    finally:
        process.kill()
        _kill_all(tree | _pids_in(children))


@pytest.mark.parametrize("signum, code, message", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_sweep_stops_its_runs_and_starts_no_queued_one(tmp_path, cache_path, caplog, signum, code, message):
    """SIGINT or SIGTERM to the sweep's process alone (not its process group): it stops its
    workers and their children, starts no queued run, exits 130 or 143 with one line; the same
    command then does what is left, resuming the stopped runs from their checkpoints."""
    process, sweep, children = _start_sweep_with_grandchildren(tmp_path, cache_path)
    folder, tree = tmp_path / "sweep", set()
    try:
        _wait_for(lambda: (len(_started_runs(folder)) == 2 and any(folder.glob("*/checkpoint.pt"))) or process.poll() is not None,
                  "both workers to be in a run, one past a checkpoint")
        tree = _descendants(process.pid)
        assert process.poll() is None and _pids_in(children) <= tree
        signalled = time.time()
        os.kill(process.pid, signum)
        started = _started_runs(folder)
        assert process.wait(timeout=1800) == code
        assert _started_runs(folder) == started
        _wait_for(lambda: not _alive(tree), "the processes of the interrupted sweep to end", seconds=1800)
    finally:
        process.kill()
        _kill_all(tree | _pids_in(children))
    errors = [line for line in (tmp_path / "stderr.txt").read_text().splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"]
    # A run may have finished just before the signal (a quick one, on a quiet machine); none after it.
    finished = {path.parent.name for path in folder.glob("*/summary.json") if path.stat().st_mtime > signalled}
    stopped = {path.parent.name for path in folder.glob("*/checkpoint.pt")} - {p.parent.name for p in folder.glob("*/summary.json")}
    assert stopped and not finished
    # One process does the rest: this one, through the CLI (no worker, so the student's factory starts no child).
    board = invoke_json("sweep", sweep)
    assert board["failures"] == {} and len(board["runs"]) == 4
    for name in stopped:
        assert f"resuming {folder / name} after epoch" in caplog.text


def test_a_run_folder_has_one_writer_at_a_time(tmp_path, cache_path):
    """A second train-student in the folder of a live run stops at once (exit 5, naming the
    holder); once the first is killed, the same command resumes the run."""
    out, factory = tmp_path / "run", tmp_path / "stalling_student.py"
    # In the first run (STALL set) the student stalls at its first training step until killed:
    # that run is surely live while the second one starts.
    factory.write_text(textwrap.dedent("""
        import os, time
        from pipeline.models import resolve_model

        def build(num_classes):
            model = resolve_model("mlp-64", num_classes=num_classes, input_shape=(8,))

            def stall(module, inputs):
                while module.training and os.environ.get("STALL"):
                    time.sleep(0.05)

            model.register_forward_pre_hook(stall)
            return model
    """))

    args = ("train-student", "--cache", cache_path, "--student", f"{factory}:build", "--epochs", "2", "--out", out, "--device", "cpu")
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "STALL": "1"})
    try:
        _wait_for(lambda: (out / "config.json").is_file() or first.poll() is not None, "the first run to start")
        # The second command and the resumed one run in this process (STALL unset: its student never stalls).
        code, _, err = invoke(*args, "--resume")
        assert first.poll() is None
        assert code == 5, err
        assert err.strip().splitlines()[-1] == \
            f"error: run folder {out.resolve()} is being written by another process (pid {first.pid}); wait for it to finish"
    finally:
        first.kill()
        first.wait()
    invoke_json(*args, "--resume")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_concurrent_students_on_one_cache_match_sequential_ones(tmp_path, cache_path):
    """Readers take no lock: three train-student processes on one cache at once, all of one seed (so
    that they read the same chunks at the same moments), all succeed and each gives what the same
    run gives alone."""
    def command(name):
        return [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache_path), "--student", "mlp-64",
                "--epochs", "3", "--seed", "1", "--out", str(tmp_path / name), "--device", "cpu", "--json"]

    def metrics(name):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run(command("alone"), capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    running = [subprocess.Popen(command(f"par{s}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
               for s in "012"]
    parallel = [(p.communicate(timeout=1800), p.returncode) for p in running]
    assert alone.returncode == 0 and all(code == 0 for _, code in parallel), (alone.stderr, [err for (_, err), _ in parallel])
    assert len(metrics("alone")) == 3
    for s in "012":
        assert metrics(f"par{s}") == metrics("alone")


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
