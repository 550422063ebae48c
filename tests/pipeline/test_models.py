"""pipeline.models: the built-in architectures, parametric ones, saved TorchScript and torch.export
programs and the user's factories, each resolved from its spec into a module of the right
outputs; and the specs and inputs they refuse. (hf: models are in test_hf.py.)"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch

from pipeline.models import BUILTIN_MODELS, PARAMETRIC_MODELS, resolve_model
from pipeline.specs import MODEL_FORMS, slug
from stages.errors import InputError
from tests.conftest import invoke, invoke_json


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_saved_programs_load_and_give_the_original_logits(tmp_path, kind):
    torch.manual_seed(0)
    original = resolve_model("mlp:width=16,depth=2", num_classes=3, input_shape=(8,)).eval()
    x = torch.randn(5, 8)
    path = tmp_path / ("model.pt" if kind == "torchscript" else "model.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "torchscript":
            torch.jit.save(torch.jit.trace(original, x), str(path))
        else:
            torch.export.save(torch.export.export(original, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    loaded = resolve_model(f"{kind}:{path}", num_classes=3, input_shape=(8,))
    loaded.eval()  # an exported program refuses eval() itself; the wrapper must not
    with torch.inference_mode():
        assert torch.equal(loaded(x), original(x))
        assert torch.equal(loaded(x[:2]), original(x[:2]))  # another batch size


def test_a_torchscript_teacher_caches_and_a_torchscript_student_trains(tmp_path):
    dataset = "synthetic:n=300,test=100,features=8,classes=3,seed=1"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in ("teacher", "student"):
            module = resolve_model("mlp:width=32,depth=1", num_classes=3, input_shape=(8,))
            torch.jit.save(torch.jit.script(module), str(tmp_path / f"{name}.pt"))
    cache = invoke_json("cache-teacher", "--teacher", f"torchscript:{tmp_path / 'teacher.pt'}", "--dataset", dataset,
                        "--device", "cpu", "--out", tmp_path / "c.zarr")
    assert cache["chunks_computed"] == cache["chunks_total"]
    run = invoke_json("train-student", "--cache", tmp_path / "c.zarr", "--student", f"torchscript:{tmp_path / 'student.pt'}",
                      "--epochs", 2, "--device", "cpu", "--out", tmp_path / "run")
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert run["test_accuracy"] is not None and losses[1] < losses[0]


def test_feature_targets_need_a_model_with_features_and_a_cache_with_them(tmp_path, cache_path, teacher_weights):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                          "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--features",
                          "--out", tmp_path / "f.zarr")
    assert code == 2 and "no features to cache" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("train-student", "--cache", cache_path, "--student", "mlp-64", "--feature-loss", "mse",
                          "--out", tmp_path / "r")
    assert code == 2 and "needs a cache with the teacher's features" in err
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "r").exists()


def test_default_output_names_come_from_the_named_files():
    # pipeline.specs.slug, for the model (and text dataset) specs that name files: kept here with
    # the model sources it was written for (test_specs.py is another module's test file).
    assert slug("hf:/models/minilm") == "hf-minilm"
    assert slug("torchscript:/models/teacher.pt") == "torchscript-teacher"
    assert slug("export:/models/teacher.pt2") == "export-teacher"
    assert slug("text:/data/docs.jsonl,tokenizer=hf:/models/minilm,max_length=64") == "text-docs"


# Each built-in and parametric model: a spec of it, the shape of one input, whether inputs are
# token ids, and the shape of its logits for a batch of 2 inputs and 7 classes.
MODELS = {
    "cnn": ("cnn", (3, 12, 20), False, (2, 7)),
    "mlp-64": ("mlp-64", (2, 3, 4), False, (2, 7)),
    "mlp-128": ("mlp-128", (2, 3, 4), False, (2, 7)),
    "mlp-400": ("mlp-400", (2, 3, 4), False, (2, 7)),
    "mlp-800": ("mlp-800", (2, 3, 4), False, (2, 7)),
    "linear": ("linear", (2, 3, 4), False, (2, 7)),
    "bytelm-teacher": ("bytelm-teacher", (20,), True, (2, 20, 7)),
    "bytelm-student": ("bytelm-student", (20,), True, (2, 20, 7)),
    "mlp": ("mlp:width=5,depth=3", (6,), False, (2, 7)),
    "bytelm": ("bytelm:dim=8,layers=1,heads=2", (9,), True, (2, 9, 7)),
    "lstm": ("lstm:vocab=30,dim=4,hidden=3", (9,), True, (2, 7)),
    "gpt2": ("gpt2:layers=1,dim=8,heads=2", (9,), True, (2, 9, 7)),
}


@pytest.mark.parametrize("name", [*BUILTIN_MODELS, *PARAMETRIC_MODELS])
def test_each_builtin_model_builds_for_its_inputs_with_logits_of_the_right_shape(name):
    if name not in MODELS:
        pytest.fail(f"the built-in model {name!r} has no expectations in this test: add them")
    spec, shape, tokens, logits_shape = MODELS[name]
    torch.manual_seed(0)
    model = resolve_model(spec, num_classes=7, input_shape=shape).eval()
    inputs = torch.randint(0, 7, (2, *shape)) if tokens else torch.rand(2, *shape)
    with torch.no_grad():
        assert model(inputs).shape == logits_shape
    linear = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if name.startswith("mlp-"):  # the name says the width of its two hidden layers
        assert linear == [int(name[4:])] * 2 + [7]
    elif name == "linear":  # one layer: logits straight from the flattened inputs
        assert linear == [7]


def test_an_lstm_pools_over_the_tokens_that_are_not_padding():
    torch.manual_seed(0)
    model = resolve_model("lstm:vocab=30,dim=4,hidden=3,pad=1", num_classes=5, input_shape=(6,)).eval()
    tokens = torch.tensor([[5, 9, 2, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # 3 tokens then padding; padding alone
    with torch.no_grad():
        logits, features = model.logits_and_features(tokens)
        states, _ = model.lstm(model.embedding(tokens))
    assert logits.shape == (2, 5) and features.shape == (2, 12)  # mean and max of both directions' states
    torch.testing.assert_close(features[0], torch.cat([states[0, :3].mean(0), states[0, :3].amax(0)]))
    assert torch.equal(features[1], torch.zeros(12))  # an all-padding row pools to zeros...
    torch.testing.assert_close(logits[1], model.head.bias.detach())  # ...and gets the head's bias
    torch.testing.assert_close(model(tokens), logits)


def test_an_lstm_refuses_token_ids_outside_its_vocabulary_and_float_inputs():
    model = resolve_model("lstm:vocab=10,dim=4,hidden=3", num_classes=2, input_shape=(3,))
    with pytest.raises(InputError, match="token id 10 is outside the lstm's vocabulary of 10"):
        model(torch.tensor([[3, 10, 0]]))
    with pytest.raises(InputError, match="an lstm model needs integer token ids as inputs"):
        model(torch.rand(1, 3))


@pytest.mark.parametrize(("spec", "shape", "words"), [
    ("cnn", (8,), "model 'cnn' needs image inputs (channels, height, width), got shape (8,)"),
    ("bytelm-student", (1, 8, 8), "a bytelm model needs token sequences (length,), got input shape (1, 8, 8)"),
    ("lstm", (2, 3), "an lstm model needs token sequences (length,), got input shape (2, 3)"),
])
def test_a_model_built_for_inputs_of_another_kind_is_refused_when_built(spec, shape, words):
    with pytest.raises(InputError) as caught:
        resolve_model(spec, num_classes=3, input_shape=shape)
    assert str(caught.value) == words


@pytest.mark.parametrize(("spec", "words"), [
    ("mlp:width=0", "model spec mlp:width=0: width, depth must be at least 1"),
    ("mlp:depth=0", "model spec mlp:depth=0: width, depth must be at least 1"),
    ("bytelm:heads=0", "model spec bytelm:heads=0: dim, layers, heads must be at least 1"),
    ("lstm:layers=0", "model spec lstm:layers=0: vocab, dim, hidden, layers must be at least 1"),
    ("lstm:pad=-1", "model spec lstm:pad=-1: vocab, dim, hidden, layers must be at least 1 and pad at least 0"),
    ("gpt2:vocab=-1", "model spec gpt2:vocab=-1: layers, dim, heads must be at least 1 and vocab at least 0"),
])
def test_parametric_models_refuse_sizes_below_one(spec, words):
    with pytest.raises(InputError) as caught:
        resolve_model(spec, num_classes=3, input_shape=(4,))
    assert str(caught.value).startswith(words)


def test_an_unknown_model_spec_names_every_builtin_and_form():
    with pytest.raises(InputError) as caught:
        resolve_model("resnet-9000", num_classes=3, input_shape=(4,))
    message = str(caught.value)
    assert message.startswith("unknown model spec 'resnet-9000'; use a built-in (")
    parametric = ["mlp:width=W,depth=D", "bytelm:dim=D,layers=L,heads=H", "lstm:vocab=V,dim=D,hidden=H,layers=L,pad=P",
                  "gpt2:layers=L,dim=D,heads=H,vocab=V"]
    for name in [*BUILTIN_MODELS, *parametric, *MODEL_FORMS]:
        assert name in message, name
    with pytest.raises(InputError, match="unknown model spec 'cnn:width=3'"):  # a fixed built-in takes no parameters
        resolve_model("cnn:width=3", num_classes=3, input_shape=(1, 8, 8))


def test_a_model_factory_that_fails_is_an_input_error_naming_it(tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        def build(num_classes):
            raise ValueError(f"no model for {num_classes} classes")
    """))
    spec = f"{tmp_path / 'mine.py'}:build"
    with pytest.raises(InputError) as caught:
        resolve_model(spec, num_classes=3, input_shape=(4,))
    assert str(caught.value) == f"model factory {spec!r} failed: ValueError: no model for 3 classes"


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_a_missing_or_unreadable_saved_program_is_an_input_error(tmp_path, kind):
    with pytest.raises(InputError) as caught:
        resolve_model(f"{kind}:{tmp_path / 'none.pt'}", num_classes=3, input_shape=(4,))
    assert str(caught.value) == f"{kind} model file not found: {tmp_path / 'none.pt'}"
    (tmp_path / "junk.pt").write_bytes(b"not a saved program")
    with pytest.raises(InputError, match=f"cannot load {kind} model {tmp_path / 'junk.pt'}: "):
        resolve_model(f"{kind}:{tmp_path / 'junk.pt'}", num_classes=3, input_shape=(4,))
