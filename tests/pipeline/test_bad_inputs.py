"""Every bad input: a non-zero exit code, one line naming the problem, no traceback, and every
file that existed before left byte-for-byte as it was."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stages.storage import FileLock
from tests.conftest import DATASET, invoke, invoke_json

OTHER_DATA = "synthetic:n=600,test=200,features=8,classes=4,seed=9"
REPO = Path(__file__).resolve().parents[2]


def _user_file(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return f"{tmp_path / name}.py:build"


def _copy(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.zarr"
    shutil.copytree(cache, target)
    return target


LM_DATA = "stdlib-bytes:seq=8,train=400,test=80"
LM_TEACHER = "bytelm:dim=8,layers=1,heads=1"


def _token_cache(tmp_path: Path) -> Path:
    invoke_json("cache-teacher", "--teacher", LM_TEACHER, "--dataset", LM_DATA, "--out", tmp_path / "tok.zarr")
    return tmp_path / "tok.zarr"


def _run_folder(tmp_path: Path, cache: Path) -> Path:
    invoke_json("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run")
    return tmp_path / "run"


# Each case: (tmp_path, cache, teacher_weights) -> (arguments, exit code, words the error line holds).
# Set-up (copies, corruptions, runs) happens before the files are snapshotted.
CASES = {
    "missing cache": lambda t, c, w: (["train-student", "--cache", t / "none.zarr", "--student", "mlp-64"], 2, "cache not found"),
    "folder that is not a cache": lambda t, c, w: (["train-student", "--cache", t, "--student", "mlp-64"], 2, "not a cache"),
    "missing dataset file": lambda t, c, w: (["train-student", "--student", "mlp-64", "--dataset", t / "no.npz"], 2, "dataset file not found"),
    "malformed dataset file": lambda t, c, w: ((t / "bad.npz").write_bytes(b"PK junk") and None) or (["train-student", "--student", "mlp-64", "--dataset", t / "bad.npz"], 2, "cannot read dataset file"),
    "unknown dataset spec": lambda t, c, w: (["train-student", "--student", "mlp-64", "--dataset", "imagenet-99"], 2, "unknown dataset spec"),
    "malformed synthetic spec": lambda t, c, w: (["train-student", "--student", "mlp-64", "--dataset", "synthetic:n=ten"], 2, "whole number"),
    "unknown model spec": lambda t, c, w: (["train-student", "--cache", c, "--student", "resnet-9000"], 2, "unknown model spec"),
    "missing model module": lambda t, c, w: (["train-student", "--cache", c, "--student", "no_such_pkg.models:build"], 2, "not found"),
    "missing model file": lambda t, c, w: (["train-student", "--cache", c, "--student", t / "none.py:build"], 2, "file not found"),
    "model file that fails to import": lambda t, c, w: (["train-student", "--cache", c, "--student", _user_file(t, "broken", "def build(:\n")], 2, "failed to import"),
    "student class count differs": lambda t, c, w: (["train-student", "--cache", c, "--student", _user_file(t, "five", """
        from torch import nn
        def build(num_classes):
            return nn.Linear(8, 5)
    """)], 3, "5 classes but the cache has 4"),
    "cache of other data": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--dataset", OTHER_DATA], 3, "does not match the cache"),
    "cache of another split": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--split", "test"], 3, "does not match the cache"),
    "incomplete cache": lambda t, c, w: (zarr.open_group(str(_copy(c, t)), mode="r+")["chunk_done"].__setitem__(4, 0), zarr.open_group(str(t / "copy.zarr"), mode="r+").attrs.__setitem__("complete", False))
        and (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64"], 3, "incomplete"),
    "schema from the future": lambda t, c, w: zarr.open_group(str(_copy(c, t)), mode="r+").attrs.__setitem__("schema_version", 99)
        or (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64"], 3, "upgrade"),
    "corrupted chunk": lambda t, c, w: (_copy(c, t) / "logits" / "c" / "1" / "0").write_bytes(b"\x00garbage")
        and (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64", "--out", t / "r"], 4, "chunk 1 cannot be read"),
    "deleted chunk": lambda t, c, w: (_copy(c, t) / "logits" / "c" / "2" / "0").unlink()
        or (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64", "--out", t / "r"], 4, "array logits: chunk 2 is missing"),
    "verify of a corrupted cache": lambda t, c, w: (_copy(c, t) / "index" / "c" / "0").write_bytes(b"junk")
        and (["verify", t / "copy.zarr"], 4, "failed verification"),
    "verify of a missing cache": lambda t, c, w: (["verify", t / "nope.zarr"], 2, "cache not found"),
    "no dataset without a cache": lambda t, c, w: (["train-student", "--student", "mlp-64"], 2, "missing option"),
    "existing cache with other options": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", w, "--dataset", DATASET, "--out", c, "--temperature", "7", "--chunk-rows", "64"], 2, "temperature: cache has 3.0, this run 7.0"),
    "existing cache with another teacher": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", c, "--temperature", "3", "--chunk-rows", "64"], 2, "teacher: another model spec or other weights"),
    "cache output is a file": lambda t, c, w: ((t / "file.zarr").write_text("mine") and None) or (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "file.zarr"], 2, "not a cache"),
    "locked cache": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", w, "--dataset", DATASET, "--out", t / "locked.zarr"], 5, "being written by another process"),
    "non-finite teacher outputs": lambda t, c, w: (["cache-teacher", "--teacher", _user_file(t, "nan_teacher", """
        import torch
        from torch import nn
        class NaNs(nn.Module):
            def forward(self, x):
                return torch.full((len(x), 4), float("nan"))
        def build(num_classes):
            return NaNs()
    """), "--dataset", DATASET, "--out", t / "n.zarr"], 1, "for samples [0, 1, 2"),
    "temperature zero": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "t0.zarr", "--temperature", "0"], 2, "temperature"),
    "negative student temperature": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--temperature", "-1"], 2, "temperature"),
    "alpha above one": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--alpha", "2"], 2, "alpha"),
    "unknown dtype": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "d.zarr", "--dtype", "int8"], 2, "dtype"),
    "missing weights file": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", t / "w.safetensors", "--dataset", DATASET, "--out", t / "w.zarr"], 2, "weights file not found"),
    "weights that do not fit": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-128", "--teacher-weights", w, "--dataset", DATASET, "--out", t / "f.zarr"], 2, "does not fit the model: 5 of another shape (e.g. 1.weight is (64, 8) in the file, (128, 8) in the model)"),
    "pickled weights": lambda t, c, w: torch.save({"weight": contextlib.nullcontext()}, t / "evil.pt")
        or (["cache-teacher", "--teacher", "linear", "--teacher-weights", t / "evil.pt", "--dataset", DATASET, "--out", t / "e.zarr"], 2, "refusing to unpickle"),
    "cnn on flat inputs": lambda t, c, w: (["cache-teacher", "--teacher", "cnn", "--dataset", DATASET, "--out", t / "cnn.zarr"], 2, "image inputs"),
    "bad TOML": lambda t, c, w: ((t / "bad.toml").write_text("epochs = [") and None) or (["train-student", "--config", t / "bad.toml"], 2, "not valid TOML"),
    "unknown TOML option": lambda t, c, w: ((t / "odd.toml").write_text("epochz = 3") and None) or (["train-student", "--config", t / "odd.toml"], 2, "unknown option(s) epochz"),
    "missing split": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--split", "valid", "--out", t / "v.zarr"], 2, "no split 'valid'"),
    "bad augment": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--augment", "shift:x"], 2, "augment"),
    "run folder exists": lambda t, c, w: (_run_folder(t, c) and None) or (["train-student", "--cache", c, "--student", "mlp-64", "--epochs", "1", "--out", t / "run"], 2, "--resume to continue it or --overwrite"),
    "resume with other options": lambda t, c, w: (_run_folder(t, c) and None) or (["train-student", "--cache", c, "--student", "mlp-64", "--epochs", "3", "--out", t / "run", "--resume"], 2, "epochs differ"),
    "existing teacher weights": lambda t, c, w: (["train-teacher", "--model", "mlp-64", "--dataset", DATASET, "--out", w], 2, "--overwrite"),
    "TOML value of the wrong type": lambda t, c, w: ((t / "typed.toml").write_text('epochs = "2"') and None) or (["train-student", "--config", t / "typed.toml"], 2, "epochs must be a whole number"),
    "negative seed": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--seed", "-1"], 2, "--seed must be 0 or more"),
    "weights file of another format": lambda t, c, w: ((t / "w.toml").write_text("a = 1") and None) or (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", t / "w.toml", "--dataset", DATASET, "--out", t / "x.zarr"], 2, "not safetensors or a PyTorch state dict"),
    "empty split": lambda t, c, w: np.savez(t / "empty.npz", x_train=np.zeros((0, 3)), y_train=np.zeros(0, dtype=np.int64))
        or (["train-student", "--student", "mlp-64", "--dataset", t / "empty.npz"], 2, "is empty"),
    "evaluation split without labels": lambda t, c, w: np.savez(t / "nolab.npz", x_train=np.ones((20, 3)), y_train=np.arange(20) % 2, x_test=np.ones((5, 3)))
        or (["train-student", "--student", "mlp-64", "--dataset", t / "nolab.npz", "--out", t / "r"], 2, "has no labels (pick another --eval-split)"),
    "unlabeled split without --num-classes": lambda t, c, w: np.savez(t / "unl.npz", x_train=np.ones((20, 3)))
        or (["cache-teacher", "--teacher", "mlp-64", "--dataset", t / "unl.npz", "--out", t / "u.zarr"], 2, "pass --num-classes"),
    "augmentation that does not fit, with --overwrite": lambda t, c, w: (_run_folder(t, c) and None) or (["train-student", "--cache", c, "--student", "mlp-64", "--out", t / "run", "--overwrite", "--augment", "shift:1"], 2, "need float images"),
    "run folder that is a file": lambda t, c, w: ((t / "runfile").write_text("x") and None) or (["train-student", "--cache", c, "--student", "mlp-64", "--out", t / "runfile"], 2, "is a file"),
    "weights folder as train-teacher output": lambda t, c, w: (["train-teacher", "--model", "mlp-64", "--dataset", DATASET, "--out", t], 2, "is a folder"),
    "loss that diverges": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--lr", "1e30", "--epochs", "2", "--out", t / "r"], 1, "lower --lr"),
    "schema version missing": lambda t, c, w: zarr.open_group(str(_copy(c, t)), mode="r+").attrs.__setitem__("schema_version", None)
        or (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64"], 4, "malformed: schema_version"),
    "array metadata corrupted": lambda t, c, w: (_copy(c, t) / "logits" / "zarr.json").write_text("{not json")
        and (["train-student", "--cache", t / "copy.zarr", "--student", "mlp-64"], 4, "cannot be opened"),
    "unknown cache format": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "f.zarr", "--format", "sparse"], 2, "--format must be one of dense, topk"),
    "top-k without --format topk": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "f.zarr", "--top-k", "2"], 2, "--top-k goes with --format topk"),
    "--format topk without --top-k": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "f.zarr", "--format", "topk"], 2, "needs --top-k"),
    "top-k above the class count": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "f.zarr", "--format", "topk", "--top-k", "9"], 2, "between 1 and the number of classes (4)"),
    "shard rows not a multiple of chunk rows": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "s.zarr", "--chunk-rows", "64", "--shard-rows", "100"], 2, "--shard-rows must be a multiple of --chunk-rows (64), got 100"),
    "existing dense cache re-run as top-k": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--teacher-weights", w, "--dataset", DATASET, "--out", c, "--temperature", "3", "--chunk-rows", "64", "--format", "topk", "--top-k", "2"], 2, "kind: cache has dense, this run topk"),
    "per-sample student on a token cache": lambda t, c, w: (["train-student", "--cache", _token_cache(t), "--student", _user_file(t, "pooled", """
        from torch import nn
        def build(num_classes):
            return nn.Sequential(nn.Embedding(num_classes, 4), nn.Flatten(), nn.Linear(32, num_classes))
    """), "--out", t / "r"], 3, "outputs logits of shape (256,) per sample but the cache holds rows of (8, 256)"),
    "float inputs for a language model": lambda t, c, w: (["cache-teacher", "--teacher", "bytelm", "--dataset", DATASET, "--out", t / "f.zarr"], 2, "needs integer token ids"),
    "model that does not fit the data": lambda t, c, w: (["train-student", "--student", "mlp-64", "--dataset", LM_DATA, "--out", t / "r"], 2, "the model fails on the dataset's inputs ((8,) int64)"),
    "bad bytelm spec": lambda t, c, w: (["cache-teacher", "--teacher", "bytelm:dim=10,heads=3", "--dataset", LM_DATA, "--out", t / "f.zarr"], 2, "dim (10) must be a multiple of heads (3)"),
    "bad stdlib-bytes spec": lambda t, c, w: (["cache-teacher", "--teacher", "bytelm", "--dataset", "stdlib-bytes:seq=0", "--out", t / "f.zarr"], 2, "need seq >= 1"),
    "sweep file with an unknown key": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0]\nalpha = [0.5]\n') and None)
        or (["sweep", t / "s.toml"], 2, "unknown key(s) alpha"),
    "sweep that sets a grid option in [train]": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0]\n[train]\nseed = 3\n') and None)
        or (["sweep", t / "s.toml"], 2, "[train] cannot set seed"),
    "sweep without students": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nseeds = [0]\n') and None)
        or (["sweep", t / "s.toml"], 2, "students is required"),
    "sweep with a [train] value of the wrong type": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0]\n[train]\nepochs = "five"\n') and None)
        or (["sweep", t / "s.toml"], 2, "epochs must be a whole number, got 'five'"),
    "sweep with an unknown [train] option": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0]\n[train]\nepoch = 1\n') and None)
        or (["sweep", t / "s.toml"], 2, "[train] has unknown option(s) epoch"),
    "sweep with an unknown student": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["resnet-9000"]\nseeds = [0]\n') and None)
        or (["sweep", t / "s.toml"], 2, "unknown model spec 'resnet-9000'"),
    "sweep with a seed twice": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0, 0]\n') and None)
        or (["sweep", t / "s.toml"], 2, "seeds lists a value twice"),
    "sweep with no temperatures": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = [0]\ntemperatures = []\n') and None)
        or (["sweep", t / "s.toml"], 2, "temperatures must not be empty"),
    "combining a cache with itself": lambda t, c, w: (["combine", c, c, "--out", t / "e.zarr"], 2, "holds the same teacher as another cache"),
    "inspect plot that is not a PNG": lambda t, c, w: (["inspect", c, "--png", t / "plot.txt"], 2, "--png must name a .png file"),
    "verify with weights but no teacher": lambda t, c, w: (["verify", c, "--teacher-weights", w], 2, "--teacher-weights needs --teacher"),
    "sweep with a seed of the wrong type": lambda t, c, w: ((t / "s.toml").write_text(f'cache = "{c}"\nstudents = ["mlp-64"]\nseeds = ["0"]\n') and None)
        or (["sweep", t / "s.toml"], 2, "seeds holds '0'"),
    "combining caches of other data": lambda t, c, w: (invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", w, "--dataset", OTHER_DATA, "--out", t / "o.zarr", "--temperature", "3") and None)
        or (["combine", c, t / "o.zarr", "--out", t / "e.zarr"], 3, "dataset differ"),
    "evaluate with missing weights": lambda t, c, w: (["evaluate", "--model", "mlp-64", "--weights", t / "none.safetensors", "--cache", c], 2, "weights file not found"),
    "views without an augmentation": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "v.zarr", "--views", "4"], 2, "--views 4 needs --augment SPEC"),
    "unknown view augmentation": lambda t, c, w: (["cache-teacher", "--teacher", "mlp-64", "--dataset", DATASET, "--out", t / "v.zarr", "--augment", "blur:2"], 2, "unknown augment spec 'blur:2'"),
    "views of token sequences": lambda t, c, w: (["cache-teacher", "--teacher", LM_TEACHER, "--dataset", LM_DATA, "--out", t / "v.zarr", "--augment", "flip"], 2, "need float images"),
    "unknown view policy": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--view-policy", "best"], 2, "--view-policy must be one of random, cycle"),
    "label of a billion in an .npz": lambda t, c, w: np.savez(t / "big.npz", x_train=np.ones((20, 3)), y_train=np.array([0] * 19 + [10**9]))
        or (["cache-teacher", "--teacher", "mlp-64", "--dataset", t / "big.npz", "--out", t / "b.zarr"], 2, "labels must be class numbers from 0 to 1,048,575, got 1,000,000,000"),
    "label of 2**40 in an .npz's test split": lambda t, c, w: np.savez(t / "big.npz", x_train=np.ones((20, 3)), y_train=np.arange(20) % 2, x_test=np.ones((5, 3)), y_test=np.array([0, 1, 0, 1, 2**40]))
        or (["train-student", "--student", "mlp-64", "--dataset", t / "big.npz", "--out", t / "r"], 2, "y_test: labels must be class numbers"),
    "x_train and x_test of other feature counts": lambda t, c, w: np.savez(t / "odd.npz", x_train=np.ones((20, 3)), y_train=np.arange(20) % 2, x_test=np.ones((5, 4)), y_test=np.arange(5) % 2)
        or (["train-student", "--student", "mlp-64", "--dataset", t / "odd.npz", "--out", t / "r"], 2, "x_train and x_test must have one input shape, got (3,) and (4,)"),
    "cuda without a GPU": lambda t, c, w: (["train-student", "--cache", c, "--student", "mlp-64", "--device", "cuda"], 2, "CUDA"),
    "verify against a dataset of another size": lambda t, c, w: (["verify", c, "--teacher", "mlp-64", "--teacher-weights", w, "--dataset",
                                                                  "synthetic:n=500,test=200,features=8,classes=4,seed=3", "--rows", "8"],
                                                                 3, "split 'train' of the dataset given has 500 samples; cache"),
    "gpt2 vocabulary of four billion": lambda t, c, w: (["cache-teacher", "--teacher", "gpt2:layers=1,dim=16,heads=2,vocab=4000000000", "--dataset", LM_DATA, "--out", t / "g.zarr"],
                                                        2, "vocab must be at most 1,048,576, got 4,000,000,000"),
    "model larger than the machine": lambda t, c, w: (["cache-teacher", "--teacher", "mlp:width=65536,depth=1024", "--dataset", DATASET, "--out", t / "m.zarr"],
                                                      2, "parameters take 16,368.3 GiB as float32, more than this machine's"),
    "demo-llm teacher of another strength": lambda t, c, w: (["demo-llm", "--out", t / "d", "--teachers", "final,medium"], 2,
                                                            "teacher strengths are early and final, got medium"),
    "demo-llm early teacher with given weights": lambda t, c, w: (["demo-llm", "--out", t / "d", "--teacher-weights", w], 2,
                                                                 "--teacher-weights gives the final teacher alone"),
    "demo-llm teacher on fewer tokens than its students": lambda t, c, w: (["demo-llm", "--out", t / "d", "--teacher-tokens", "5000"], 2,
                                                                          "--teacher-tokens 5,000 is below --max-tokens 60,000"),
    "demo-llm early teacher as late as the last": lambda t, c, w: (["demo-llm", "--out", t / "d", "--teacher-epochs", "2", "--early-epochs", "2"], 2,
                                                                  "the early teacher's epochs must be fewer than the teacher's 2, got 2"),
    "demo-llm head-tail arm without its draws": lambda t, c, w: (["demo-llm", "--out", t / "d", "--head-tail", "8"], 2,
                                                                "--head-tail takes K,S (two whole numbers), got '8'"),
    "demo-llm head-tail arm of 256 draws": lambda t, c, w: (["demo-llm", "--out", t / "d", "--head-tail", "8,256"], 2,
                                                           "--head-tail takes K >= 1 and S in [1, 255], got '8,256'"),
    "synthetic set of 1e11 rows": lambda t, c, w: (["train-student", "--student", "mlp-64", "--dataset", "synthetic:n=100000001000"], 2, "n must be at most 100,000,000, got 100,000,001,000"),
}


# Failures found part-way leave what they wrote so far, resumable: a partial cache, or a run
# folder whose first epoch met a damaged chunk.
FAILS_PART_WAY = {"non-finite teacher outputs", "corrupted chunk", "deleted chunk", "loss that diverges"}


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(case, tmp_path, cache_path, teacher_weights):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, code, words = CASES[case](tmp_path, cache_path, teacher_weights)
    before = {**_tree(tmp_path), **_tree(teacher_weights.parent)}
    holding = FileLock(tmp_path / "locked.zarr") if case == "locked cache" else contextlib.nullcontext()
    with holding:
        exit_code, out, err = invoke(*args)
    assert exit_code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err + out
    after = {**_tree(tmp_path), **_tree(teacher_weights.parent)}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed
    if case not in FAILS_PART_WAY:
        assert set(after) == set(before), set(after) ^ set(before)


def test_there_are_at_least_twenty_distinct_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize(("args", "words"), [
    (["train-student", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["train-student", "--bogus"], "No such option: --bogus"),
    (["demo", "--seeds", "0"], "Invalid value for '--seeds'"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_from_the_console_entry_point_are_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr


@pytest.fixture
def caches_naming_code(tmp_path, teacher_weights):
    """A cache whose dataset is a factory file, and a view cache whose augmentation is one, made
    as their author would (naming the code); then the code's marker file is removed and its
    modules forgotten, so that any later import or call of it shows."""
    marker = tmp_path / "code-ran"
    touch = f"open({str(marker)!r}, 'a').close()"
    data = _user_file(tmp_path, "their_data", f"""
        import numpy as np, torch
        from pipeline.datasets import resolve_dataset
        {touch}
        def build(split):
            {touch}
            part = resolve_dataset({DATASET!r}).split(split)
            return torch.utils.data.TensorDataset(part.inputs(np.arange(len(part))), torch.from_numpy(part.labels))
    """)
    augment = _user_file(tmp_path, "their_augment", f"""
        {touch}
        def build():
            {touch}
            return lambda x, rng: x + float(rng.normal()) * 0.01
    """)
    common = ["--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--chunk-rows", "64"]
    invoke_json("cache-teacher", *common, "--dataset", data, "--out", tmp_path / "data.zarr")
    invoke_json("cache-teacher", *common, "--dataset", DATASET, "--augment", augment, "--views", "2", "--out", tmp_path / "views.zarr")
    marker.unlink()
    for name in [m for m in sys.modules if m.startswith(("_user_their_data", "_user_their_augment"))]:
        del sys.modules[name]
    return {"data": data, "augment": augment, "marker": marker, "teacher_weights": teacher_weights}


def _sweep_file(path: Path, cache: Path, grid: str = "", train: str = "") -> Path:
    path.write_text(f'cache = "{cache}"\nstudents = ["mlp-64"]\nseeds = [0]\nbaseline = false\n{grid}\n[train]\nepochs = 1\n{train}\n')
    return path


def test_a_cache_never_runs_code_the_user_did_not_name(tmp_path, caches_naming_code):
    """Every command that reads a cache refuses a code spec recorded in it (one line saying how to
    name it) without importing or calling it; naming that spec runs it."""
    t, c = tmp_path, caches_naming_code
    data, views, weights = t / "data.zarr", t / "views.zarr", c["teacher_weights"]
    verify_teacher = ["--teacher", "mlp-64", "--teacher-weights", weights]
    refused = [
        (["train-student", "--cache", data, "--student", "mlp-64", "--out", t / "r"], f"--dataset {c['data']}"),
        (["train-student", "--cache", views, "--student", "mlp-64", "--out", t / "r"], f"--augment {c['augment']}"),
        (["evaluate", "--model", "mlp-64", "--cache", data], f"--dataset {c['data']}"),
        (["evaluate", "--model", "mlp-64", "--cache", views, "--dataset", DATASET], f"--augment {c['augment']}"),
        (["verify", data, *verify_teacher], f"--dataset {c['data']}"),
        (["verify", views, *verify_teacher], f"--augment {c['augment']}"),
        (["sweep", _sweep_file(t / "data.toml", data), "--out", t / "s"], f'dataset = "{c["data"]}"'),
        (["sweep", _sweep_file(t / "views.toml", views), "--out", t / "s"], f'augment = "{c["augment"]}" under [train]'),
    ]
    for args, how in refused:
        code, out, err = invoke(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "which is code" in lines[0] and how in lines[0], (args, err)
        assert not c["marker"].exists(), args
    for args in (["verify", data], ["verify", views], ["inspect", data, "--png", t / "d.png"]):  # they need no dataset
        assert invoke(*args)[0] == 0, args
    assert not c["marker"].exists()

    named = [
        ["train-student", "--cache", data, "--student", "mlp-64", "--epochs", "1", "--out", t / "r1", "--dataset", c["data"]],
        ["train-student", "--cache", views, "--student", "mlp-64", "--epochs", "1", "--out", t / "r2", "--augment", c["augment"]],
        ["evaluate", "--model", "mlp-64", "--cache", data, "--dataset", c["data"]],
        ["evaluate", "--model", "mlp-64", "--cache", views, "--dataset", DATASET, "--augment", c["augment"]],
        ["verify", data, *verify_teacher, "--dataset", c["data"]],
        ["verify", views, *verify_teacher, "--augment", c["augment"]],
        ["sweep", _sweep_file(t / "d.toml", data, f'dataset = "{c["data"]}"'), "--out", t / "s1"],
        ["sweep", _sweep_file(t / "v.toml", views, train=f'augment = "{c["augment"]}"'), "--out", t / "s2"],
    ]
    for args in named:
        code, out, err = invoke(*args, "--json")
        assert code == 0, (args, err)
    assert c["marker"].exists()  # the named code did run


def _recording(cache: Path, tmp_path: Path, spec: str) -> Path:
    copy = _copy(cache, tmp_path)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["dataset"] = {**group.attrs["dataset"], "spec": spec}
    return copy


def test_cache_dataset_refuses_a_recorded_spec_that_is_too_large_or_is_code_in_the_librarys_own_words(tmp_path, cache_path):
    """The library's errors name CacheDataset's parameter, not the CLI's flag (which a Python
    user has no command line to give)."""
    from stages import CacheDataset
    from stages.errors import InputError

    with pytest.raises(InputError, match="n must be at most 100,000,000, got 100,000,001,000"):
        CacheDataset(_recording(cache_path, tmp_path / "big", "synthetic:n=100000001000"), batch_size=32)
    with pytest.raises(InputError) as caught:
        CacheDataset(_recording(cache_path, tmp_path / "code", "os:system"), batch_size=32)
    said = str(caught.value)
    assert "which is code, and a cache never runs code" in said and "--" not in said
    assert "pass it to CacheDataset as `dataset`, as pipeline.datasets.resolve_dataset('os:system').split('train')" in said


@pytest.mark.parametrize("name", ["a:b+c/data:v2.npz", "run:1/set", "UPPER:CASE.NPZ"])
def test_a_data_file_whose_path_holds_a_colon_is_a_file_not_code(tmp_path, name):
    """A recorded path with a colon (and a plus) is read as the file it names, never refused or
    imported as module:factory: by the commands and by CacheDataset without a dataset."""
    from pipeline.datasets import dataset_runs_user_code
    from stages import CacheDataset

    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:  # by a file object: np.savez adds no .npz to the name
        np.savez(f, x_train=rng.normal(size=(40, 3)).astype(np.float32), y_train=np.arange(40) % 2)
    assert not dataset_runs_user_code(str(path))
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--dataset", path, "--out", tmp_path / "c.zarr")
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["dataset"]["spec"] == str(path)
    rows = [i for batch in CacheDataset(tmp_path / "c.zarr", batch_size=8) for i in batch["index"].tolist()]
    assert sorted(rows) == list(range(40))
