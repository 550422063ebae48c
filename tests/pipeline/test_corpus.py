"""Language-modelling corpora (pipeline.corpus): real documents in a temporary folder, tokenized by
the byte-level BPE trained on the standard library (built once per session, 512 tokens) and by
small word-level and BERT tokenizers whose ids are known, then packed into next-token rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.corpus import END_OF_TEXT, corpus_splits, stdlib_corpus, stdlib_tokenizer
from pipeline.datasets import resolve_dataset
from pipeline.specs import FileSpec, parse_spec
from stages.data import fingerprint
from stages.errors import InputError
from tests.conftest import invoke_json

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    "def greet(name):\n    return f'Hello, {name}!'\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé too: naïve café.",
    "import os\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="session")
def stdlib_512(tmp_path_factory) -> Path:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tokenizers") / "stdlib-512", vocab=512)


def load(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def word_tokenizer(folder: Path, words: list[str], **special: str) -> Path:
    """A word-level tokenizer folder: <pad> 0, <unk> 1, then the `special` tokens (eos_token=...),
    then `words`, in order: the ids of a text are known from the list."""
    names = ["<pad>", "<unk>", *special.values(), *words]
    model = tokenizers.models.WordLevel({name: number for number, name in enumerate(names)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", **special) \
        .save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    return folder


def stream_of(split) -> np.ndarray:
    """The token stream a split was packed from: the first input, then every valid target."""
    x = split.inputs(np.arange(len(split))).numpy()
    return np.concatenate([x[0, :1], *(split.labels[r, : split.lengths[r]] for r in range(len(split)))])


def documents_of(split, tokenizer) -> list[str]:
    """The split's documents, as its stream decodes (every document ends with <|endoftext|>)."""
    text = tokenizer.decode(stream_of(split).tolist())
    assert text.endswith(END_OF_TEXT)
    return text.split(END_OF_TEXT)[:-1]


def test_rows_are_the_stream_of_documents_each_ended_by_eos_shifted_by_one_and_stepping_seq(tmp_path, stdlib_512):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in DOCUMENTS])
    seq = 8
    train = resolve_dataset(f"corpus:{path},tokenizer=hf:{stdlib_512},seq={seq},test=0").split("train")
    tokenizer = load(stdlib_512)
    expected = np.concatenate([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                               for text in DOCUMENTS])
    # The stream holds every document in order with <|endoftext|> after each, and every token but
    # the first is a target exactly once.
    np.testing.assert_array_equal(stream_of(train), expected)
    assert tokenizer.decode(expected.tolist()) == "".join(text + END_OF_TEXT for text in DOCUMENTS)
    x = train.inputs(np.arange(len(train))).numpy()
    assert x.dtype == np.int64 and train.labels.dtype == np.int64 and x.shape == train.labels.shape == (len(train), seq)
    assert len(train) == -(-(len(expected) - 1) // seq)
    for row in range(len(train)):
        valid = train.lengths[row]
        np.testing.assert_array_equal(x[row, :valid], expected[row * seq : row * seq + valid])
        np.testing.assert_array_equal(train.labels[row, :valid], expected[row * seq + 1 : row * seq + 1 + valid])
    np.testing.assert_array_equal(x[1:, 0], train.labels[:-1, -1])  # row r+1 starts where row r's targets end
    assert train.num_classes == len(tokenizer) == 512
    assert train.source_sha256 is not None and fingerprint(train)["source_sha256"] == train.source_sha256


def test_the_last_row_is_padded_with_the_pad_id_and_its_length_kept_and_no_special_tokens_are_added(tmp_path):
    """A BERT tokenizer adds [CLS] and [SEP] of its own and has no eos: the documents are
    tokenized without them and ended by [SEP]; its [PAD] is id 4, so padding shows."""
    folder = tmp_path / "bert"
    vocabulary = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "the", "cat", "sat", "on", "mat"]
    transformers.BertTokenizerFast(vocab={word: number for number, word in enumerate(vocabulary)}).save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "doc.txt").write_text("the cat sat on the mat")
    train = corpus_splits(f"{tmp_path / 'doc.txt'},tokenizer=hf:{folder},seq=4,test=0")["train"]
    # stream: the cat sat on the mat [SEP] = 5 6 7 8 5 9 2: 6 targets in rows of 4
    np.testing.assert_array_equal(train.inputs(np.arange(2)).numpy(), [[5, 6, 7, 8], [5, 9, 4, 4]])
    np.testing.assert_array_equal(train.labels, [[6, 7, 8, 5], [9, 2, 0, 0]])
    np.testing.assert_array_equal(train.lengths, [4, 2])
    assert train.num_classes == len(vocabulary)

    # One short row when the documents hold fewer than seq targets.
    short = corpus_splits(f"{tmp_path / 'doc.txt'},tokenizer=hf:{folder},seq=64,test=0")["train"]
    assert len(short) == 1 and short.lengths.tolist() == [6] and short.inputs(np.arange(1)).numpy()[0, 6:].tolist() == [4] * 58


def many_documents(count: int = 120) -> list[str]:
    # One repeated twice: identical documents must land in one split.
    return [f"Document {n}: {' '.join(f'word{(n * 7 + k) % 31}' for k in range(n % 9 + 3))}." for n in range(count)] + \
           ["Document 5: a repeated one."] * 2


def test_the_test_split_takes_whole_documents_by_a_hash_of_their_text_the_same_in_every_process(tmp_path, stdlib_512):
    texts = many_documents()
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in texts])
    spec = f"corpus:{path},tokenizer=hf:{stdlib_512},seq=16,test=20"
    data = resolve_dataset(spec)
    tokenizer = load(stdlib_512)
    train, test = documents_of(data.split("train"), tokenizer), documents_of(data.split("test"), tokenizer)
    assert sorted(train + test) == sorted(texts)  # every document whole, once
    assert not set(train) & set(test)  # none on both sides, the repeated one included
    assert 0.08 < len(test) / len(texts) < 0.35
    assert [t for t in texts if t in set(test)] == test  # in corpus order

    # A document's split depends on its text alone: reordered and in another file, the same split.
    reordered = write_jsonl(tmp_path / "other" / "reordered.jsonl", [{"text": text} for text in reversed(texts)])
    again = resolve_dataset(f"corpus:{reordered},tokenizer=hf:{stdlib_512},seq=16,test=20").split("test")
    assert sorted(documents_of(again, tokenizer)) == sorted(test)

    # ... and the same in another process, whose str hashes are salted differently.
    code = ("import sys; from pipeline.datasets import resolve_dataset; from stages.data import fingerprint;"
            "print(fingerprint(resolve_dataset(sys.argv[1]).split('test'))['labels_sha256'])")
    out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == fingerprint(data.split("test"))["labels_sha256"]


def test_the_fingerprint_tells_two_tokenizers_apart_even_when_the_token_ids_agree(tmp_path):
    """Two vocabularies that differ only in a word the corpus never uses give the same ids; only
    the tokenizer's hash tells the splits apart, so a cache made through one is refused for the other."""
    (tmp_path / "doc.txt").write_text("a b a c b a")
    one = word_tokenizer(tmp_path / "one", ["a", "b", "c", "dog"], eos_token="<eos>")
    other = word_tokenizer(tmp_path / "other", ["a", "b", "c", "cat"], eos_token="<eos>")
    same = tmp_path / "same"
    shutil.copytree(one, same)
    splits = {name: corpus_splits(f"{tmp_path / 'doc.txt'},tokenizer=hf:{folder},seq=4,test=0")["train"]
              for name, folder in {"one": one, "other": other, "same": same}.items()}
    np.testing.assert_array_equal(splits["one"].labels, splits["other"].labels)
    assert splits["one"].inputs(np.arange(2)).equal(splits["other"].inputs(np.arange(2)))
    assert fingerprint(splits["one"]) != fingerprint(splits["other"])
    assert fingerprint(splits["one"]) == fingerprint(splits["same"])  # a copy of one tokenizer is the same one

    other_seq = corpus_splits(f"{tmp_path / 'doc.txt'},tokenizer=hf:{one},seq=2,test=0")["train"]
    assert other_seq.source_sha256 != splits["one"].source_sha256  # the row length is part of the hash


def test_max_tokens_caps_each_splits_stream_to_a_prefix(tmp_path, stdlib_512):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in many_documents()])
    full = corpus_splits(f"{path},tokenizer=hf:{stdlib_512},seq=16,test=20")
    capped = corpus_splits(f"{path},tokenizer=hf:{stdlib_512},seq=16,test=20,max_tokens=100")
    assert len(stream_of(capped["train"])) == 100 and len(stream_of(capped["test"])) == 20
    for split in ("train", "test"):
        kept = stream_of(capped[split])
        np.testing.assert_array_equal(kept, stream_of(full[split])[: len(kept)])
    assert capped["train"].lengths.tolist() == [16] * 6 + [3]  # 99 targets


def test_a_jsonl_corpus_takes_the_named_field(tmp_path, stdlib_512):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": text, "text": "not this"} for text in DOCUMENTS])
    train = corpus_splits(f"{path},tokenizer=hf:{stdlib_512},seq=8,test=0,field=body")["train"]
    assert documents_of(train, load(stdlib_512)) == DOCUMENTS
    default = corpus_splits(f"{path},tokenizer=hf:{stdlib_512},seq=8,test=0")["train"]
    assert documents_of(default, load(stdlib_512)) == ["not this"] * len(DOCUMENTS)


def test_a_folder_is_every_txt_and_jsonl_file_under_it_in_sorted_path_order(tmp_path, stdlib_512):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "z.txt").write_text("last file")
    (root / "b" / "deep" / "zz.txt").write_text("deep file\nwith two lines\n")
    write_jsonl(root / "b" / "lines.jsonl", [{"text": "line one"}, {"text": ""}, {"text": "line two"}])
    (root / "a.txt").write_text("first file")
    (root / "notes.md").write_text("not a corpus file")
    (root / "empty.txt").write_text("")
    train = resolve_dataset(f"corpus:{root},tokenizer=hf:{stdlib_512},seq=8,test=0").split("train")
    assert documents_of(train, load(stdlib_512)) == ["first file", "deep file\nwith two lines\n", "line one", "line two",
                                                     "last file"]


def test_the_spec_names_its_files_absolutely_and_resolves_through_the_cli(tmp_path, stdlib_512, monkeypatch):
    assert parse_spec("corpus:docs,tokenizer=hf:tok,seq=8,test=10") == \
        FileSpec("corpus", "docs", ("tokenizer=hf:tok", "seq=8", "test=10"))
    monkeypatch.chdir(tmp_path)
    assert str(parse_spec("corpus:docs,tokenizer=hf:tok,seq=8").absolute()) == \
        f"corpus:{tmp_path / 'docs'},tokenizer=hf:{tmp_path / 'tok'},seq=8"
    shutil.copytree(stdlib_512, tmp_path / "tok")
    write_jsonl(tmp_path / "docs" / "code.jsonl", [{"text": text} for text in many_documents()])
    result = invoke_json("train-teacher", "--model", "bytelm:dim=16,layers=1,heads=2", "--dataset",
                         "corpus:docs,tokenizer=hf:tok,seq=16,test=20,max_tokens=400", "--epochs", "1",
                         "--out", tmp_path / "teacher.safetensors", "--device", "cpu")
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    assert config["dataset"] == f"corpus:{tmp_path / 'docs'},tokenizer=hf:{tmp_path / 'tok'},seq=16,test=20,max_tokens=400"
    assert (tmp_path / "teacher.safetensors").is_file()


@pytest.fixture
def bad(tmp_path, stdlib_512):
    """name -> a file or folder that makes a bad corpus."""
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no corpus files here")
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "spaces.txt").write_text("   \n")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "fine"}, {"body": "no text"}])
    write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    (tmp_path / "one.txt").write_text("a single document")
    word_tokenizer(tmp_path / "no-eos", ["a", "single", "document"])
    bert = tmp_path / "bert"
    transformers.BertTokenizerFast(vocab={w: n for n, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}).save_pretrained(bert)
    (bert / "config.json").write_text('{"model_type": "bert"}')
    return tmp_path, stdlib_512


@pytest.mark.parametrize(("spec", "message"), [
    ("corpus:,tokenizer=hf:{tok},seq=8", "PATH is missing"),
    ("corpus:{tmp}/one.txt,seq=8", "name its tokenizer"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok}", "give the tokens per row"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=0", "seq must be a whole number of at least 1"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=eight", "seq must be a whole number"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=8,test=51", "test is a percentage of the documents from 0 to 50"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=8,test=-1", "test must be a whole number"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=8,max_tokens=1", "max_tokens must be a whole number of at least 2"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=8,colour=blue", "bad option 'colour=blue'"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tok},seq=8,field=", "field must name a JSON field"),
    ("corpus:{tmp}/one.txt,tokenizer={tok},seq=8", "give a Hugging Face tokenizer folder as hf:FOLDER"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tmp}/empty,seq=8", "no tokenizer in this folder"),
    ("corpus:{tmp}/one.txt,tokenizer=hf:{tmp}/no-eos,seq=8", "no end-of-text (eos) or separator token"),
    ("corpus:{tmp}/missing.jsonl,tokenizer=hf:{tok},seq=8", "corpus not found"),
    ("corpus:{tmp}/data.csv,tokenizer=hf:{tok},seq=8", "a corpus is a .txt or .jsonl file, or a folder of them"),
    ("corpus:{tmp}/empty,tokenizer=hf:{tok},seq=8", "no .txt or .jsonl files under this folder"),
    ("corpus:{tmp}/blank.txt,tokenizer=hf:{tok},seq=8", "no documents"),
    ("corpus:{tmp}/bytes.txt,tokenizer=hf:{tok},seq=8", "cannot read corpus file"),
    ("corpus:{tmp}/broken.jsonl,tokenizer=hf:{tok},seq=8", "line 2 is not JSON"),
    ("corpus:{tmp}/nofield.jsonl,tokenizer=hf:{tok},seq=8", "line 2 is not a JSON object with a text field 'text'"),
    ("corpus:{tmp}/number.jsonl,tokenizer=hf:{tok},seq=8", "line 1 is not a JSON object with a text field"),
    ("corpus:{tmp}/spaces.txt,tokenizer=hf:{tmp}/bert,seq=8,test=0", "too few for one row"),
])
def test_a_bad_corpus_spec_is_one_line_naming_the_problem(bad, spec, message):
    tmp, tok = bad
    with pytest.raises(InputError) as error:
        resolve_dataset(spec.format(tmp=tmp, tok=tok)).split("train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_test_split_is_one_line_saying_why(tmp_path, stdlib_512):
    text = next(f"only document {n}" for n in range(100) if zlib.crc32(f"only document {n}".encode()) % 100 >= 5)
    (tmp_path / "one.txt").write_text(text)
    data = resolve_dataset(f"corpus:{tmp_path / 'one.txt'},tokenizer=hf:{stdlib_512},seq=8")
    assert len(data.split("train")) == 1
    with pytest.raises(InputError, match="no document falls in the test split"):
        data.split("test")
    with pytest.raises(InputError, match="no test split: it was asked for with test=0"):
        resolve_dataset(f"corpus:{tmp_path / 'one.txt'},tokenizer=hf:{stdlib_512},seq=8,test=0").split("test")


def test_the_stdlib_tokenizer_is_deterministic_loads_offline_and_is_reused(tmp_path, stdlib_512):
    again = stdlib_tokenizer(tmp_path / "again", vocab=512)
    assert (again / "tokenizer.json").read_bytes() == (stdlib_512 / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob("*.partial"))  # the temporary folder was renamed into place
    tokenizer = load(again)
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT and tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    source = "def naïve(x):\n\treturn x  # ünïcödé, tabs and 🐍\n"
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == source and 0 not in ids  # byte-level: any text, no unknown token
    assert len(ids) < len(source.encode()) * 0.8  # it merged something

    marker = again / "marker"
    marker.write_text("kept")
    before = (again / "tokenizer.json").stat().st_mtime_ns
    assert stdlib_tokenizer(again, vocab=512) == again
    assert marker.read_text() == "kept" and (again / "tokenizer.json").stat().st_mtime_ns == before
    with pytest.raises(InputError, match="holds no stdlib tokenizer of 600 tokens"):
        stdlib_tokenizer(again, vocab=600)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("someone else's")
    with pytest.raises(InputError, match="holds no stdlib tokenizer of 512 tokens"):
        stdlib_tokenizer(occupied, vocab=512)
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"] and not list(tmp_path.glob("*.partial"))
    with pytest.raises(InputError, match="vocab must be at least 257"):
        stdlib_tokenizer(tmp_path / "tiny", vocab=100)


def test_the_default_stdlib_tokenizer_has_exactly_8192_tokens(tmp_path):
    tokenizer = load(stdlib_tokenizer(tmp_path / "stdlib"))
    assert len(tokenizer) == 8192 and tokenizer.convert_ids_to_tokens(0) == END_OF_TEXT


def test_the_stdlib_corpus_is_one_document_per_source_file_and_packs_with_the_stdlib_tokenizer(tmp_path, stdlib_512):
    path = stdlib_corpus(tmp_path / "corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [row["source"] for row in rows] == [f.name for f in files]
    assert rows[0]["text"] == files[0].read_text(encoding="utf-8")
    assert not list(path.parent.glob("*.partial"))
    before = path.stat().st_mtime_ns
    assert stdlib_corpus(tmp_path / "corpus") == path and path.stat().st_mtime_ns == before

    data = resolve_dataset(f"corpus:{path},tokenizer=hf:{stdlib_512},seq=64,max_tokens=3000")
    train, test = data.split("train"), data.split("test")
    assert len(stream_of(train)) == 3000 and len(stream_of(test)) == 150
    first = next(row["text"] for row in rows if zlib.crc32(row["text"].encode()) % 100 >= 5)
    decoded = load(stdlib_512).decode(stream_of(train).tolist())
    assert first.startswith(decoded) or decoded.startswith(first + END_OF_TEXT)
