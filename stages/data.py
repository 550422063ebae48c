"""What the stages need from a dataset: one split, addressable by sample index.

A split gives its length, its inputs for any array of indices (the cache is joined with its
dataset through the stored index of every row), its hard labels when it has them, and a
fingerprint that a cache records so that a student is never trained against the wrong data.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from stages.errors import InputError

# Rows hashed for the inputs' fingerprint: enough to tell datasets and orderings apart,
# few enough that fingerprinting a huge split costs nothing.
FINGERPRINT_ROWS = 64
# The most classes labels may imply (past any vocabulary in use): a larger label is a mistake (an
# id, a hash), and a model and cache sized by it would try to allocate terabytes.
MAX_CLASSES = 2**20


class Split(Protocol):
    """One named split of a dataset."""

    name: str
    num_classes: int | None

    def __len__(self) -> int: ...

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        """The inputs of the samples at `index` (int64, shape (B,)), stacked as (B, ...)."""
        ...

    @property
    def labels(self) -> np.ndarray | None:
        """All hard labels as int64: (N,), or (N, L) per token for sequences; None for an
        unlabeled split."""
        ...

    # Optional, for sequences of tokens: `lengths`, int (N,), the valid tokens of each sample
    # (positions past it are padding). A split without it has no padding.
    #
    # Optional, for sequences: `trained_positions(index: np.ndarray) -> np.ndarray`, bool (B, L),
    # True where the student learns the position's label (a chat set's assistant tokens), False
    # elsewhere and always past the sample's length. A split without it trains every valid position.
    #
    # Optional, for labels held out of core: `labels_sha256`, the hash `fingerprint` would compute
    # from all labels (int64, in sample order), known beforehand (pipeline.tokens records it when it
    # writes a token dataset), so that fingerprinting never reads every label. Such a split's
    # `labels` is an array-like read on indexing (len, shape, slices, integer arrays, max()).


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory as one input tensor and an optional label array."""

    name: str
    x: torch.Tensor
    y: np.ndarray | None
    num_classes: int | None
    lengths: np.ndarray | None = None  # sequences: valid tokens per sample
    class_names: tuple[str, ...] | None = None  # what each class number stands for, where known
    # A hash of what made the inputs beyond their values (a tokenizer's vocabulary and settings):
    # part of the fingerprint, so a cache made through another tokenizer is refused.
    source_sha256: str | None = None

    def __len__(self) -> int:
        return len(self.x)

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        return self.x[torch.from_numpy(np.asarray(index, dtype=np.int64))]

    @property
    def labels(self) -> np.ndarray | None:
        return self.y


class TorchDatasetSplit:
    """A split backed by the user's map-style `torch.utils.data.Dataset`.

    Items are `(input, label)` pairs or bare inputs (an unlabeled transfer set). Labels are
    read once, from a `targets` attribute when the dataset has one (as torchvision's do),
    otherwise by visiting every item; a label may be an array (one per token). A dataset of
    padded sequences gives their valid lengths as a `lengths` attribute.
    """

    def __init__(self, name: str, dataset: torch.utils.data.Dataset, num_classes: int | None = None):
        self.name = name
        self.dataset = dataset
        self._labels = _read_labels(dataset)
        if num_classes is None:
            num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None and self._labels is not None:
            num_classes = classes_in(self._labels, f"split {name!r}")
        self.num_classes = num_classes
        lengths = getattr(dataset, "lengths", None)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        return _stacked_inputs([self.dataset[int(i)] for i in index])

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels


def _input_of(item) -> torch.Tensor:
    """An item's input as a tensor: floating point as float32, integers (token ids) kept."""
    x = torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
    return x.float() if x.is_floating_point() else x


def _read_labels(dataset) -> np.ndarray | None:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    if len(dataset) == 0 or not isinstance(dataset[0], (tuple, list)):
        return None
    return np.asarray([np.asarray(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def classes_in(labels: np.ndarray, where: str) -> int | None:
    """The number of classes that labels numbered from 0 imply (None for no labels), checked
    before anything is sized by it: labels are whole numbers in [0, MAX_CLASSES)."""
    if len(labels) == 0:
        return None
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= MAX_CLASSES:
        raise InputError(f"{where}: labels must be class numbers from 0 to {MAX_CLASSES - 1:,}, got {low if low < 0 else high:,}")
    return high + 1


def joined_with_inputs(rows: Iterable[dict], split: Split, workers: int = 0) -> Iterator[dict]:
    """Each batch of rows (a dict with an "index" array) with "inputs" for its stored indices,
    in order. Rows that already carry inputs pass as they are.

    With workers > 0 and a map-style dataset, items are loaded by that many DataLoader worker
    processes, so an expensive __getitem__ (decoding, tokenising) runs in parallel; in-memory
    splits are indexed in place, which beats any worker, and ignore `workers`."""
    if workers > 0 and isinstance(split, TorchDatasetSplit):
        yield from _loaded_by_workers(rows, split, workers)
        return
    for batch in rows:
        yield batch if "inputs" in batch else {**batch, "inputs": inputs_at(split, batch["index"])}


def _loaded_by_workers(rows: Iterable[dict], split: TorchDatasetSplit, workers: int) -> Iterator[dict]:
    # The loader pulls index lists from the rows as it dispatches them to workers, and returns
    # batches in dispatch order: a queue of the rows pulled pairs each batch with its rows.
    pulled: deque[dict] = deque()

    def index_lists() -> Iterator[list[int]]:
        for batch in rows:
            pulled.append(batch)
            yield batch["index"].tolist()

    loader = torch.utils.data.DataLoader(
        split.dataset, batch_sampler=index_lists(), num_workers=workers, collate_fn=_stacked_inputs
    )
    for inputs in loader:
        yield {**pulled.popleft(), "inputs": inputs}


def _stacked_inputs(items: list) -> torch.Tensor:
    return torch.stack([_input_of(item) for item in items])


def inputs_at(split: Split, index: np.ndarray) -> torch.Tensor:
    """`split.inputs(index)`, checked: a user's own split may hand back another array type, which
    would otherwise fail far from its cause."""
    inputs = split.inputs(index)
    if not isinstance(inputs, torch.Tensor):
        kind = type(inputs)
        raise InputError(f"Split.inputs must return a torch.Tensor, got {kind.__module__}.{kind.__qualname__} (wrap it in torch.from_numpy)")
    return inputs


def input_shape(split: Split) -> tuple[int, ...]:
    """The shape of one input, without the batch axis."""
    return tuple(inputs_at(split, np.zeros(1, dtype=np.int64)).shape[1:])


def sequence_lengths(split: Split, positions: int) -> np.ndarray:
    """The valid tokens of each sample of a split of sequences `positions` long, as int32
    (every position when the split gives no lengths)."""
    lengths = getattr(split, "lengths", None)
    if lengths is None:
        return np.full(len(split), positions, dtype=np.int32)
    lengths = np.asarray(lengths)
    if lengths.shape != (len(split),) or (len(lengths) and (lengths.min() < 1 or lengths.max() > positions)):
        raise InputError(f"split {split.name!r}: lengths must be {len(split)} whole numbers in [1, {positions}]")
    return lengths.astype(np.int32)


def fingerprint(split: Split) -> dict:
    """Identify a split's content and ordering: sample count, a hash of all labels (and of
    sequence lengths), and a hash of the inputs at evenly spaced indices (so reordering or
    swapping data shows)."""
    n = len(split)
    sample_index = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, FINGERPRINT_ROWS)).astype(np.int64))
    inputs = inputs_at(split, sample_index).to(torch.float32).contiguous().numpy() if n else np.zeros(0)
    labels_sha256 = getattr(split, "labels_sha256", None)
    if labels_sha256 is None and split.labels is not None:
        labels_sha256 = sha256(np.ascontiguousarray(split.labels, dtype=np.int64))
    lengths = getattr(split, "lengths", None)
    source = getattr(split, "source_sha256", None)
    return {
        **({"source_sha256": source} if source is not None else {}),  # absent for older caches' splits
        "num_samples": n,
        "labels_sha256": labels_sha256,
        "lengths_sha256": None if lengths is None else sha256(np.ascontiguousarray(lengths, dtype=np.int64)),
        "inputs_sha256": sha256(inputs),
        "input_shape": list(inputs.shape[1:]),
    }


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised: a well-mixed 64-bit hash of each value. Its uint64
    arithmetic is meant to wrap around."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
