"""Measuring a model (stages.evaluation): accuracy, errors and NLL per sample or per valid token,
agreement with a cached teacher (dense, top-k, views, tokens), and the speed figures, each
against a direct computation on a real small model and real data."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages import cache_teacher
from stages.augment import parse_augment
from stages.cache.reader import CacheReader
from stages.data import TensorSplit
from stages.errors import InputError
from stages.evaluation import evaluate, kl_from_reference, speed, teacher_agreement, top_mass
from tests.conftest import DATASET

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits():
    data = resolve_dataset(DATASET)
    return data.split("train"), data.split("test")


@pytest.fixture
def teacher(teacher_weights) -> nn.Module:
    return resolve_model("mlp-64", num_classes=4, input_shape=(8,), weights=teacher_weights)


def _direct(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> dict:
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    right = (logits.argmax(-1).numpy() == y)
    return {"accuracy": right.mean(), "errors": int((~right).sum()),
            "nll": float(F.cross_entropy(logits, torch.from_numpy(y)))}


@pytest.mark.parametrize("batch_size", [1000, 64, 7])
def test_evaluate_matches_a_direct_computation_over_the_whole_split(teacher, splits, batch_size):
    """200 test rows in batches of 64 or 7 leave a short last batch: every row counts once."""
    test = splits[1]
    direct = _direct(teacher, test.inputs(np.arange(len(test))), test.labels)
    metrics = evaluate(teacher, test, CPU, batch_size=batch_size)
    assert metrics["num_samples"] == 200 and "num_tokens" not in metrics
    assert metrics["errors"] == direct["errors"] and metrics["accuracy"] == pytest.approx(direct["accuracy"])
    assert metrics["nll"] == pytest.approx(direct["nll"], rel=1e-5)
    assert 0.5 < metrics["accuracy"] < 1  # a trained teacher, neither chance nor perfect: the counts mean something


def test_evaluate_measures_the_model_in_eval_mode(splits):
    """A model handed over in training mode (dropout on) is measured as it predicts, deterministically."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4)).train()
    test = splits[1]
    first = evaluate(model, test, CPU)
    assert not model.training
    assert first == evaluate(model.train(), test, CPU)
    assert first["nll"] == pytest.approx(_direct(model, test.inputs(np.arange(200)), test.labels)["nll"], rel=1e-5)


def test_evaluate_refuses_a_split_without_labels(teacher, splits):
    train = splits[0]
    unlabeled = TensorSplit("transfer", train.inputs(np.arange(20)), None, 4)
    with pytest.raises(InputError, match="cannot evaluate on split 'transfer': it has no labels"):
        evaluate(teacher, unlabeled, CPU)


class TokenModel(nn.Module):
    """Logits per token: an embedding of each token id into the classes, plus its neighbour's."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, vocab)

    def forward(self, x):
        e = self.embedding(x)
        return e + 0.5 * torch.roll(e, 1, dims=1)


def _tokens(lengths: bool = True, n: int = 90, positions: int = 6, vocab: int = 11) -> TensorSplit:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(0, vocab, size=(n, positions)))
    y = rng.integers(0, vocab, size=(n, positions))
    return TensorSplit("tokens", x, y, vocab, lengths=rng.integers(1, positions + 1, size=n) if lengths else None)


@pytest.mark.parametrize("with_lengths", [True, False])
def test_evaluate_per_token_counts_valid_tokens_only(with_lengths):
    split = _tokens(with_lengths)
    model = TokenModel(11, seed=1)
    valid = (np.arange(6)[None, :] < split.lengths[:, None]) if with_lengths else np.ones((90, 6), dtype=bool)
    with torch.no_grad():
        logits = model(split.x).double()[torch.from_numpy(valid)]
    y = torch.from_numpy(split.y[valid])
    metrics = evaluate(model, split, CPU, batch_size=32)
    assert metrics["num_tokens"] == valid.sum() and metrics["num_samples"] == 90
    assert metrics["errors"] == int((logits.argmax(-1) != y).sum())
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    assert metrics["nll"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


# --- agreement with a cached teacher ---------------------------------------------------------

def _cache(tmp_path, model, split, name: str, **options) -> CacheReader:
    config = cache_teacher.CacheTeacherConfig(teacher="t", dataset="d", out=tmp_path / f"{name}.zarr", chunk_rows=64,
                                              device="cpu", **options)
    return CacheReader(cache_teacher.run(config, model, split).cache)


@pytest.mark.parametrize("options", [{}, {"format": "topk", "kind_options": {"top_k": 2}}], ids=["dense", "topk"])
def test_teacher_agreement_is_the_fraction_of_rows_whose_top_class_is_the_cached_teachers(tmp_path, teacher, splits, options):
    train = splits[0]
    reader = _cache(tmp_path, teacher, train, "c", **options)
    stored = zarr.open_group(str(reader.path), mode="r")
    cached_top = stored["logits"][:].argmax(1) if not options else stored["topk_indices"][:, 0]
    torch.manual_seed(3)
    student = resolve_model("mlp-64", num_classes=4, input_shape=(8,))  # untrained: agrees on some rows only
    with torch.no_grad():
        ours = student(train.inputs(stored["index"][:])).argmax(1).numpy()
    expected = float((ours == cached_top).mean())
    assert 0 < expected < 1
    assert teacher_agreement(student, reader, train, CPU) == pytest.approx(expected)
    assert teacher_agreement(teacher, reader, train, CPU) == pytest.approx(float((_top(teacher, train) == cached_top).mean()))


def _top(model, split) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(split.inputs(np.arange(len(split)))).argmax(-1).numpy()


def test_teacher_agreement_measures_the_model_in_eval_mode(tmp_path, teacher, splits):
    train = splits[0]
    reader = _cache(tmp_path, teacher, train, "c")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4)).train()
    stored = zarr.open_group(str(reader.path), mode="r")
    with torch.no_grad():
        ours = student.eval()(train.inputs(stored["index"][:])).argmax(1).numpy()
    expected = float((ours == stored["logits"][:].argmax(1)).mean())
    assert teacher_agreement(student.train(), reader, train, CPU) == pytest.approx(expected)
    assert teacher_agreement(student.train(), reader, train, CPU) == pytest.approx(expected)


def test_teacher_agreement_over_views_replays_each_view_from_its_seed(tmp_path):
    digits = resolve_dataset("digits").split("train")
    split = TensorSplit("train", digits.inputs(np.arange(300)), digits.labels[:300], 10)
    torch.manual_seed(0)
    teacher = resolve_model("cnn", num_classes=10, input_shape=(1, 8, 8))
    reader = _cache(tmp_path, teacher, split, "views", augment="shift:2", views=3, view_seed=11, dtype="float32")
    stored = zarr.open_group(str(reader.path), mode="r")
    augment = parse_augment("shift:2")
    torch.manual_seed(1)
    student = resolve_model("mlp-64", num_classes=10, input_shape=(1, 8, 8)).eval()
    seeds, index = stored["view_seeds"][:], stored["index"][:]
    with torch.no_grad():
        views = augment(split.inputs(index).repeat_interleave(3, dim=0), seeds.reshape(-1))
        ours = student(views).argmax(1).numpy().reshape(300, 3)
        unaugmented = student(split.inputs(index)).argmax(1).numpy()[:, None]
    cached_top = stored["logits"][:].argmax(-1)
    expected = float((ours == cached_top).mean())
    assert teacher_agreement(student, reader, split, CPU, augment=augment) == pytest.approx(expected)
    # the replay matters: the views' inputs are not the plain ones
    assert expected != pytest.approx(float((unaugmented == cached_top).mean()))
    with pytest.raises(InputError, match="needs the augmentation that made them"):
        teacher_agreement(student, reader, split, CPU)


def test_teacher_agreement_over_tokens_counts_valid_tokens_only(tmp_path):
    split = _tokens(lengths=True)
    reader = _cache(tmp_path, TokenModel(11, seed=1), split, "tokens", dtype="float32")
    stored = zarr.open_group(str(reader.path), mode="r")
    student = TokenModel(11, seed=2)
    valid = np.arange(6)[None, :] < stored["lengths"][:][:, None]
    with torch.no_grad():
        ours = student(split.inputs(stored["index"][:])).argmax(-1).numpy()
    same = ours == stored["logits"][:].argmax(-1)
    assert same[valid].mean() != pytest.approx(same.mean())  # padding would change the figure
    assert teacher_agreement(student, reader, split, CPU) == pytest.approx(float(same[valid].mean()))


# --- speed ------------------------------------------------------------------------------

class Counting(nn.Module):
    """Counts its forwards and their batch sizes; with a clock, each forward also advances it by
    the next of `seconds`, so that the timings speed() reads are known exactly."""

    def __init__(self, model: nn.Module, clock: list[float] | None = None, seconds: tuple[float, ...] = ()):
        super().__init__()
        self.model, self.batches, self.clock, self.seconds = model, [], clock, seconds

    def forward(self, x):
        if self.clock is not None:
            self.clock[0] += self.seconds[len(self.batches)]
        self.batches.append(len(x))
        return self.model(x)


def test_speed_times_the_asked_batches_after_the_warmup_on_the_first_rows(teacher, splits):
    model = Counting(teacher)
    figures = speed(model, splits[1], CPU, batch_size=32, batches=6, warmup=2)
    assert model.batches == [32] * 8 and not model.training
    assert figures["batch_size"] == 32
    assert 0 < figures["latency_ms_min"] <= figures["latency_ms_median"] <= figures["latency_ms_max"]


def test_speed_reports_median_min_and_max_of_the_timed_batches_only(teacher, splits, monkeypatch):
    """On a clock that each forward advances by a known time: a slow first forward (compiling,
    allocating) is left to the warmup, and one slow timed batch moves the maximum, not the median."""
    clock = [0.0]
    monkeypatch.setattr("stages.evaluation.time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = Counting(teacher, clock, seconds=(0.5, 0.007, 0.003, 0.001, 0.040, 0.002, 0.005))
    figures = speed(model, splits[1], CPU, batch_size=32, batches=5, warmup=2)
    assert model.batches == [32] * 7
    assert figures["latency_ms_median"] == pytest.approx(3.0)
    assert figures["latency_ms_min"] == pytest.approx(1.0) and figures["latency_ms_max"] == pytest.approx(40.0)
    assert figures["samples_per_second"] == pytest.approx(32 / 0.003)


def test_speed_on_a_split_smaller_than_the_batch_times_the_whole_split(teacher, splits):
    model = Counting(teacher)
    figures = speed(model, splits[1], CPU, batch_size=512, batches=3, warmup=1)
    assert figures["batch_size"] == 200 and model.batches == [200] * 4


def test_an_empty_split_and_views_without_their_augmentation_are_input_errors():
    empty = TensorSplit("test", torch.zeros(0, 3), np.zeros(0, dtype=np.int64), 2)
    with pytest.raises(InputError, match="split 'test': it has no rows"):
        evaluate(torch.nn.Linear(3, 2), empty, torch.device("cpu"))


def test_top_mass_and_kl_from_a_reference_over_valid_tokens_in_pieces_match_the_whole_logits(monkeypatch):
    """Two GPT-2s over 8,192 classes on the standard library's bytes (rows shorter than 16 padded):
    the mean mass of a model's top K, and each model's mean KL(reference || model), computed a piece
    of positions at a time (pieces of 3 rows here), equal their values from the whole (B, L, C)
    logits over the valid tokens; a model's KL from itself is 0."""
    pytest.importorskip("transformers")
    from stages import losses

    split = resolve_dataset("stdlib-bytes:seq=16,train=600,test=300").split("test")
    assert (split.lengths < 16).any()  # padding to leave out
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(resolve_model("gpt2:layers=1,dim=16,heads=2,vocab=8192", num_classes=8192, input_shape=(16,)).eval())
    with torch.no_grad():
        logits = [m(torch.from_numpy(np.asarray(split.x))).double() for m in models]
    valid = torch.arange(16)[None, :] < torch.from_numpy(split.lengths)[:, None]
    p = [z[valid].softmax(-1) for z in logits]
    ranked = p[0].sort(-1, descending=True).values.cumsum(-1)
    kl = (p[0] * (p[0].log() - p[1].log())).sum(-1).mean()
    monkeypatch.setattr(losses, "LOGIT_PIECE_BYTES", 3 * 4 * 8192)
    masses = top_mass(models[0], split, torch.device("cpu"), (8, 128), batch_size=7)
    assert masses == pytest.approx({8: float(ranked[:, 7].mean()), 128: float(ranked[:, 127].mean())}, rel=1e-5)
    itself, other = kl_from_reference(models[0], [models[0], models[1]], split, torch.device("cpu"), batch_size=7)
    assert itself == pytest.approx(0, abs=1e-6) and other == pytest.approx(float(kl), rel=1e-4) and other > 1e-3
