"""pipeline.datasets: each built-in dataset resolves into its documented splits, data files and
factories into theirs, and a spec that cannot is one line naming what is wrong. (The built-ins'
finer properties are in test_specs.py; text datasets are in test_text.py.)"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from pipeline.datasets import BUILTIN_DATASETS, resolve_dataset
from tests.conftest import invoke

# Each built-in (text has its own tests): a spec of it, (train rows, test rows) where fixed,
# the shape and dtype of one input, and the number of classes.
BUILTINS = {
    "mnist-5k": ("mnist-5k", (4000, 1000), (1, 28, 28), torch.float32, 10),
    "digits": ("digits", (1438, 359), (1, 8, 8), torch.float32, 10),
    "synthetic": ("synthetic:n=50,test=10,features=3,classes=5,seed=1", (50, 10), (3,), torch.float32, 5),
    "stdlib-bytes": ("stdlib-bytes:seq=16,train=2000,test=500", None, (16,), torch.int64, 256),
}


# text:, corpus:, chat: and tokens: read the user's files through a tokenizer: tests/pipeline/test_text.py,
# test_corpus.py and test_tokens.py.
@pytest.mark.parametrize("name", [name for name in BUILTIN_DATASETS if name not in ("text", "corpus", "chat", "tokens")])
def test_each_builtin_dataset_resolves_into_train_and_test_splits_of_its_shape_and_classes(name):
    if name not in BUILTINS:
        pytest.fail(f"the built-in dataset {name!r} has no expectations in this test: add them")
    spec, sizes, shape, dtype, classes = BUILTINS[name]
    data = resolve_dataset(spec)
    splits = {split: data.split(split) for split in ("train", "test")}
    for split_name, split in splits.items():
        inputs = split.inputs(np.arange(len(split)))
        assert split.name == split_name and split.num_classes == classes
        assert tuple(inputs.shape) == (len(split), *shape) and inputs.dtype == dtype
        labels = np.asarray(split.labels)
        assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < classes
        lengths = getattr(split, "lengths", None)
        if dtype == torch.int64:  # sequences of tokens: a target per token, and each row's valid tokens
            assert labels.shape == (len(split), *shape) and inputs.min() >= 0 and inputs.max() < classes
            assert lengths.shape == (len(split),) and lengths.min() >= 1 and lengths.max() <= shape[0]
        else:  # one label per sample, every class among the training rows
            assert labels.shape == (len(split),) and lengths is None
            if split_name == "train":
                assert set(labels.tolist()) == set(range(classes))
        if name in ("mnist-5k", "digits"):  # pixels scaled to [0, 1]
            assert 0.0 == float(inputs.min()) and float(inputs.max()) == 1.0
    if sizes is not None:
        assert (len(splits["train"]), len(splits["test"])) == sizes
    else:  # byte budgets: each split holds about its budget of text, less a byte per file for targets
        for split, budget in (("train", 2000), ("test", 500)):
            assert budget - 20 <= splits[split].lengths.sum() < budget, split


# Each case: the test's folder -> (dataset spec, words of the one error line).
BAD_SPECS = {
    "unknown name": lambda t: ("imagenet-99", "unknown dataset spec 'imagenet-99'; use a built-in "
                               f"({', '.join(BUILTIN_DATASETS)}), a .npz file, package.module:factory "
                               "or path/to/file.py:factory"),
    "synthetic with one class": lambda t: ("synthetic:classes=1", "synthetic dataset: need n >= 1, test >= 0, features >= 1, classes >= 2"),
    "synthetic without training rows": lambda t: ("synthetic:n=0", "synthetic dataset: need n >= 1"),
    "synthetic with an empty test split": lambda t: ("synthetic:n=20,test=0", "split 'test' of dataset synthetic:n=20,test=0 is empty"),
    "stdlib-bytes of one byte": lambda t: ("stdlib-bytes:train=1", "stdlib-bytes dataset: need seq >= 1, train >= 2, test >= 0"),
    "npz without inputs": lambda t: (_npz(t, y_train=np.arange(4)), "has no x_train or x_test array"),
    "npz of strings": lambda t: (_npz(t, x_train=np.array([["a", "b"]] * 4)), "x_train must be numeric, got <U1"),
    "npz without a train split": lambda t: (_npz(t, x_test=np.ones((4, 2)), y_test=np.arange(4)), "has no split 'train'"),
    "factory that fails": lambda t: (_factory(t, "raise ValueError('no such data')"),
                                     "failed for split 'train': ValueError: no such data"),
    "parameters of a fixed built-in": lambda t: ("digits:n=100", "dataset digits takes no parameters, got digits:n=100"),
    "factory of something that is no dataset": lambda t: (_factory(t, "return 42"), "returned int, not a map-style Dataset"),
}


def _npz(folder, **arrays) -> str:
    np.savez(folder / "d.npz", **arrays)
    return str(folder / "d.npz")


def _factory(folder, body: str) -> str:
    (folder / "data.py").write_text(textwrap.dedent(f"""
        def make(split):
            {body}
    """))
    return f"{folder / 'data.py'}:make"


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_dataset_spec_that_gives_no_usable_split_is_a_one_line_error(tmp_path, case):
    spec, words = BAD_SPECS[case](tmp_path)
    code, _, err = invoke("train-student", "--student", "mlp-64", "--dataset", spec, "--out", tmp_path / "r")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "r").exists()


def test_an_npz_gives_float32_inputs_of_its_shape_and_the_class_count_of_all_its_splits(tmp_path):
    x = np.arange(10 * 2 * 3, dtype=np.uint8).reshape(10, 2, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(10) % 3, x_test=x[:4], y_test=np.array([0, 4, 1, 2]))
    data = resolve_dataset(str(tmp_path / "d.npz"))
    train, test = data.split("train"), data.split("test")
    assert train.inputs(np.arange(10)).dtype == torch.float32
    assert torch.equal(train.inputs(np.array([7, 2])), torch.from_numpy(x[[7, 2]].astype(np.float32)))
    assert train.num_classes == test.num_classes == 5  # class 4 appears in the test split only
    assert train.labels.tolist() == (np.arange(10) % 3).tolist() and test.labels.tolist() == [0, 4, 1, 2]
