"""Your own training loop (stages.loop): CacheDataset as a PyTorch data source under DataLoader
workers and torchrun processes, and kd_loss against the definitions computed here."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from pipeline.datasets import resolve_dataset
from stages import CacheDataset, kd_loss
from stages.errors import CacheMismatchError, InputError
from stages.train_student import batch_loss
from stages.cache import CacheReader
from tests.conftest import DATASET, TEMPERATURE, cache_with_cli
from tests.doc_examples import example

REPO = Path(__file__).resolve().parents[2]
ROWS = 600


def _train():
    return resolve_dataset(DATASET).split("train")


def _epoch(dataset: CacheDataset, workers: int) -> list[int]:
    return [i for batch in DataLoader(dataset, batch_size=None, num_workers=workers) for i in batch["index"].tolist()]


# 4 workers on a 2-core machine on purpose (more workers than cores, each its own share of rows):
# the DataLoader's warning that they may run slowly is expected.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_every_row_once_per_epoch_with_loader_workers_in_an_order_fixed_by_seed_and_epoch(cache_path, workers):
    dataset = CacheDataset(cache_path, _train(), batch_size=32, seed=5)
    first = _epoch(dataset, workers)
    assert sorted(first) == list(range(ROWS))
    assert _epoch(dataset, workers) == first  # the same (seed, epoch): the same order
    dataset.set_epoch(1)
    second = _epoch(dataset, workers)
    assert sorted(second) == list(range(ROWS)) and second != first
    assert _epoch(CacheDataset(cache_path, _train(), batch_size=32, seed=6), workers) != first


def test_loader_workers_started_by_spawn_open_the_cache_themselves(cache_path):
    """A spawned worker gets the dataset pickled, without the parent's open reader."""
    dataset = CacheDataset(cache_path, _train(), batch_size=32, seed=5)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    rows = [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(rows) == list(range(ROWS)) and rows == _epoch(dataset, workers=2)


def test_batches_carry_inputs_labels_soft_labels_and_the_caches_kind(cache_path):
    train = _train()
    batch = next(iter(CacheDataset(cache_path, train, batch_size=50)))
    index = batch["index"].numpy()
    stored = CacheReader(cache_path).read_rows(0, ROWS)
    assert torch.equal(batch["inputs"], train.inputs(index))
    assert np.array_equal(batch["labels"].numpy(), train.labels[index])
    assert np.array_equal(batch["logits"].numpy(), stored["logits"][index])
    assert (batch["kind"], batch["temperature"]) == ("dense", TEMPERATURE)


def test_another_dataset_is_refused_by_the_caches_fingerprint(cache_path):
    other = resolve_dataset("synthetic:n=600,test=200,features=8,classes=4,seed=4").split("train")
    with pytest.raises(CacheMismatchError, match="does not match the cache"):
        CacheDataset(cache_path, other, batch_size=32)


def test_a_map_style_torch_dataset_serves_the_inputs(cache_path):
    train = _train()

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return train.inputs(np.array([i]))[0], int(train.labels[i])

    rows = _epoch(CacheDataset(cache_path, Pairs(), batch_size=64), workers=0)
    assert sorted(rows) == list(range(ROWS))


def test_two_torchrun_processes_with_two_workers_each_read_every_row_once(cache_path, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        import torch.distributed as dist
        from torch.utils.data import DataLoader
        from pipeline.datasets import resolve_dataset
        from stages import CacheDataset

        dist.init_process_group("gloo")
        dataset = CacheDataset({str(cache_path)!r}, resolve_dataset({DATASET!r}).split("train"), batch_size=16, seed=3)
        epochs = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            epochs.append([i for b in DataLoader(dataset, batch_size=None, num_workers=2) for i in b["index"].tolist()])
        with open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(epochs, f)
        dist.destroy_process_group()
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        together = ranks[0][epoch] + ranks[1][epoch]
        assert sorted(together) == list(range(ROWS)), f"epoch {epoch}: rows read {len(together)}, distinct {len(set(together))}"
        assert ranks[0][epoch] and ranks[1][epoch]
    # The same (seed, epoch) gives each process the same rows in the same order: read again here, in
    # another process, as rank 0 and 1 of 2 with two loader workers, they are the torchrun processes' rows.
    for rank in (0, 1):
        again = CacheDataset(cache_path, _train(), batch_size=16, seed=3, rank=rank, world_size=2)
        for epoch in (0, 1):
            again.set_epoch(epoch)
            assert _epoch(again, workers=2) == ranks[rank][epoch], f"rank {rank}, epoch {epoch}"
    assert ranks[0][0] != ranks[0][1]  # another epoch, another order


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0), axis=-1)))


@pytest.mark.parametrize("temperature", [TEMPERATURE, 1.5])
@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_kd_loss_is_the_definition_for_each_kind_at_the_caches_and_at_another_temperature(tmp_path, teacher_weights, kind, temperature):
    """Hinton's loss, (1 - a) CE + a T^2 KL(p_T || q_T), with p from the cached values computed
    here in float64: a dense row re-tempered exactly (t/T' = (t/T) T/T'), a top-k row over its K
    kept classes and one tail bucket, the tail's mass at another T estimated as docs/cache-format.md says
    (the dropped classes' mass spread evenly among them). It is also train-student's loss."""
    options = ("--format", "topk", "--top-k", "2") if kind == "topk" else ()
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights, "--dtype", "float32", *options)["cache"]
    batch = next(iter(CacheDataset(cache, _train(), batch_size=64, seed=1)))
    torch.manual_seed(0)
    student = torch.randn(len(batch["index"]), 4, dtype=torch.float64)
    alpha, ratio = 0.7, TEMPERATURE / temperature
    s, y = student.numpy(), batch["labels"].numpy()
    q = _softmax(s / temperature)
    if kind == "dense":
        p = _softmax(batch["logits"].double().numpy() * ratio)
        soft = _kl(p, q)
    else:
        values, indices = batch["topk_values"].double().numpy(), batch["topk_indices"].long().numpy()
        lse = batch["logsumexp"].double().numpy()[:, None]
        kept_mass = np.exp(values - lse)
        tail_mass = 1 - kept_mass.sum(-1, keepdims=True)
        dropped = 4 - 2
        tail_logit = lse + np.log(tail_mass) - math.log(dropped)  # the mean exp of the dropped logits / T
        joint = np.concatenate([ratio * values, math.log(dropped) + ratio * tail_logit], axis=-1)
        p = _softmax(joint)
        q_kept = np.take_along_axis(q, indices, -1)
        soft = _kl(p, np.concatenate([q_kept, 1 - q_kept.sum(-1, keepdims=True)], axis=-1))
    ce = float(np.mean(-np.log(_softmax(s)[np.arange(len(y)), y])))
    expected = (1 - alpha) * ce + alpha * temperature**2 * soft
    loss = kd_loss(student, batch, alpha=alpha, temperature=temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    rows = {k: v.numpy() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert float(batch_loss(student, rows, CacheReader(cache), alpha=alpha, temperature=temperature)[0]) == float(loss)


def test_kd_loss_counts_valid_tokens_only(tmp_path):
    """A byte-level LM's top-k token cache: padding positions add nothing and get no gradient."""
    from pipeline.models import resolve_model
    from stages import cache_teacher

    data = "stdlib-bytes:seq=16,train=3000,test=600"
    split = resolve_dataset(data).split("train")
    torch.manual_seed(0)
    teacher = resolve_model("bytelm:dim=16,layers=1,heads=2", num_classes=256, input_shape=(16,))
    config = cache_teacher.CacheTeacherConfig(teacher="bytelm", dataset=data, out=tmp_path / "t.zarr", temperature=2.0,
                                              format="topk", kind_options={"top_k": 8}, chunk_rows=32, device="cpu")
    cache = cache_teacher.run(config, teacher, split).cache
    batch = max(CacheDataset(cache, split, batch_size=32), key=lambda b: int((b["lengths"] < 16).sum()))
    assert (batch["lengths"] < 16).any()
    logits = torch.randn(len(batch["index"]), 16, 256, requires_grad=True)
    loss = kd_loss(logits, batch, alpha=0.5)
    loss.backward()
    padding = torch.arange(16)[None, :] >= batch["lengths"][:, None]
    assert float(logits.grad[padding].abs().max()) == 0 and float(logits.grad[~padding].abs().max()) > 0


def test_the_plain_loop_example_runs_and_learns(tmp_path, teacher_weights):
    """The documented plain loop (example own-loop), run on the tiny dataset."""
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights)["cache"]
    code = example("own-loop", CACHE=repr(str(cache)), DATASET=repr(DATASET), EPOCHS="4")
    (tmp_path / "example.py").write_text(code)
    run = subprocess.run([sys.executable, str(tmp_path / "example.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    accuracies = [float(line.split("test accuracy")[1]) for line in run.stdout.splitlines() if "test accuracy" in line]
    assert len(accuracies) == 4 and accuracies[-1] > 0.5, run.stdout  # 4 classes: chance is 0.25


def test_the_trainer_example_distills_a_token_cache(tmp_path):
    """The documented Hugging Face Trainer example (own-loop-trainer), run on a byte-level top-k token cache with a
    one-layer gpt2: student: the held-out loss per token falls, and Trainer, which counts steps,
    moves the cache to later epochs through the loader's set_epoch."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer's; the `test` extra installs it
    from pipeline.models import resolve_model
    from stages import cache_teacher, train_student

    data = "stdlib-bytes:seq=16,train=12000,test=2000"  # 750 rows, 125 held out
    splits = resolve_dataset(data)
    torch.manual_seed(0)
    teacher_spec = "bytelm:dim=32,layers=1,heads=2"
    teacher = resolve_model(teacher_spec, num_classes=256, input_shape=(16,))
    train_student.run(train_student.TrainConfig(model=teacher_spec, dataset=data, out=tmp_path / "teacher", alpha=0.0,
                                                epochs=2, batch_size=32, lr=3e-3, device="cpu"),
                      teacher, splits.split("train"), splits.split("test"))
    config = cache_teacher.CacheTeacherConfig(teacher=teacher_spec, dataset=data, out=tmp_path / "top8.zarr",
                                              temperature=1.0, format="topk", kind_options={"top_k": 8}, chunk_rows=32, device="cpu")
    cache = cache_teacher.run(config, teacher, splits.split("train")).cache
    steps = 150  # batches of 8 rows: about an epoch and a half
    code = example("own-loop-trainer", CACHE=repr(str(cache)), DATASET=repr(data),
                           STUDENT=repr("gpt2:layers=1,dim=32,heads=2"), STEPS=str(steps))
    code += '\nprint(f"last epoch {cache.epoch}")\n'
    (tmp_path / "example.py").write_text(code)
    # One torch thread, as torchrun sets: beside two loader workers on a busy machine of few cores,
    # torch's threads (one per core) wait on one another and the run takes three times as long.
    run = subprocess.run([sys.executable, str(tmp_path / "example.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = map(float, re.search(r"held-out loss per token: (\S+) before, (\S+) after", run.stdout).groups())
    assert before > 5 and after < before - 0.5, run.stdout  # a fresh student: about ln 256 = 5.55
    assert int(re.search(r"last epoch (\d+)", run.stdout).group(1)) >= 1, run.stdout


def test_the_torchrun_example_trains_every_row_once_per_epoch(tmp_path, teacher_weights):
    """The documented DDP example (own-loop-ddp) under torchrun, two processes of two DataLoader workers each,
    which read different numbers of batches of this cache (without join() it fails): each epoch
    trains on all 600 rows once, and the student learns."""
    cache = cache_with_cli(tmp_path / "c.zarr", teacher_weights)["cache"]
    code = example("own-loop-ddp", CACHE=repr(str(cache)), DATASET=repr(DATASET), EPOCHS="4")
    (tmp_path / "train.py").write_text(code)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    epochs = re.findall(r"epoch (\d+): (\d+) rows, test accuracy (\S+)", run.stdout)
    assert [int(e) for e, _, _ in epochs] == [0, 1, 2, 3], run.stdout
    assert all(int(rows) == ROWS for _, rows, _ in epochs), run.stdout
    assert float(epochs[-1][2]) > 0.5, run.stdout  # 4 classes: chance is 0.25


def test_without_a_dataset_it_reads_the_split_the_cache_records(cache_path):
    """dataset=None: the spec and split the cache records, resolved through the installed
    kd_pipeline.datasets entry point: the same batches, inputs included, as with the split given."""
    recorded, given = CacheDataset(cache_path, batch_size=32, seed=5), CacheDataset(cache_path, _train(), batch_size=32, seed=5)
    for a, b in zip(recorded, given, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["inputs"], b["inputs"])


def test_without_a_dataset_a_recorded_spec_that_is_code_is_refused_and_never_run(cache_path, tmp_path):
    marker = tmp_path / "ran"
    factory = tmp_path / "their_data.py"
    factory.write_text(f"open({str(marker)!r}, 'w').close()\ndef build(split):\n    raise SystemExit\n")
    group = zarr.open_group(str(cache_path), mode="r+")
    group.attrs["dataset"] = {**group.attrs["dataset"], "spec": f"{factory}:build"}
    with pytest.raises(InputError, match="a cache never runs code"):
        CacheDataset(cache_path, batch_size=32)
    assert not marker.exists()
    CacheDataset(cache_path, _train(), batch_size=32)  # given by the user, the split is taken as train-student takes it
