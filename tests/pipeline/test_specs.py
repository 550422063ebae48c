"""Resolving dataset and model specs: built-ins, the user's files and modules, safe weights."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from pipeline.datasets import BUILTIN_DATASETS, dataset_runs_user_code, resolve_dataset
from pipeline.models import BUILTIN_MODELS, resolve_model
from pipeline.specs import DATASET_BUILTINS_HELP, BuiltinSpec, FactorySpec, FileSpec, parse_spec, runs_user_code
from stages.data import fingerprint
from stages.errors import InputError
from stages.weights import load_weights, save_weights


def test_mnist_5k_is_a_fixed_4000_1000_split():
    data = resolve_dataset("mnist-5k")
    train, test = data.split("train"), data.split("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape[1:] == (1, 28, 28) and 0 <= float(train.x.min()) and float(train.x.max()) <= 1
    assert np.bincount(np.concatenate([train.labels, test.labels])).tolist() == [500] * 10
    # disjoint: no test image appears among the training images
    train_rows = {row.tobytes() for row in train.x.reshape(4000, -1).numpy()}
    assert not any(row.tobytes() in train_rows for row in test.x.reshape(1000, -1).numpy())
    assert fingerprint(train) == fingerprint(resolve_dataset("mnist-5k").split("train"))


def test_digits_builtin():
    train = resolve_dataset("digits").split("train")
    assert train.x.shape[1:] == (1, 8, 8) and train.num_classes == 10 and len(train) == 1438


def test_synthetic_is_seeded_and_configurable():
    a = resolve_dataset("synthetic:n=50,test=10,features=3,classes=5,seed=1").split("train")
    b = resolve_dataset("synthetic:n=50,test=10,features=3,classes=5,seed=1").split("train")
    c = resolve_dataset("synthetic:n=50,test=10,features=3,classes=5,seed=2").split("train")
    assert a.inputs(np.arange(50)).shape == (50, 3) and a.num_classes == 5
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    # rows are a pure function of their number: any subset, in any order, reads the same
    torch.testing.assert_close(a.inputs(np.array([7, 3])), a.inputs(np.arange(10))[[7, 3]])
    test = resolve_dataset("synthetic:n=50,test=10,features=3,classes=5,seed=1").split("test")
    assert not torch.equal(test.inputs(np.arange(3)), a.inputs(np.arange(3)))  # test rows are other rows


def test_synthetic_inputs_look_like_the_gaussian_model():
    from pipeline.datasets import _hashed_normals

    z = _hashed_normals(3, np.arange(20000), 8)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.03
    with pytest.raises(InputError, match="bad parameter"):
        resolve_dataset("synthetic:size=3").split("train")


def test_npz_with_and_without_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "l.npz", x_train=x, y_train=np.arange(20) % 3, x_test=x[:5], y_test=np.zeros(5, dtype=np.int64))
    train = resolve_dataset(str(tmp_path / "l.npz")).split("train")
    assert train.num_classes == 3 and torch.equal(train.inputs(np.array([4, 2])), torch.from_numpy(x[[4, 2]]))
    np.savez(tmp_path / "u.npz", x_train=x)
    unlabeled = resolve_dataset(str(tmp_path / "u.npz")).split("train")
    assert unlabeled.labels is None and fingerprint(unlabeled)["labels_sha256"] is None


def test_npz_refuses_pickles_and_bad_labels(tmp_path):
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="cannot read"):
        resolve_dataset(str(tmp_path / "obj.npz")).split("train")
    np.savez(tmp_path / "neg.npz", x_train=np.zeros((3, 2)), y_train=np.array([0, -1, 1]))
    with pytest.raises(InputError, match="non-negative integer labels"):
        resolve_dataset(str(tmp_path / "neg.npz")).split("train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        resolve_dataset(str(tmp_path / "junk.npz")).split("train")


def test_dataset_factory_from_a_user_file(tmp_path):
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import torch
        class Squares(torch.utils.data.Dataset):
            def __init__(self, n): self.n = n
            def __len__(self): return self.n
            def __getitem__(self, i): return torch.full((3,), float(i)), i % 2
        def make(split):
            return {"train": Squares(10), "test": Squares(4)}.get(split)
    """))
    data = resolve_dataset(f"{tmp_path / 'mydata.py'}:make")
    train = data.split("train")
    assert len(train) == 10 and train.num_classes == 2 and train.labels.tolist() == [0, 1] * 5
    assert train.inputs(np.array([3, 7]))[:, 0].tolist() == [3.0, 7.0]
    with pytest.raises(InputError, match="no split 'valid'"):
        data.split("valid")


def test_model_factory_from_a_module_gets_input_shape_when_it_asks(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import math
        from torch import nn
        def wide(num_classes, input_shape):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        def not_a_module(num_classes):
            return "nope"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = resolve_model("my_models:wide", num_classes=3, input_shape=(2, 5))
    assert model(torch.zeros(4, 2, 5)).shape == (4, 3)
    with pytest.raises(InputError, match="not a torch.nn.Module"):
        resolve_model("my_models:not_a_module", num_classes=3, input_shape=(2, 5))
    with pytest.raises(InputError, match="has no callable 'missing'"):
        resolve_model("my_models:missing", num_classes=3, input_shape=(2, 5))


@pytest.mark.parametrize("name", [name for name in BUILTIN_MODELS if not name.startswith("bytelm")])
def test_builtin_image_models_output_logits(name):
    model = resolve_model(name, num_classes=7, input_shape=(1, 28, 28))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", ["bytelm-teacher", "bytelm-student", "bytelm:dim=24,layers=3,heads=3"])
def test_builtin_language_models_predict_every_next_token(name):
    model = resolve_model(name, num_classes=256, input_shape=(20,)).eval()
    tokens = torch.randint(0, 256, (3, 20))
    logits = model(tokens)
    assert logits.shape == (3, 20, 256)
    # Causal: changing a later token never changes an earlier position's prediction.
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :12], logits[:, :12].detach())
        assert not torch.allclose(model(changed)[:, 12:], logits[:, 12:])


def test_stdlib_bytes_is_next_byte_prediction_on_real_source():
    split = resolve_dataset("stdlib-bytes:seq=32,train=5000,test=1000").split("train")
    assert split.num_classes == 256 and split.x.dtype == torch.int64 and split.labels.shape == (len(split), 32)
    text = b"".join(bytes(row[:n].tolist()) for row, n in zip(split.x, split.lengths))
    assert b"def " in text and b"import " in text  # Python source
    valid = np.arange(32)[None, :] < split.lengths[:, None]
    # Targets are the inputs shifted by one byte; within a row that is exact.
    np.testing.assert_array_equal(split.labels[:, :-1][valid[:, 1:]], split.x.numpy()[:, 1:][valid[:, 1:]])
    assert 4990 <= split.lengths.sum() < 5000  # each file's text of n bytes gives n - 1 targets
    assert (split.x.numpy()[~valid] == 0).all() and (split.labels[~valid] == 0).all()
    test = resolve_dataset("stdlib-bytes:seq=32,train=5000,test=1000").split("test")
    assert not set(map(bytes, test.x[:5].tolist())) & set(map(bytes, split.x.tolist()))  # other files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_safely(tmp_path, suffix):
    source = resolve_model("mlp-64", num_classes=3, input_shape=(4,))
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_weights(source, path)
    target = resolve_model("mlp-64", num_classes=3, input_shape=(4,), weights=path)
    x = torch.randn(5, 4)
    torch.testing.assert_close(target(x), source(x))


def test_pickled_objects_in_weights_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="cannot read weights"):
        load_weights(resolve_model("linear", num_classes=2, input_shape=(2,)), tmp_path / "evil.pt")


def test_parameterised_mlp():
    model = resolve_model("mlp:width=32,depth=3", num_classes=5, input_shape=(7,))
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [32, 32, 32, 5]
    with pytest.raises(InputError, match="width must be a whole number"):
        resolve_model("mlp:width=wide", num_classes=5, input_shape=(7,))


@pytest.mark.parametrize("spec, parsed", [
    ("cnn", BuiltinSpec("cnn")),
    ("mlp:width=32,depth=3", BuiltinSpec("mlp", "width=32,depth=3")),
    ("hf:models/minilm", FileSpec("hf", "models/minilm")),
    ("torchscript:t.pt", FileSpec("torchscript", "t.pt")),
    ("text:docs.jsonl,tokenizer=hf:tok,max_length=64", FileSpec("text", "docs.jsonl", ("tokenizer=hf:tok", "max_length=64"))),
    ("data/set.npz", FileSpec("npz", "data/set.npz")),
    ("pkg.models:build", FactorySpec("pkg.models", "build")),
    ("mine/models.py:build", FactorySpec("mine/models.py", "build")),
])
def test_one_grammar_reads_every_form_and_writes_it_back(spec, parsed):
    assert parse_spec(spec) == parsed and str(parsed) == spec


def test_a_parametric_builtin_is_never_read_as_user_code():
    assert parse_spec("synthetic:seed", BUILTIN_DATASETS) == BuiltinSpec("synthetic", "seed")
    assert not dataset_runs_user_code("synthetic:seed") and dataset_runs_user_code("pkg.data:build")
    assert runs_user_code("shift:2+pkg.aug:build") and not runs_user_code("shift:2+flip")


def test_relative_files_become_absolute_and_nothing_else_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(parse_spec("text:d.jsonl,tokenizer=hf:tok").absolute()) == f"text:{tmp_path / 'd.jsonl'},tokenizer=hf:{tmp_path / 'tok'}"
    assert str(parse_spec("mine.py:build").absolute()) == f"{tmp_path / 'mine.py'}:build"
    for spec in ("mlp:width=3", "pkg.models:build", "digits"):
        assert str(parse_spec(spec).absolute()) == spec


def test_help_names_every_builtin_dataset():
    assert [name.partition("[")[0].partition(":")[0] for name in DATASET_BUILTINS_HELP] == list(BUILTIN_DATASETS)
