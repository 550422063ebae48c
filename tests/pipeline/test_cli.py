"""The CLI as a user drives it: the whole pipeline on tiny data, and one-line errors."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline.jobs
from pipeline.cli import _strict_json
from pipeline.datasets import resolve_dataset
from pipeline.specs import slug
from tests.conftest import DATASET, SLOW_STUDENT, invoke, invoke_json
from tests.stages.test_crash_safety import CHUNK, ROWS, _cache_args, _pipeline, _wait_for, slow_teacher  # noqa: F401 (a fixture)

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


def test_language_model_end_to_end_with_a_topk_token_cache(tmp_path):
    """The byte-level LM path as a user runs it: teacher, top-k token cache, inspect, verify, student."""
    data, teacher_spec = "stdlib-bytes:seq=16,train=3000,test=600", "bytelm:dim=16,layers=1,heads=2"
    teacher = invoke_json("train-teacher", "--model", teacher_spec, "--dataset", data, "--epochs", "1", "--batch-size", "32",
                          "--out", tmp_path / "lm.safetensors")
    assert teacher["test_tokens"] == sum(resolve_dataset(data).split("test").lengths)
    cache = invoke_json("cache-teacher", "--teacher", teacher_spec, "--teacher-weights", teacher["weights"], "--dataset", data,
                        "--temperature", "1", "--format", "topk", "--top-k", "8")
    assert Path(cache["cache"]).name == "bytelm-dim-16-layers-1-heads-2-stdlib-bytes-seq-16-train-3000-test-600-train-T1-top8.zarr"
    report = invoke_json("inspect", cache["cache"])
    assert report["kind"] == "topk" and report["top_k"] == 8 and report["row_shape"] == [16, 8]
    assert report["num_tokens"] == sum(resolve_dataset(data).split("train").lengths)
    assert report["soft_label_bytes_per_token"] >= 8 * 3 + 4 and 0 < report["tail_mass"]["mean"] < 1
    verified = invoke_json("verify", cache["cache"], "--teacher", teacher_spec, "--teacher-weights", teacher["weights"])
    assert verified["ok"] and verified["max_abs_diff"] < 1e-2
    student = invoke_json("train-student", "--cache", cache["cache"], "--student", "bytelm:dim=8,layers=1,heads=1",
                          "--epochs", "3", "--batch-size", "16", "--out", tmp_path / "s")
    assert student["mode"] == "distilled" and student["test_tokens"] == teacher["test_tokens"]
    epochs = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["train_kd"] < epochs[0]["train_kd"] and epochs[-1]["test_nll"] < epochs[0]["test_nll"]


def test_default_paths_go_under_the_data_root(tmp_path, teacher_weights):
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET)
    assert Path(cache["cache"]) == tmp_path / "data" / "caches" / "mlp-64-synthetic-n-600-test-200-features-8-classes-4-seed-3-train-T4.zarr"
    run = invoke_json("train-student", "--cache", cache["cache"], "--student", "mlp-64", "--epochs", "1")
    stem = "mlp-64-synthetic-n-600-test-200-features-8-classes-4-seed-3-train-T4"
    assert Path(run["run_dir"]) == tmp_path / "data" / "runs" / f"mlp-64-kd-{stem}-a0.9-T4-s0"


def test_default_run_folders_of_other_caches_options_or_datasets_never_collide(tmp_path, cache_path):
    """The sequence of docs/commands.md: a student from one cache, then the same student from a view cache
    (it used to land in the first run's folder and fail)."""
    views = tmp_path / "cnn-v8.zarr"
    shutil.copytree(cache_path, views)
    runs = [invoke_json("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", *options)["run_dir"]
            for cache, options in ((cache_path, ()), (views, ()), (views, ("--alpha", "0.5")), (views, ("--temperature", "2")))]
    runs.append(invoke_json("train-student", "--dataset", DATASET, "--student", "mlp-64", "--epochs", "1")["run_dir"])
    assert [Path(r).name for r in runs] == ["mlp-64-kd-cache-a0.9-T3-s0", "mlp-64-kd-cnn-v8-a0.9-T3-s0", "mlp-64-kd-cnn-v8-a0.5-T3-s0",
                                            "mlp-64-kd-cnn-v8-a0.9-T2-s0", f"mlp-64-scratch-{slug(DATASET)}-s0"]


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


def test_errors_from_a_real_process_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train-student", "--cache", str(tmp_path / "none.zarr"), "--student", "mlp-64"],
        capture_output=True, text=True, cwd=REPO, timeout=1800,
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


def test_unlabeled_transfer_set_is_distilled_with_alpha_one(tmp_path, teacher_weights):
    source = resolve_dataset(DATASET)
    train, test = source.split("train"), source.split("test")
    np.savez(tmp_path / "transfer.npz", x_train=train.inputs(np.arange(600)).numpy(),
             x_test=test.inputs(np.arange(200)).numpy(), y_test=test.labels)
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                        "--dataset", tmp_path / "transfer.npz", "--num-classes", "4", "--out", tmp_path / "c.zarr")
    assert cache["teacher_accuracy"] is None and cache["num_classes"] == 4
    code, _, err = invoke("train-student", "--cache", cache["cache"], "--student", "mlp-64", "--out", tmp_path / "r0")
    assert code == 2 and "--alpha 1" in err
    run = invoke_json("train-student", "--cache", cache["cache"], "--student", "mlp-64", "--alpha", "1",
                      "--epochs", "10", "--out", tmp_path / "r1")
    assert run["test_accuracy"] > 0.5


def test_train_teacher_writes_the_format_its_suffix_names(tmp_path):
    run = invoke_json("train-teacher", "--model", "mlp-64", "--dataset", DATASET, "--epochs", "1", "--out", tmp_path / "t.pt")
    assert Path(run["run_dir"]) == tmp_path / "t.run"
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", tmp_path / "t.pt",
                        "--dataset", DATASET, "--out", tmp_path / "c.zarr")
    assert cache["num_samples"] == 600


def test_json_output_is_strict():
    assert json.dumps(_strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": Path("/x")}), allow_nan=False) == \
        '{"a": null, "b": [null, 1.5], "c": "/x"}'


def test_file_specs_are_recorded_with_absolute_paths(tmp_path, monkeypatch, teacher_weights):
    np.savez(tmp_path / "rel.npz", **{"x_train": np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32),
                                      "y_train": np.arange(50) % 4})
    monkeypatch.chdir(tmp_path)
    cache = invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                        "--dataset", "rel.npz", "--out", "c.zarr")
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["dataset"]["spec"] == str(tmp_path / "rel.npz")
    assert cache["num_samples"] == 50


BAD_NUMBERS = [
    ("train-student", "--weight-decay", "-1"), ("train-student", "--weight-decay", "nan"), ("train-student", "--temperature", "1e200"),
    ("train-student", "--batch-size", str(2**70)), ("train-student", "--seed", str(2**32)), ("train-student", "--lr", "inf"),
    ("train-student", "--feature-weight", "nan"), ("cache-teacher", "--num-classes", "-4"), ("cache-teacher", "--num-classes", "0"),
    ("cache-teacher", "--temperature", "1e200"), ("cache-teacher", "--batch-size", str(2**70)), ("cache-teacher", "--view-seed", "-1"),
    ("cache-teacher", "--chunk-rows", str(2**40)), ("cache-teacher", "--shard-rows", "-1"),
]


@pytest.mark.parametrize("command, option, value", BAD_NUMBERS)
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, command, option, value):
    model = ("--student", "mlp-64") if command == "train-student" else ("--teacher", "mlp-64")
    code, _, err = invoke(command, *model, "--dataset", DATASET, "--out", tmp_path / "out", option, value)
    assert code == 2 and err.startswith(f"error: {option} must be") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the data root


def test_a_sweep_refuses_a_bad_number_in_its_train_table(tmp_path, cache_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'cache = "{cache_path}"\nstudents = ["mlp-64"]\nseeds = [0]\n[train]\nweight-decay = nan\n')
    code, _, err = invoke("sweep", sweep)
    assert code == 2 and err == "error: --weight-decay must be a finite number, 0.0 or more, got nan\n"
    assert not (tmp_path / "data" / "sweeps").exists()


@pytest.mark.parametrize("text, message", [
    ('batch-size = 64\nbatch_size = 32\n', "batch-size and batch_size are the same option; give it once"),
    ('storage-option = "endpoint_url=http://localhost:9000"\n', 'storage-option must be a list of "KEY=VALUE" strings or a table'),
])
def test_ambiguous_or_mistyped_config_file_entries_are_one_line_errors(tmp_path, text, message):
    config = tmp_path / "student.toml"
    config.write_text(f'student = "mlp-64"\ndataset = "{DATASET}"\n{text}')
    code, _, err = invoke("train-student", "--config", config, "--out", tmp_path / "r")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_sigterm_is_an_interrupt_one_line_exit_143_and_the_same_command_resumes(slow_teacher):  # noqa: F811 - the fixture imported above
    spec, _, tmp = slow_teacher
    args = _cache_args(spec, tmp / "c.zarr")
    with _pipeline(*args) as proc:
        _wait_for(lambda: any((tmp / "c.zarr").glob("chunk_done/c/*")), proc)  # a chunk is written
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 143 and err.splitlines()[-1] == "error: terminated" and "Traceback" not in err, err
    done = int(zarr.open_group(str(tmp / "c.zarr"), mode="r")["chunk_done"][:].sum())
    assert 1 <= done < ROWS // CHUNK
    rerun = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["chunks_computed"] == ROWS // CHUNK - done


def test_a_teacher_at_chance_is_a_warning_in_the_output(tmp_path, teacher_weights):
    (tmp_path / "blank.py").write_text(textwrap.dedent("""
        import torch

        def build(num_classes):  # all-zero logits: always class 0, a quarter of the 4 balanced classes
            model = torch.nn.Linear(8, num_classes)
            torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
            return model
    """))
    code, _, err = invoke("cache-teacher", "--teacher", f"{tmp_path / 'blank.py'}:build", "--dataset", DATASET, "--out", tmp_path / "c.zarr")
    assert code == 0 and "warning: the teacher's accuracy on the cached split is 0.2" in err and "no --teacher-weights" in err, err
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--out", tmp_path / "trained.zarr")
    assert code == 0 and "warning: the teacher's accuracy" not in err


def test_piped_tables_keep_every_value_whole(tmp_path, cache_path):
    """Piped, rich used to assume 80 columns and fold cells: a cache path came out cut in two."""
    cache = tmp_path / ("a-folder-with-a-long-name-" * 4) / "cache.zarr"
    shutil.copytree(cache_path, cache)
    png = cache.parent / "plots.png"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(cache), "--png", str(png)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800, env={**os.environ, "COLUMNS": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(f"cache {cache}" in line for line in lines), proc.stdout  # the title
    assert any(line.startswith("│ png ") and str(png) in line for line in lines), proc.stdout  # a row's value
    assert any(line.startswith("│ temperature ") and "3.0000" in line for line in lines), proc.stdout


def _in_terminal(args, *, columns: int = 160, rows: int = 60, stop_when=None, timeout: float = 1800):
    """Run `pipeline ARGS` on a pseudo-terminal and read its screen as a terminal shows it (pyte
    emulates one). Returns the exit code, the final screen's lines, and every distinct line
    that showed the progress bar; `stop_when(lines)` sends SIGTERM once it holds."""
    pyte = pytest.importorskip("pyte")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")} | {"TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                            cwd=REPO, env=env, start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(columns, rows)
    stream, bars, deadline = pyte.ByteStream(screen), [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                stream.feed(data)
                bars += [line.rstrip() for line in screen.display if "training (steps)" in line and line.rstrip() not in bars]
                if stop_when is not None and proc.poll() is None and stop_when(screen.display):
                    proc.send_signal(signal.SIGTERM)
                    stop_when = None
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=1800)
    finally:
        proc.kill()
        os.close(master)
    return code, [line.rstrip() for line in screen.display], bars


def test_on_a_terminal_log_lines_and_the_progress_bar_share_the_screen_cleanly(tmp_path):
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_STUDENT))
    code, screen, bars = _in_terminal(["train-student", "--student", f"{tmp_path / 'slow.py'}:build", "--dataset", DATASET,
                                       "--epochs", "3", "--batch-size", "64", "--out", tmp_path / "run"])
    assert code == 0, "\n".join(screen)
    assert bars and all("elapsed" in bar and "remaining" in bar for bar in bars), bars  # labelled time columns
    _assert_total_known_and_elapsed_never_resets(bars)
    for epoch in (1, 2, 3):  # each epoch's log line whole, on its own line
        lines = [line for line in screen if f"epoch {epoch}/3 " in line]
        assert len(lines) == 1 and "━" not in lines[0], screen
    assert not any("training (steps)" in line or "━" in line for line in screen), screen  # no stale bar left
    assert any("test_errors" in line for line in screen)  # the table


def test_a_resumed_run_s_bar_starts_at_the_steps_already_done(tmp_path):
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_STUDENT))
    args = ["train-student", "--student", f"{tmp_path / 'slow.py'}:build", "--dataset", DATASET, "--epochs", "4",
            "--batch-size", "64", "--out", tmp_path / "run"]
    code, _, _ = _in_terminal(args, stop_when=lambda _: any("epoch 2/4" in line for line in _))
    assert code == 143
    code, screen, bars = _in_terminal([*args, "--resume"])
    assert code == 0, "\n".join(screen)
    first = next(bar for bar in bars if "%" in bar)
    assert int(first.split("%")[0].split()[-1]) >= 50, bars
    _assert_total_known_and_elapsed_never_resets(bars)


def _assert_total_known_and_elapsed_never_resets(bars: list[str]) -> None:
    """Every bar drawn shows the run's total steps (a new user saw `0/? ... remaining` while the run
    started), and the time elapsed only grows (it went back to 0:00:00 when the total came)."""
    totals = {match.group(1) if (match := re.search(r"\b\d+/(\S+)", bar)) else None for bar in bars}
    assert len(totals) == 1 and next(iter(totals)).isdigit(), bars
    elapsed = [tuple(map(int, re.search(r"elapsed (\d+):(\d\d):(\d\d)", bar).groups())) for bar in bars]
    assert elapsed == sorted(elapsed), bars


def test_the_cli_starts_without_loading_heavy_modules():
    """`pipeline --help` and `--version` took 3 s when the CLI imported torch and friends at start."""
    heavy = ("torch", "numpy", "zarr", "dask", "distributed", "matplotlib", "transformers", "s3fs")
    code = f"import sys, pipeline.cli; print(sorted(set({heavy!r}) & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    version = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert version.returncode == 0 and version.stdout.startswith("pipeline ")


def test_train_teacher_offers_resume_for_an_interrupted_run_and_resumes_it(tmp_path):
    """The run folder beside the weights holds an unfinished run (as a kill after the last
    checkpoint leaves it: no summary, no weights): the error names --resume, a flag train-teacher
    has, and --resume finishes the run."""
    args = ("train-teacher", "--model", "mlp-64", "--dataset", DATASET, "--epochs", "2", "--device", "cpu",
            "--out", tmp_path / "t.safetensors")
    assert invoke(*args)[0] == 0
    (tmp_path / "t.safetensors").unlink()
    (tmp_path / "t.run" / "summary.json").unlink()
    code, _, err = invoke(*args)
    assert code == 2 and "pass --resume to continue it" in err, err
    code, _, err = invoke(*args, "--resume")
    assert code == 0 and (tmp_path / "t.safetensors").is_file(), err
