"""What the stages need from a dataset (stages.data): the split wrappers and the labels they
read, joining cache rows with their inputs (in place or through DataLoader workers), the checks
on what a user's split hands back, the fingerprint a cache records, and the SplitMix64 hash that
seeded rows and views are drawn from."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.datasets import resolve_dataset
from stages.data import (
    FINGERPRINT_ROWS, MAX_CLASSES, TensorSplit, TorchDatasetSplit, classes_in, fingerprint, input_shape, inputs_at,
    joined_with_inputs, sequence_lengths, splitmix64,
)
from stages.errors import InputError
from tests.conftest import DATASET


@pytest.fixture(scope="module")
def tiny() -> TensorSplit:
    """The tiny dataset's training split, held in memory: 600 rows of 8 features, 4 classes."""
    split = resolve_dataset(DATASET).split("train")
    return TensorSplit("train", split.inputs(np.arange(len(split))), split.labels.copy(), split.num_classes)


class Items(torch.utils.data.Dataset):
    """A map-style dataset over the tiny split's rows: (float64 array, int label) pairs, or bare
    inputs; counts how often an item is read."""

    def __init__(self, split: TensorSplit, labelled: bool = True, targets: bool = False):
        self.x, self.y, self.labelled, self.reads = split.x.double().numpy(), split.y, labelled, 0
        if targets:
            self.targets = list(split.y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return (self.x[i], int(self.y[i])) if self.labelled else self.x[i]


def _with(split: TensorSplit, **changes) -> TensorSplit:
    fields = {"name": split.name, "x": split.x, "y": split.y, "num_classes": split.num_classes, "lengths": split.lengths}
    return TensorSplit(**{**fields, **changes})


# --- the split wrappers ---------------------------------------------------------------------

def test_tensor_split_returns_the_rows_asked_for_in_the_order_asked(tiny):
    index = np.array([599, 0, 17, 17, 300])
    assert torch.equal(tiny.inputs(index), torch.stack([tiny.x[i] for i in index]))
    assert tiny.inputs(index.astype(np.int32)).shape == (5, 8)  # any integer index array
    assert input_shape(tiny) == (8,)


def test_torch_dataset_split_reads_labels_by_visiting_items_and_stacks_float32_inputs(tiny):
    items = Items(tiny)
    split = TorchDatasetSplit("train", items)
    np.testing.assert_array_equal(split.labels, tiny.y)
    assert split.labels.dtype == np.int64 and split.num_classes == int(tiny.y.max()) + 1 and len(split) == 600
    inputs = split.inputs(np.array([5, 1, 599]))
    assert inputs.dtype == torch.float32  # float64 items become float32, as the models expect
    torch.testing.assert_close(inputs, tiny.x[[5, 1, 599]])


def test_torch_dataset_split_takes_targets_without_reading_any_item(tiny):
    items = Items(tiny, targets=True)
    split = TorchDatasetSplit("train", items)
    np.testing.assert_array_equal(split.labels, tiny.y)
    assert items.reads == 0


def test_torch_dataset_split_of_bare_inputs_is_unlabeled_and_takes_classes_from_the_dataset(tiny):
    items = Items(tiny, labelled=False)
    assert TorchDatasetSplit("transfer", items).labels is None
    assert TorchDatasetSplit("transfer", items).num_classes is None
    items.num_classes = 9
    assert TorchDatasetSplit("transfer", items).num_classes == 9
    assert TorchDatasetSplit("transfer", items, num_classes=5).num_classes == 5  # the caller's word first


def test_torch_dataset_split_keeps_integer_token_ids_and_the_datasets_lengths():
    class Tokens(torch.utils.data.Dataset):
        lengths = [3, 1]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.array([[7, 8, 9], [4, 0, 0]][i]), np.array([[8, 9, 1], [2, 0, 0]][i])

    split = TorchDatasetSplit("train", Tokens())
    inputs = split.inputs(np.array([1, 0]))
    assert inputs.dtype == torch.int64 and inputs.tolist() == [[4, 0, 0], [7, 8, 9]]
    assert split.labels.tolist() == [[8, 9, 1], [2, 0, 0]] and split.num_classes == 10
    assert split.lengths.tolist() == [3, 1] and split.lengths.dtype == np.int64


@pytest.mark.parametrize("labels, bad", [(np.array([0, 3, -1]), "-1"), (np.array([0, MAX_CLASSES]), f"{MAX_CLASSES:,}")])
def test_labels_outside_the_class_numbers_are_refused_before_anything_is_sized_by_them(labels, bad):
    with pytest.raises(InputError, match=f"split 'x': labels must be class numbers from 0 to {MAX_CLASSES - 1:,}, got {bad}"):
        classes_in(labels, "split 'x'")


def test_class_count_is_the_largest_label_plus_one_and_none_without_labels():
    assert classes_in(np.array([2, 0, 6, 1]), "x") == 7
    assert classes_in(np.array([MAX_CLASSES - 1]), "x") == MAX_CLASSES
    assert classes_in(np.zeros(0, dtype=np.int64), "x") is None


# --- joining rows with inputs -------------------------------------------------------------

def _rows(sizes: list[int], seed: int = 0) -> list[dict]:
    order = np.random.default_rng(seed).permutation(600)
    bounds = np.cumsum([0, *sizes])
    return [{"index": order[a:b], "batch": number} for number, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def test_rows_are_joined_in_place_with_the_inputs_of_their_stored_indices(tiny):
    rows = _rows([64, 64, 10])
    carried = {"index": np.array([1, 2]), "inputs": torch.zeros(2, 8)}  # rows that carry inputs pass as they are
    joined = list(joined_with_inputs([*rows, carried], tiny))
    assert [batch.get("batch") for batch in joined] == [0, 1, 2, None]
    for row, batch in zip(rows, joined):
        assert torch.equal(batch["inputs"], tiny.x[row["index"]])
    assert joined[-1] is carried


def test_dataloader_workers_pair_each_batch_with_its_own_rows_in_order(tiny):
    split = TorchDatasetSplit("train", Items(tiny))
    rows = _rows([50, 7, 64, 1, 33, 64])  # uneven batches, more than the workers, so they come back interleaved
    joined = list(joined_with_inputs(iter(rows), split, workers=2))
    assert [batch["batch"] for batch in joined] == list(range(len(rows)))
    for row, batch in zip(rows, joined):
        assert batch["index"] is row["index"]
        torch.testing.assert_close(batch["inputs"], tiny.x[row["index"]])


def test_a_split_that_returns_numpy_inputs_is_refused_with_the_fix(tiny):
    class NumpySplit:
        name, num_classes, labels = "train", 4, None

        def __len__(self):
            return 600

        def inputs(self, index):
            return tiny.x[index].numpy()

    with pytest.raises(InputError, match="Split.inputs must return a torch.Tensor, got numpy.ndarray .*torch.from_numpy"):
        inputs_at(NumpySplit(), np.arange(3))
    with pytest.raises(InputError, match="numpy.ndarray"):
        list(joined_with_inputs(_rows([4]), NumpySplit()))


# --- sequence lengths -----------------------------------------------------------------------

def test_a_split_without_lengths_has_every_position_valid(tiny):
    lengths = sequence_lengths(tiny, 12)
    assert lengths.dtype == np.int32 and lengths.shape == (600,) and (lengths == 12).all()


@pytest.mark.parametrize("lengths", [[3, 1, 5], [1, 1, 1]])
def test_lengths_within_the_positions_are_kept(lengths):
    split = TensorSplit("s", torch.zeros(3, 5, dtype=torch.int64), None, 10, lengths=np.array(lengths))
    assert sequence_lengths(split, 5).tolist() == lengths


@pytest.mark.parametrize("lengths", [[3, 0, 5], [3, 6, 5], [3, 5]])
def test_lengths_of_zero_past_the_positions_or_of_another_count_are_refused(lengths):
    split = TensorSplit("s", torch.zeros(3, 5, dtype=torch.int64), None, 10, lengths=np.array(lengths))
    with pytest.raises(InputError, match=r"split 's': lengths must be 3 whole numbers in \[1, 5\]"):
        sequence_lengths(split, 5)


# --- the fingerprint --------------------------------------------------------------------

def test_fingerprint_records_count_shape_and_hashes_of_every_label(tiny):
    found = fingerprint(tiny)
    assert found["num_samples"] == 600 and found["input_shape"] == [8] and found["lengths_sha256"] is None
    assert found["labels_sha256"] == hashlib.sha256(tiny.y.astype(np.int64).tobytes()).hexdigest()
    # the stored integer type does not matter: the labels are hashed as int64
    assert fingerprint(_with(tiny, y=tiny.y.astype(np.int32))) == found
    changed = tiny.y.copy()
    changed[301] = (changed[301] + 1) % 4
    other = fingerprint(_with(tiny, y=changed))
    assert other["labels_sha256"] != found["labels_sha256"] and other["inputs_sha256"] == found["inputs_sha256"]


@pytest.mark.parametrize("a, b", [(0, 599), (0, 1), (598, 599)])
def test_fingerprint_sees_rows_swapped_at_either_end(tiny, a, b):
    order = np.arange(600)
    order[[a, b]] = order[[b, a]]
    swapped = _with(tiny, x=tiny.x[order], y=tiny.y[order])
    assert fingerprint(swapped)["inputs_sha256"] != fingerprint(tiny)["inputs_sha256"]


def test_fingerprint_of_a_small_split_hashes_every_row(tiny):
    small = _with(tiny, x=tiny.x[:FINGERPRINT_ROWS], y=tiny.y[:FINGERPRINT_ROWS])
    reference = fingerprint(small)["inputs_sha256"]
    assert reference == hashlib.sha256(small.x.numpy().tobytes()).hexdigest()
    for row in range(FINGERPRINT_ROWS):
        x = small.x.clone()
        x[row, 3] += 0.5
        assert fingerprint(_with(small, x=x))["inputs_sha256"] != reference, row


def test_fingerprint_of_sequences_hashes_their_lengths_and_of_an_empty_split_is_defined():
    x = torch.arange(12).reshape(3, 4)
    split = TensorSplit("s", x, None, 12, lengths=np.array([4, 2, 1]))
    found = fingerprint(split)
    assert found["labels_sha256"] is None and found["input_shape"] == [4]
    assert found["lengths_sha256"] == hashlib.sha256(np.array([4, 2, 1], dtype=np.int64).tobytes()).hexdigest()
    assert fingerprint(_with(split, lengths=np.array([4, 2, 2])))["lengths_sha256"] != found["lengths_sha256"]
    empty = fingerprint(TensorSplit("e", torch.zeros(0, 4), np.zeros(0, dtype=np.int64), None))
    assert empty["num_samples"] == 0 and empty["inputs_sha256"] == hashlib.sha256(b"").hexdigest()


# --- SplitMix64 -----------------------------------------------------------------------------

def _splitmix64_reference(x: int) -> int:
    """SplitMix64's step and finaliser (Steele, Lea and Flood 2014), in Python integers mod 2**64."""
    mask = 2**64 - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference_generator_including_wrap_around():
    values = np.array([0, 1, 2, 0x9E3779B97F4A7C15, 2**63, 2**64 - 1, 123456789], dtype=np.uint64)
    hashed = splitmix64(values)
    assert hashed.dtype == np.uint64
    assert [int(h) for h in hashed] == [_splitmix64_reference(int(v)) for v in values]
    assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF  # the generator's published first output for seed 0
    assert int(splitmix64(np.uint64(0x9E3779B97F4A7C15))) == 0x6E789E6AA1B965F4  # and its second


def test_splitmix64_hashes_arrays_elementwise_and_scalars_without_overflow_errors():
    grid = np.arange(12, dtype=np.uint64).reshape(3, 4) * np.uint64(0xD1B54A32D192ED03)  # wraps around, as counters do
    hashed = splitmix64(grid)
    assert hashed.shape == (3, 4)
    assert hashed.tolist() == [[_splitmix64_reference(int(v)) for v in row] for row in grid]
    assert len(set(hashed.ravel().tolist())) == 12
    with np.errstate(over="raise"):  # numpy checks a scalar's wrap-around; the hash means it
        assert int(splitmix64(np.uint64(2**64 - 1))) == _splitmix64_reference(2**64 - 1)
