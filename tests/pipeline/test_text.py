"""pipeline.text: text classification sets from JSON lines or CSV, tokenized into padded token ids
by a checkpoint folder's tokenizer; and the standard library's docstrings as a real corpus."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pipeline import text
from pipeline.datasets import resolve_dataset
from stages.errors import InputError
from tests.conftest import invoke
from tests.pipeline.conftest import TEXTS


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


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


def test_texts_are_cut_or_padded_to_max_length_with_the_tokenizers_padding_id(tmp_path, bert_folder):
    folder, _, tokenizer = bert_folder
    long = "the cat sat on the mat and a dog ran in the park"
    path = _jsonl(tmp_path / "d.jsonl", [
        {"text": long, "label": "a", "split": "train"},
        {"text": "the cat", "label": "b", "split": "train"},
        {"text": "a dog", "label": "a", "split": "test"},
        {"text": "the mat", "label": "b", "split": "test"},
    ])
    data = resolve_dataset(f"text:{path},tokenizer=hf:{folder},max_length=6")
    train, test = data.split("train").inputs(np.arange(2)).numpy(), data.split("test").inputs(np.arange(2)).numpy()
    assert train.shape == (2, 6) and test.shape == (2, 6)  # every split max_length wide, not its longest text's width
    pad, cls, sep = tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
    # The long text is cut: its first words, between the tokenizer's own start and end tokens.
    assert train[0, 0] == cls and train[0, -1] == sep and pad not in train[0]
    assert tokenizer.decode(train[0].tolist(), skip_special_tokens=True) == "the cat sat on"
    # A short text keeps all its tokens and is padded after them with the padding id.
    assert train[1].tolist() == [cls, *tokenizer.convert_tokens_to_ids(["the", "cat"]), sep, pad, pad]
    assert [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in test] == ["a dog", "the mat"]
    assert (test[:, 4:] == pad).all()


def test_whole_number_labels_are_class_numbers_and_other_labels_are_numbered_in_sorted_order_over_every_split(tmp_path, bert_folder):
    folder, _, _ = bert_folder
    numbers = _jsonl(tmp_path / "numbers.jsonl", [
        {"text": "the cat", "label": 3, "split": "train"}, {"text": "a dog", "label": 0, "split": "train"},
        {"text": "the bank", "label": 1, "split": "test"},  # no row of class 2: still a class
    ])
    (tmp_path / "numbers.csv").write_text("text,label,split\nthe cat,3,train\na dog,0,train\nthe bank,1,test\n")
    for path in (numbers, tmp_path / "numbers.csv"):  # CSV gives the numbers as strings
        data = resolve_dataset(f"text:{path},tokenizer=hf:{folder},max_length=4")
        train, test = data.split("train"), data.split("test")
        assert train.labels.tolist() == [3, 0] and test.labels.tolist() == [1], path
        assert train.num_classes == test.num_classes == 4 and train.class_names == ("0", "1", "2", "3")
    names = _jsonl(tmp_path / "names.jsonl", [
        {"text": "the cat", "label": "cat", "split": "train"}, {"text": "a dog", "label": "bird", "split": "train"},
        {"text": "the bank", "label": "ant", "split": "test"},  # a class only the test split has
    ])
    data = resolve_dataset(f"text:{names},tokenizer=hf:{folder},max_length=4")
    train, test = data.split("train"), data.split("test")
    assert train.class_names == test.class_names == ("ant", "bird", "cat")
    assert train.labels.tolist() == [2, 1] and test.labels.tolist() == [0]
    assert train.num_classes == test.num_classes == 3


def test_rows_without_labels_make_an_unlabeled_split_and_a_split_mixing_both_is_refused(tmp_path, bert_folder):
    folder, _, _ = bert_folder
    transfer = _jsonl(tmp_path / "transfer.jsonl", [
        {"text": "the cat", "label": "animals", "split": "train"}, {"text": "the bank", "label": "money", "split": "train"},
        {"text": "a dog", "split": "test"}, {"text": "the mat", "split": "test"},
    ])
    data = resolve_dataset(f"text:{transfer},tokenizer=hf:{folder},max_length=4")
    assert data.split("test").labels is None and len(data.split("test")) == 2
    assert data.split("train").labels.tolist() == [0, 1]
    mixed = _jsonl(tmp_path / "mixed.jsonl", [
        {"text": "the cat", "label": "animals", "split": "train"}, {"text": "the bank", "split": "train"},
    ])
    code, _, err = invoke("train-student", "--student", "mlp-64", "--dataset", f"text:{mixed},tokenizer=hf:{folder}",
                          "--out", tmp_path / "r")
    assert code == 2
    assert err.strip().splitlines() == [f"error: {mixed}: split 'train' has rows with and without a 'label' field"]


def test_a_csv_keeps_commas_and_line_breaks_inside_quoted_texts_and_reads_empty_cells_as_missing(tmp_path, bert_folder):
    folder, _, tokenizer = bert_folder
    path = tmp_path / "d.csv"
    path.write_text('text,label,split\n"the cat, the dog\nran",animals,train\nthe bank,money,train\n'
                    'a dog,,test\n"stocks fell,\nmarkets closed",,test\n')
    data = resolve_dataset(f"text:{path},tokenizer=hf:{folder},max_length=12")
    train, test = data.split("train"), data.split("test")
    assert (len(train), len(test)) == (2, 2)
    expected = tokenizer(["the cat, the dog\nran", "the bank"], padding="max_length", max_length=12, return_tensors="np")
    assert np.array_equal(train.inputs(np.arange(2)).numpy(), expected["input_ids"])
    assert train.class_names == ("animals", "money") and test.labels is None  # an empty cell is no label, not a class ""


@pytest.mark.parametrize(("spec", "words"), [
    ("text:{missing},tokenizer=hf:tok,max_length=0", "max_length must be a whole number of at least 1"),
    ("text:{missing},tokenizer=hf:tok,max_length=ten", "max_length must be a whole number of at least 1"),
    ("text:{missing},tokenizer=hf:tok,colour=blue", "bad option 'colour=blue'; options are tokenizer, max_length, text, label, split"),
    ("text:{missing},tokenizer=hf:tok,label", "bad option 'label'; options are tokenizer, max_length, text, label, split"),
    ("text:,tokenizer=hf:tok", "PATH is missing"),
])
def test_text_spec_options_are_checked_before_any_file_is_read(tmp_path, spec, words):
    with pytest.raises(InputError) as caught:
        resolve_dataset(spec.format(missing=tmp_path / "missing.jsonl")).split("train")
    assert words in str(caught.value)


FINE = {"text": "the cat", "label": "a", "split": "train"}


def _file(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    _jsonl(path / "valid.jsonl", [FINE])  # a split the folder form does not read
    return path


# Each case: the test's folder -> (the text file or folder, its tokenizer spec or None for the
# BERT folder's, the error line after "error: " with {path} for the file).
TEXT_FILE_CASES = {
    "not .jsonl or .csv": lambda t: (_file(t / "d.txt", json.dumps(FINE) + "\n"), None,
                                     "{path}: a text dataset is a .jsonl or .csv file"),
    "row without a split": lambda t: (_jsonl(t / "d.jsonl", [FINE, {"text": "a dog", "label": "a"}]), None,
                                      "{path}: row 2 has no 'split' field naming its split (train or test)"),
    "row without a text": lambda t: (_jsonl(t / "d.jsonl", [FINE, {"body": "a dog", "label": "a", "split": "train"}]), None,
                                     "{path}: row 2 of split 'train' has no text field 'text'"),
    "line not an object": lambda t: (_file(t / "d.jsonl", json.dumps(FINE) + '\n["the cat", "a", "train"]\n'), None,
                                     "{path}: line 2 is not a JSON object"),
    "folder without split files": lambda t: (_folder(t / "texts"), None,
                                             "{path}: no train.jsonl, test.jsonl, train.csv or test.csv in this folder"),
    "labels of another type": lambda t: (_jsonl(t / "d.jsonl", [FINE, {"text": "a dog", "label": 1.5, "split": "train"}]), None,
                                         "{path}: labels must be whole numbers or strings"),
    "empty split file": lambda t: (_file(_folder(t / "texts") / "train.jsonl", ""), None, None),
    "tokenizer not a folder": lambda t: (_jsonl(t / "d.jsonl", [FINE]), "bert-base-uncased",
                                         "tokenizer 'bert-base-uncased': give a Hugging Face tokenizer folder as hf:FOLDER"),
}


@pytest.mark.parametrize("case", list(TEXT_FILE_CASES))
def test_text_files_that_cannot_give_labelled_texts_per_split_are_one_line_errors(tmp_path, bert_folder, case):
    folder, _, _ = bert_folder
    path, tokenizer, message = TEXT_FILE_CASES[case](tmp_path)
    if message is None:  # the split file given by the case, empty
        path, message = path.parent, f"split 'train' of dataset text:{path.parent},tokenizer=hf:{folder} is empty"
    code, _, err = invoke("train-student", "--student", "mlp-64", "--dataset", f"text:{path},tokenizer={tokenizer or f'hf:{folder}'}",
                          "--out", tmp_path / "r")
    assert code == 2 and err.strip().splitlines() == [f"error: {message.format(path=path)}"], err
    assert not (tmp_path / "r").exists()


def test_the_stdlib_docstring_corpus_is_deterministic_and_keeps_each_class_on_one_side(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "DOCSTRING_PACKAGES", ("email", "http", "urllib"))  # three packages: fast enough
    counts = text.write_stdlib_docstrings(tmp_path / "a" / "docs.jsonl")
    text.write_stdlib_docstrings(tmp_path / "docs-again.jsonl")
    assert (tmp_path / "a" / "docs.jsonl").read_bytes() == (tmp_path / "docs-again.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "docs.jsonl").read_text().splitlines()]
    assert {split: {label: sum(1 for r in rows if (r["split"], r["label"]) == (split, label)) for label in counts[split]}
            for split in counts} == counts
    assert {r["label"] for r in rows} == {"email", "http", "urllib"}
    assert all(r["source"].split(".")[0] == r["label"] for r in rows)  # labelled by the package it comes from
    assert len({r["text"] for r in rows}) == len(rows)  # no text twice
    assert all(text.DOCSTRING_MIN_CHARS <= len(r["text"]) <= text.DOCSTRING_MAX_CHARS for r in rows)
    for label in ("email", "http", "urllib"):
        total = counts["train"][label] + counts["test"][label]
        assert 0 < counts["test"][label] <= round(text.TEST_FRACTION * total), label
    # A class or function of a module is on one side with all its methods and inner functions.
    root = Path(sysconfig.get_paths()["stdlib"])
    side = {r["source"]: r["split"] for r in rows}
    modules = {name for name in side if (root / Path(*name.split("."))).with_suffix(".py").is_file()
               or (root / Path(*name.split(".")) / "__init__.py").is_file()}
    members = [(outer, inner) for outer in side.keys() - modules for inner in side if inner.startswith(outer + ".")]
    assert len(members) > 100  # classes with methods in both sides' packages: the check has something to check
    assert [(outer, inner) for outer, inner in members if side[outer] != side[inner]] == []
