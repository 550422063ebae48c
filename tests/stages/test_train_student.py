"""Stage two: training from a cache, the baseline, and refusing caches that do not fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.datasets import resolve_dataset
from pipeline.jobs import run_caching
from pipeline.models import resolve_model
from stages import train_student
from stages.cache_teacher import CacheTeacherConfig
from stages.errors import CacheMismatchError, InputError, PipelineError
from tests.conftest import DATASET, SLOW_STUDENT, TEMPERATURE

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, cache, model=None, dataset=DATASET, name="run", **overrides):
    data = resolve_dataset(dataset)
    model = model or resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    options = {"epochs": 3, "batch_size": 32, "device": "cpu", **overrides}
    config = train_student.TrainConfig(model="mlp-64", dataset=dataset, out=tmp_path / name, cache=cache, **options)
    return train_student.run(config, model, data.split("train"), data.split("test"))


def test_distilled_run_writes_a_complete_run_folder(tmp_path, cache_path):
    result = _train(tmp_path, cache_path, alpha=0.8)
    assert result.mode == "distilled" and result.test_samples == 200
    assert sorted(p.name for p in result.run_dir.iterdir()) == [
        "checkpoint.pt", "config.json", "memory.jsonl", "metrics.jsonl", "model.safetensors", "summary.json"]
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert {"train_loss", "train_ce", "train_kd", "test_accuracy", "test_errors", "test_nll"} <= set(lines[0])
    assert lines[-1]["train_kd"] < lines[0]["train_kd"]  # it learns the teacher
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["temperature"] == TEMPERATURE  # defaulted to the cache's T
    assert config["cache_provenance"]["teachers"][0]["spec"] == "mlp-64"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["test_errors"] == lines[-1]["test_errors"] == result.test_errors


def test_student_learns_to_agree_with_the_teacher(tmp_path, cache_path, teacher_weights):
    """With alpha=1 the student only sees soft labels; it must end up agreeing with the teacher."""
    result = _train(tmp_path, cache_path, alpha=1.0, epochs=15, lr=3e-3)
    data = resolve_dataset(DATASET).split("test")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights).eval()
    student = resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=result.weights).eval()
    with torch.no_grad():
        x = data.inputs(np.arange(len(data)))
        agreement = (teacher(x).argmax(1) == student(x).argmax(1)).float().mean()
    assert agreement > 0.9


def test_retempered_run_records_its_temperature(tmp_path, cache_path):
    result = _train(tmp_path, cache_path, temperature=1.5)
    assert json.loads((result.run_dir / "config.json").read_text())["temperature"] == 1.5


def test_baseline_trains_on_hard_labels(tmp_path):
    result = _train(tmp_path, None, epochs=10)
    assert result.mode == "scratch" and result.test_accuracy > 0.5  # 4 classes: chance is 0.25


def test_same_seed_same_result(tmp_path, cache_path):
    a = _train(tmp_path, cache_path, name="a", seed=3, model=_seeded_model(3))
    b = _train(tmp_path, cache_path, name="b", seed=3, model=_seeded_model(3))
    assert (a.run_dir / "metrics.jsonl").read_text().split('"seconds"')[0] == (b.run_dir / "metrics.jsonl").read_text().split('"seconds"')[0]
    assert a.test_nll == b.test_nll


def _seeded_model(seed):
    torch.manual_seed(seed)
    return resolve_model("mlp-64", num_classes=4, input_shape=(8,))


def test_class_count_mismatch_is_refused(tmp_path, cache_path):
    five = resolve_model("mlp-64", num_classes=5, input_shape=(8,))
    with pytest.raises(CacheMismatchError, match="5 classes but the cache has 4"):
        _train(tmp_path, cache_path, model=five)


def test_cache_of_another_dataset_is_refused(tmp_path, cache_path):
    other = "synthetic:n=600,test=200,features=8,classes=4,seed=4"  # same shape, other data
    with pytest.raises(CacheMismatchError, match="does not match the cache"):
        _train(tmp_path, cache_path, dataset=other)


def test_cache_of_another_split_is_refused(tmp_path, cache_path):
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path, device="cpu")
    with pytest.raises(CacheMismatchError, match="num_samples"):
        train_student.run(config, resolve_model("mlp-64", num_classes=4, input_shape=(8,)), data.split("test"), None)


def test_existing_run_folder_needs_overwrite(tmp_path, cache_path):
    _train(tmp_path, cache_path, epochs=1)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(InputError, match="`overwrite`"):
        _train(tmp_path, cache_path, epochs=1)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    _train(tmp_path, cache_path, epochs=1, overwrite=True)


@pytest.mark.parametrize(("bad", "words"), [
    ({"alpha": 1.5}, ("`alpha`", "got 1.5")), ({"temperature": 0.0}, ("`temperature`", "got 0.0")),
    ({"temperature": -2.0}, ("`temperature`", "got -2.0")), ({"epochs": 0}, ("`epochs`", "got 0")), ({"lr": 0.0}, ("`lr`", "got 0.0")),
    ({"augment": "warp"}, ("augment spec 'warp'",)),
])
def test_invalid_options_are_input_errors(tmp_path, cache_path, bad, words):
    """Each bad value is exit code 2, with a message naming the option and the value."""
    with pytest.raises(InputError) as error:
        _train(tmp_path, cache_path, **bad)
    assert error.value.exit_code == 2 and all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_teacher_is_never_imported_or_loaded(tmp_path):
    """Cache a user-file teacher, then booby-trap its code and weights: train-student, in a
    fresh process, must neither import the file nor read the weights, and still succeed."""
    teacher_file = tmp_path / "my_teacher.py"
    teacher_file.write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes):
            return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, num_classes))
    """))
    weights = tmp_path / "teacher.safetensors"
    from stages.weights import save_weights
    save_weights(resolve_model(f"{teacher_file}:build", num_classes=4, input_shape=(8,)), weights)
    cache = run_caching(CacheTeacherConfig(
        teacher=f"{teacher_file}:build", teacher_weights=weights, dataset=DATASET, out=tmp_path / "c.zarr", chunk_rows=64, device="cpu",
    )).cache

    marker = tmp_path / "teacher-was-imported"
    teacher_file.write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('teacher imported')\n")
    weights.write_bytes(b"not weights")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['pipeline', 'train-student', '--cache', sys.argv[1], '--student', 'mlp-64', '--epochs', '1',"
        " '--out', sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "else:\n    code = 0\n"
        "assert not any('my_teacher' in m for m in sys.modules), 'teacher module imported'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(cache), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test_samples"] == 200
    assert not marker.exists()


def test_batchnorm_student_never_gets_a_one_row_batch(tmp_path, cache_path):
    """600 rows in batches of 599 would leave a 1-row batch, which BatchNorm cannot train on."""
    bn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    result = _train(tmp_path, cache_path, model=bn, batch_size=599, epochs=2)
    assert result.test_samples == 200
    result = _train(tmp_path, None, model=bn, batch_size=599, epochs=1, name="scratch")
    assert result.mode == "scratch"


def test_progress_is_reported_up_to_the_total(tmp_path, cache_path):
    calls = []
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "p", cache=cache_path,
                                       epochs=2, batch_size=64, device="cpu")
    train_student.run(config, resolve_model("mlp-64", num_classes=4, input_shape=(8,)), data.split("train"), None,
                      progress=lambda done, total: calls.append((done, total)))
    # the total first, before any step (a progress bar shows it from the start), then every step
    assert [done for done, _ in calls] == list(range(19)) and {total for _, total in calls} == {18}  # 600 rows / 64


class _NumpySplit:
    """A user's own split whose inputs() returns numpy rather than a tensor."""

    name, num_classes = "train", 4

    def __init__(self, split):
        self._split = split

    def __len__(self):
        return len(self._split)

    def inputs(self, index):
        return self._split.inputs(index).numpy()

    @property
    def labels(self):
        return self._split.labels


@pytest.mark.parametrize("cached", [True, False])
def test_a_split_whose_inputs_are_numpy_is_named_as_such(tmp_path, cache_path, cached):
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path if cached else None,
                                       epochs=1, device="cpu")
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        train_student.run(config, model, _NumpySplit(data.split("train")), None)
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        train_student.run(replace(config, overwrite=True), model, data.split("train"), _NumpySplit(data.split("test")))


def test_caching_a_split_whose_inputs_are_numpy_is_refused(tmp_path):
    from stages import cache_teacher

    config = CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "c.zarr", device="cpu")
    teacher = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    with pytest.raises(InputError, match=r"^Split.inputs must return a torch.Tensor, got numpy.ndarray"):
        cache_teacher.run(config, teacher, _NumpySplit(resolve_dataset(DATASET).split("train")))


class _PidRecordingItems(torch.utils.data.Dataset):
    """Items of a real split that note, in a folder, the process that loaded each one."""

    def __init__(self, split, folder: Path):
        self.split, self.folder = split, folder

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        (self.folder / str(os.getpid())).touch()
        return self.split.inputs(np.array([i]))[0], int(self.split.labels[i])


@pytest.mark.parametrize("stage", ["cache-teacher", "train-student"])
def test_loader_workers_load_the_items_in_worker_processes(tmp_path, cache_path, stage):
    from stages import cache_teacher
    from stages.data import TorchDatasetSplit

    loaded_by = tmp_path / "pids"
    loaded_by.mkdir()
    split = TorchDatasetSplit("train", _PidRecordingItems(resolve_dataset(DATASET).split("train"), loaded_by))
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,))
    if stage == "cache-teacher":
        config = CacheTeacherConfig(teacher="mlp-64", dataset=DATASET, out=tmp_path / "c.zarr", chunk_rows=64, device="cpu", loader_workers=2)
        cache_teacher.run(config, model, split)
    else:
        config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "r", cache=cache_path, epochs=1,
                                           device="cpu", loader_workers=2)
        train_student.run(config, model, split, None)
    workers = {int(p.name) for p in loaded_by.iterdir()} - {os.getpid()}
    assert len(workers) == 2  # the DataLoader's two worker processes loaded items (the main one checks a few)


def _steps_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_learning_rate_follows_warmup_then_the_schedule_at_every_step(tmp_path, cache_path, schedule):
    """25 steps over 3 epochs (9 batches of 64 an epoch, then 7): each step's lr is lr times the
    hand formula, (s + 1) / (warmup + 1) during warmup, then the decay over the remaining 20
    steps; the epoch boundaries do not show."""
    result = _train(tmp_path, cache_path, max_steps=25, warmup_steps=5, schedule=schedule, lr=0.01, batch_size=64,
                    log_every_steps=1)
    lrs = [line["lr"] for line in _steps_log(result.run_dir)]
    warmup = [0.01 * (s + 1) / 6 for s in range(5)]
    progress = [(s - 5) / 20 for s in range(5, 25)]
    decay = {"cosine": [0.01 * 0.5 * (1 + np.cos(np.pi * p)) for p in progress],
             "linear": [0.01 * (1 - p) for p in progress], "constant": [0.01] * 20}[schedule]
    np.testing.assert_allclose(lrs, warmup + decay, rtol=1e-12)
    assert [line["step"] for line in _steps_log(result.run_dir)] == list(range(1, 26))
    assert [json.loads(line)["epoch"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_max_steps_overrides_epochs_and_counts_progress_in_steps(tmp_path, cache_path):
    calls = []
    data = resolve_dataset(DATASET)
    config = train_student.TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "p", cache=cache_path, epochs=1,
                                       max_steps=7, accumulate=2, batch_size=64, device="cpu")
    train_student.run(config, resolve_model("mlp-64", num_classes=4, input_shape=(8,)), data.split("train"), None,
                      progress=lambda done, total: calls.append((done, total)))
    # 9 batches of 64 an epoch: 5 steps (the last of one batch), then 2 of the second epoch
    assert calls == [(step, 7) for step in range(8)]
    assert len((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("cached", [True, False])
def test_accumulating_two_micro_batches_is_one_step_on_both(tmp_path, cache_path, cached):
    """The loss averages over rows, so 2 accumulated micro-batches of 32 are one batch of 64:
    the same rows in the same order (8 full batches of 64 an epoch), the same gradients (their
    norm is logged, unclipped) and the same weights, to float tolerance."""
    common = {"max_steps": 8, "max_grad_norm": 1e9, "log_every_steps": 1, "lr": 0.01}
    two = _train(tmp_path, cache_path if cached else None, name="two", model=_seeded_model(1), batch_size=32, accumulate=2, **common)
    one = _train(tmp_path, cache_path if cached else None, name="one", model=_seeded_model(1), batch_size=64, **common)
    for a, b in zip(_steps_log(two.run_dir), _steps_log(one.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = (load_file(r.weights) for r in (two, one))
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    assert any(not torch.equal(a[name], _seeded_model(1).state_dict()[name]) for name in a)  # it trained


def test_resume_without_a_checkpoint_says_so_and_starts_from_the_beginning(tmp_path, cache_path, caplog):
    with caplog.at_level("WARNING", logger="stages.train_student"):
        resumed = _train(tmp_path, cache_path, name="fresh", epochs=2, resume=True, model=_seeded_model(2))
    assert "--resume: no checkpoint in" in caplog.text and "training from the start" in caplog.text
    plain = _train(tmp_path, cache_path, name="plain", epochs=2, model=_seeded_model(2))
    assert load_file(resumed.weights)["1.weight"].equal(load_file(plain.weights)["1.weight"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="stages.train_student"):
        _train(tmp_path, cache_path, name="plain", epochs=2, resume=True)  # finished: nothing to say
    assert "no checkpoint" not in caplog.text


def test_adamw_decays_the_weights_apart_from_the_gradient(tmp_path):
    """Decoupled weight decay: with lr 1e-3 and weight decay 100, AdamW shrinks each weight by a
    factor (1 - lr x wd) per step on top of its Adam step; Adam's coupled decay (a gradient term,
    normalised away by Adam's scaling) would shrink it far less."""
    model = _seeded_model(4)
    before = model[1].weight.detach().clone()
    result = _train(tmp_path, None, model=model, max_steps=1, lr=1e-3, weight_decay=100.0, schedule="constant", batch_size=600)
    after = load_file(result.weights)["1.weight"]
    # one step: w - lr * wd * w - lr * adam_step, with |adam_step| <= ~1 per weight
    shrunk = before * (1 - 1e-3 * 100.0)
    assert torch.all((after - shrunk).abs() <= 1e-3 * 1.01)
    assert after.abs().mean() < 0.95 * before.abs().mean()


def test_the_student_trains_under_bf16_autocast_on_the_cpu(tmp_path, cache_path):
    full = _train(tmp_path, cache_path, name="fp32", model=_seeded_model(5), max_steps=20, log_every_steps=5)
    half = _train(tmp_path, cache_path, name="bf16", model=_seeded_model(5), max_steps=20, log_every_steps=5, amp="bf16")
    losses = [line["loss"] for line in _steps_log(half.run_dir)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # bf16 keeps about 3 significant digits: close to the float32 run, and not equal to it
    reference = [line["loss"] for line in _steps_log(full.run_dir)]
    assert losses != reference and np.allclose(losses, reference, rtol=0.05)
    with pytest.raises(InputError, match="`amp` fp16 needs a CUDA device"):
        _train(tmp_path, cache_path, name="fp16", amp="fp16", device="cpu")


@pytest.mark.parametrize(("bad", "words"), [
    ({"schedule": "step"}, ("`schedule`", "cosine, linear, constant")), ({"amp": "fp8"}, ("`amp`", "'fp8'")),
    ({"max_steps": 0}, ("`max_steps`", "got 0")), ({"accumulate": 0}, ("`accumulate`", "got 0")),
    ({"max_steps": 5, "warmup_steps": 6}, ("`warmup_steps` 6 exceeds `max_steps` 5",)),
    ({"max_grad_norm": -1.0}, ("`max_grad_norm`", "got -1.0")),
])
def test_invalid_step_options_are_input_errors(tmp_path, cache_path, bad, words):
    with pytest.raises(InputError) as error:
        _train(tmp_path, cache_path, **bad)
    assert all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_an_older_version_is_still_the_same_run_but_its_epoch_checkpoint_is_refused(tmp_path, cache_path):
    """A config.json without the step options reads them as their defaults (a finished run is
    reused as before); a checkpoint without a step position cannot be resumed exactly: one line."""
    _train(tmp_path, cache_path, epochs=2)
    record = tmp_path / "run" / "config.json"
    stored = json.loads(record.read_text())
    for name in ("max_steps", "accumulate", "warmup_steps", "schedule", "max_grad_norm", "amp", "checkpoint_every_steps",
                 "log_every_steps", "hf_out"):
        del stored[name]
    record.write_text(json.dumps(stored))
    assert _train(tmp_path, cache_path, epochs=2, resume=True).test_samples == 200
    (tmp_path / "run" / "summary.json").unlink()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save({"epoch": 1, "model": state["model"], "optimizer": state["optimizer"], "schedule": state["schedule"],
                "torch_rng": torch.get_rng_state()}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(PipelineError, match="of an older version of the tool"):
        _train(tmp_path, cache_path, epochs=2, resume=True)


def test_a_resumed_run_s_summary_counts_the_seconds_of_every_part(tmp_path):
    """Killed after two of four epochs' metrics (each epoch checkpointed), then resumed: summary.json's seconds
    count the interrupted part up to its last checkpoint and the resumed part (resumed_seconds),
    not the resumed part only; so they are at least the four epochs' own seconds (metrics.jsonl)."""
    from tests.stages.test_crash_safety import _pipeline, _wait_for

    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_STUDENT))
    run = tmp_path / "run"
    args = ["train-student", "--student", f"{tmp_path / 'slow.py'}:build", "--dataset", DATASET, "--epochs", "4",
            "--batch-size", "32", "--device", "cpu", "--out", run, "--json"]
    metrics = run / "metrics.jsonl"
    with _pipeline(*args) as proc:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.kill()
        proc.wait()
    assert not (run / "summary.json").exists()
    with _pipeline(*args, "--resume") as proc:
        out, err = proc.communicate()
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(out)["seconds"] == summary["seconds"]
    epochs = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
    assert len(epochs) == 4 and summary["seconds"] >= sum(epochs), (summary, epochs)
    # The checkpoint's epochs, done before the kill: at least the first, whose checkpoint is saved before the
    # second epoch's metrics line; the second's may not be (its line is written before its checkpoint).
    kept = int(re.search(r"resuming .* after epoch (\d+)", err).group(1))
    assert kept >= 1 and summary["seconds"] - summary["resumed_seconds"] >= sum(epochs[:kept]), (summary, epochs)
    assert summary["resumed_seconds"] >= sum(epochs[kept:]), (summary, epochs)
