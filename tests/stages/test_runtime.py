"""What both stages share (stages.runtime): choosing the device and the thread count, seeding,
checking that a model fits its data, optional imports, and the collective helpers of a training
run over several processes (two real gloo processes here)."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch import nn

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.data import TensorSplit
from stages.errors import InputError, PipelineError
from stages.runtime import (
    TORCHRUN_VARIABLE, Ranks, agree, autocast, average_over_ranks, check_labels_fit, config_dict, main_only, output_shape,
    process_group, require, resolve_device, seed_everything, torch_threads, training_threads,
)
from stages.train_student import TrainConfig
from tests.conftest import DATASET

CPU = torch.device("cpu")
CORES = len(os.sched_getaffinity(0))


# --- threads --------------------------------------------------------------------------------

@pytest.mark.parametrize("given", [1, 2, 3, 64])
def test_training_threads_leave_one_core_to_the_batch_thread_and_take_no_more_than_torch_was_given(monkeypatch, given):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with torch_threads(given):
        chosen = training_threads(CPU)
    assert chosen == max(1, min(given, CORES - 1))


def test_training_threads_on_a_single_core_are_one_not_zero(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        chosen = training_threads(CPU)
    finally:
        os.sched_setaffinity(0, before)
    assert chosen == 1


@pytest.mark.parametrize("value", ["1", "3", ""])
def test_training_threads_honour_omp_num_threads(monkeypatch, value):
    """Whoever set OMP_NUM_THREADS (a user, a dask nanny, a sweep worker's share) has the last word."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert training_threads(CPU) is None


def test_training_threads_leave_a_gpu_run_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert training_threads(torch.device("cuda", 0)) is None


def test_torch_threads_sets_the_count_and_restores_it_even_on_failure():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="inside"):
        with torch_threads(other):
            raise ValueError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


# --- seeding ------------------------------------------------------------------------------

def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), nn.Linear(4, 2).weight.tolist()


def test_seed_everything_makes_python_numpy_torch_and_model_initialisation_repeat():
    seed_everything(11)
    first = _draws()
    seed_everything(11)
    again = _draws()
    seed_everything(12)
    other = _draws()
    assert first == again
    assert all(a != b for a, b in zip(first, other))  # each of the four streams follows the seed


def test_seed_everything_seeds_each_library_with_the_runs_seed_itself():
    """A run's seed means the same as in any script that seeds the libraries with it (np.random.seed
    is why seeds stop below 2**32)."""
    seed = 2**32 - 1
    seed_everything(seed)
    assert random.random() == random.Random(seed).random()
    assert float(np.random.rand()) == float(np.random.RandomState(seed).rand())
    assert torch.rand(3).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()


# --- devices ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpu", "CUDA", "mps", "cuda0"])
def test_unknown_devices_are_refused_naming_the_choices(name):
    with pytest.raises(InputError, match=f"device must be one of auto, cpu, cuda \\(or cuda:N\\), got '{name}'"):
        resolve_device(name)


def test_cpu_and_auto_devices():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_input_error(name):
    with pytest.raises(InputError, match=f"device '{name}' requested but no CUDA GPU is available"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_devices_with_a_gpu():
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda", 0)


def test_bf16_autocast_runs_the_teachers_matmuls_in_bfloat16_and_none_leaves_float32():
    model = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast("bf16", CPU):
        assert model(x).dtype == torch.bfloat16
    with autocast("none", CPU):
        assert model(x).dtype == torch.float32


# --- configs and models against the data -----------------------------------------------------

def test_config_dict_is_plain_json_with_paths_as_strings(tmp_path):
    config = TrainConfig(model="mlp-64", dataset=DATASET, out=tmp_path / "run", cache=tmp_path / "c.zarr", epochs=3)
    plain = config_dict(config)
    assert plain["out"] == str(tmp_path / "run") and plain["cache"] == str(tmp_path / "c.zarr")
    assert plain["epochs"] == 3 and plain["model_weights"] is None and plain["eval_split"] == "test"
    assert json.loads(json.dumps(plain)) == plain
    assert set(plain) == set(vars(config))


def test_config_dict_turns_paths_inside_lists_into_strings():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Several:
        paths: tuple

    assert config_dict(Several((Path("/a"), Path("/b"), 3))) == {"paths": ["/a", "/b", 3]}


@pytest.fixture(scope="module")
def tiny():
    return resolve_dataset(DATASET).split("train")


def test_output_shape_is_classes_per_sample_or_per_token_with_the_model_in_eval_mode(tiny):
    model = resolve_model("mlp-64", num_classes=4, input_shape=(8,)).train()
    assert output_shape(model, tiny, CPU, "teacher") == (4,) and not model.training
    tokens = TensorSplit("t", torch.zeros(5, 6, dtype=torch.int64), None, 11)
    assert output_shape(nn.Embedding(11, 11), tokens, CPU, "student") == (6, 11)


def test_a_model_that_does_not_fit_the_inputs_is_an_input_error_naming_role_and_inputs(tiny):
    wrong = resolve_model("mlp-64", num_classes=4, input_shape=(5,))
    with pytest.raises(InputError, match=r"the student fails on the dataset's inputs \(\(8,\) float32\): mat1 and mat2"):
        output_shape(wrong, tiny, CPU, "student")


def test_a_model_whose_outputs_are_not_logits_is_an_input_error(tiny):
    with pytest.raises(InputError, match=r"the teacher must return logits of shape .*got \(1, 2, 2, 2\)"):
        output_shape(nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 2, 2))), tiny, CPU, "teacher")


def test_labels_must_name_one_of_the_models_classes(tiny):
    check_labels_fit(tiny, (4,), "teacher")
    with pytest.raises(InputError, match=f"the teacher outputs 3 classes but the dataset has label {int(tiny.labels.max())}"):
        check_labels_fit(tiny, (3,), "teacher")


def test_labels_must_be_one_per_sample_or_one_per_token():
    per_sample = TensorSplit("s", torch.zeros(4, 6, dtype=torch.int64), np.zeros(4, dtype=np.int64), 11)
    with pytest.raises(InputError, match=r"the student needs 6 labels per sample \(one per token\), but the split's labels have shape \(4,\)"):
        check_labels_fit(per_sample, (6, 11), "student")
    per_token = TensorSplit("s", torch.zeros(4, 6, dtype=torch.int64), np.zeros((4, 6), dtype=np.int64), 11)
    check_labels_fit(per_token, (6, 11), "student")
    with pytest.raises(InputError, match="the student needs one label per sample"):
        check_labels_fit(per_token, (11,), "student")
    check_labels_fit(TensorSplit("u", torch.zeros(4, 6), None, None), (2,), "student")  # no labels: nothing to check


def test_a_missing_optional_package_names_the_extra_that_installs_it():
    assert require("json", "none", "reading JSON") is json
    with pytest.raises(InputError, match=r"object storage needs the optional package 'no_such_pkg_xyz' \(no_such_pkg_xyz is not installed\): "
                                         r"pip install 'kd-pipeline\[s3\]'"):
        require("no_such_pkg_xyz", "s3", "object storage")


# --- processes training together ------------------------------------------------------------

def test_without_torchrun_a_run_is_a_group_of_one_and_makes_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(TORCHRUN_VARIABLE, raising=False)
    with process_group("cpu") as (ranks, device):
        assert ranks == Ranks(0, 1) and ranks.main and device == CPU
        assert not dist.is_initialized()
        assert main_only(ranks, lambda: "done") == "done"
        agree(ranks, 7, "anything")  # nothing to disagree with
        values = {"loss": torch.tensor(2.5)}
        assert average_over_ranks(ranks, values) is values
        with pytest.raises(KeyError):
            main_only(ranks, lambda: {}["missing"])


def test_under_torchrun_a_single_process_joins_its_group_of_one(monkeypatch, caplog):
    """So that a one-GPU torchrun run sets up its backend (NCCL) as a run of many processes does."""
    monkeypatch.setenv(TORCHRUN_VARIABLE, "test")
    for name, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="stages.runtime"), process_group("cpu") as (ranks, device):
        assert ranks == Ranks(0, 1) and device == CPU
        assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert not dist.is_initialized()
    assert "process 0 of 1 in a gloo process group" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes: the collective helpers, each result written to rank<N>.json."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out: dict = {}
    with process_group("cpu") as (ranks, _):
        out["ranks"] = [ranks.rank, ranks.world, ranks.main]
        out["average"] = average_over_ranks(ranks, {"x": torch.tensor([1.0 + 2 * rank, 10.0])})["x"].tolist()
        agree(ranks, 42, "the epoch count")
        try:
            agree(ranks, 3 + rank, "the chunk count")
        except PipelineError as exc:
            out["disagree"] = str(exc)
        out["main_only"] = main_only(ranks, lambda: "written by rank 0")
        try:
            main_only(ranks, lambda: 1 / 0)
        except (PipelineError, ZeroDivisionError) as exc:
            out["failure"] = f"{type(exc).__name__}: {exc}"
    out["group_left"] = not dist.is_initialized()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its two processes")
def test_two_processes_average_agree_and_hear_of_a_rank_0_failure(tmp_path):
    context = torch.multiprocessing.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                                                    start_method="fork")
    deadline = time.monotonic() + 1800
    while not context.join(timeout=5):  # a child's exception is re-raised here
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish (a collective call waits forever)")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["ranks"] == [0, 2, True] and one["ranks"] == [1, 2, False]
    assert zero["average"] == one["average"] == [2.0, 10.0]
    assert zero["disagree"] == one["disagree"] == "the processes disagree on the chunk count (from 3 to 4)"
    assert zero["main_only"] == "written by rank 0" and one["main_only"] is None
    assert zero["failure"] == "ZeroDivisionError: division by zero"
    assert one["failure"] == "PipelineError: rank 0 stopped with an error (see its message)"
    assert zero["group_left"] and one["group_left"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_gpu_named_for_every_process_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="would put every process on one GPU"):
        with process_group("cuda:0"):
            pass

