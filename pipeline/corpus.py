"""Language-modelling corpora: text documents tokenized and packed into rows of next-token targets.

    corpus:PATH,tokenizer=hf:FOLDER,seq=N[,field=text][,test=5][,max_tokens=M]

PATH is a .txt file (the whole file is one document), a .jsonl file (each line an object whose
`field` is one document), or a folder (every .txt and .jsonl file under it, recursively, in
sorted path order). Empty documents are skipped.

Each document is tokenized with the Hugging Face tokenizer folder, without the special tokens the
tokenizer would add itself, and followed by its end-of-text token (`eos_token_id`, else
`sep_token_id`). The documents' tokens form one stream per split, packed into rows of N+1 tokens
stepping N: row r covers stream tokens [rN, rN+N+1), its inputs are the first N and its targets
(one label per token) the last N, so every stream token but the first is a target exactly once.
The last row is short: its inputs are padded with the tokenizer's padding id, its targets with
0, and its valid length kept in `lengths`.

The test split is chosen by whole documents: a document goes to test when the CRC-32 of its
UTF-8 text, mod 100, is below `test` (a percentage, 0 to 50). Identical documents so always land
in the same split, and a document's split does not depend on the others. `max_tokens` caps each
split's stream (train: max_tokens tokens; test: its `test` percent of them, at least 2): for
demos and tests. A split's `source_sha256` is a hash of the tokenizer (its whole pipeline and
vocabulary, the special ids used) and of `seq`, so a cache made through another tokenizer is
refused (stages.data.fingerprint).

`stdlib_tokenizer` trains a real byte-level BPE tokenizer on the Python standard library's own
sources, offline and deterministically, and `stdlib_corpus` writes those sources as a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from pipeline.hf import tokenizer_from_spec
from pipeline.specs import path_and_options
from stages.data import TensorSplit
from stages.errors import InputError, PipelineError
from stages.runtime import require
from stages.storage import PARTIAL_SUFFIX

CORPUS_OPTIONS = {"tokenizer": None, "seq": None, "field": "text", "test": "5", "max_tokens": None}
SPLITS = ("train", "test")
MAX_TEST_PERCENT = 50
SUFFIXES = (".txt", ".jsonl")
# Documents tokenized per call: a split capped by max_tokens stops reading after the batch that
# fills it, so a demo over a big corpus tokenizes only what it keeps.
BATCH_DOCUMENTS = 64
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class CorpusOptions:
    path: Path
    tokenizer: str
    seq: int
    field: str
    test: int
    max_tokens: int | None

    def cap(self, split: str) -> int | None:
        """The most tokens of the split's stream, None for no cap."""
        if self.max_tokens is None:
            return None
        return self.max_tokens if split == "train" else max(2, self.max_tokens * self.test // 100)


def parse_corpus_spec(args: str) -> CorpusOptions:
    """`PATH,key=value,...` (what follows `corpus:`) -> its options, checked."""
    path, options = path_and_options("corpus", args, CORPUS_OPTIONS)
    where = f"dataset spec corpus:{args}"
    if options["seq"] is None:
        raise InputError(f"{where}: give the tokens per row, e.g. seq=128")
    if not options["field"]:
        raise InputError(f"{where}: field must name a JSON field")
    seq = _whole(where, "seq", options["seq"], 1)
    test = _whole(where, "test", options["test"], 0)
    if test > MAX_TEST_PERCENT:
        raise InputError(f"{where}: test is a percentage of the documents from 0 to {MAX_TEST_PERCENT}, got {test}")
    max_tokens = None if options["max_tokens"] is None else _whole(where, "max_tokens", options["max_tokens"], 2)
    return CorpusOptions(Path(path), options["tokenizer"], seq, options["field"], test, max_tokens)


def _whole(where: str, key: str, value: str, least: int) -> int:
    if not value.isdigit() or int(value) < least:
        raise InputError(f"{where}: {key} must be a whole number of at least {least}, got {value!r}")
    return int(value)


@cache
def corpus_splits(args: str) -> dict[str, TensorSplit]:
    """The packed splits of `corpus:ARGS` that hold documents (test is absent at test=0, or when
    no document falls in it); tokenized once per spec in this process."""
    options = parse_corpus_spec(args)
    documents = {split: [] for split in SPLITS}
    for text in _documents(options.path, options.field):
        documents["test" if zlib.crc32(text.encode("utf-8")) % 100 < options.test else "train"].append(text)
    if not any(documents.values()):
        raise InputError(f"{options.path}: no documents (every .txt file and {options.field!r} field is empty)")
    tokenizer = tokenizer_from_spec(options.tokenizer)
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise InputError(f"tokenizer {options.tokenizer}: it has no end-of-text (eos) or separator token to end each document with")
    source = _tokenizer_sha256(tokenizer, end, options.seq)
    splits = {}
    for split, texts in documents.items():
        if texts:
            stream = _stream(tokenizer, texts, end, options.cap(split))
            if len(stream) < 2:
                raise InputError(f"corpus:{args}: the {split} split has {len(stream)} token, too few for one row (it needs 2)")
            splits[split] = _packed(split, stream, options.seq, tokenizer.pad_token_id, len(tokenizer), source)
    return splits


def corpus_split(args: str, name: str) -> TensorSplit | None:
    """One split of `corpus:ARGS`: a one-line error for a train or test split without documents,
    None for a split of another name."""
    splits = corpus_splits(args)
    if name in splits or name not in SPLITS:
        return splits.get(name)
    options = parse_corpus_spec(args)
    if name == "test" and options.test == 0:
        raise InputError(f"dataset corpus:{args} has no test split: it was asked for with test=0")
    raise InputError(f"dataset corpus:{args}: no document falls in the {name} split (test={options.test}% of the "
                     f"documents, chosen by a hash of their text); add documents or change test=")


def _documents(path: Path, field: str) -> Iterator[str]:
    """The non-empty documents under `path`, in order."""
    if path.is_dir():
        files = sorted((f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file()),
                       key=lambda f: f.relative_to(path).parts)
        if not files:
            raise InputError(f"{path}: no .txt or .jsonl files under this folder")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise InputError(f"{path}: a corpus is a .txt or .jsonl file, or a folder of them")
        files = [path]
    else:
        raise InputError(f"corpus not found: {path}")
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read corpus file {file}: {exc}") from exc
        if file.suffix == ".txt":
            if text:
                yield text
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{file}: line {number} is not JSON ({exc})") from exc
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise InputError(f"{file}: line {number} is not a JSON object with a text field {field!r}")
            if row[field]:
                yield row[field]


def _tokenizer_sha256(tokenizer, end: int, seq: int) -> str:
    """A hash of everything that turns text into these token rows: the tokenizer's own pipeline
    (normalizer, pre-tokenizer, model with its vocabulary and merges, added tokens) when it is a
    fast one, else its vocabulary; the end-of-text and padding ids; and the row length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "vocabulary": len(tokenizer), "end_of_text": end, "pad": tokenizer.pad_token_id, "seq": seq,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _stream(tokenizer, texts: list[str], end: int, cap: int | None) -> np.ndarray:
    """The documents' tokens, each followed by `end`, as one int64 stream of at most `cap` tokens."""
    parts, total = [], 0
    for start in range(0, len(texts), BATCH_DOCUMENTS):
        encoded = tokenizer(texts[start : start + BATCH_DOCUMENTS], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            parts.append(np.array([*ids, end], dtype=np.int64))
            total += len(parts[-1])
        if cap is not None and total >= cap:
            break
    return np.concatenate(parts)[:cap]


def _packed(name: str, stream: np.ndarray, seq: int, pad: int, vocabulary: int, source: str) -> TensorSplit:
    """Rows of `seq` inputs and `seq` targets, the targets one token on: row r's inputs are
    stream[rN : rN+N], its targets stream[rN+1 : rN+N+1]. The last row is padded."""
    rows = (len(stream) - 1 + seq - 1) // seq
    inputs = np.full(rows * seq, pad, dtype=np.int64)
    inputs[: len(stream) - 1] = stream[:-1]
    targets = np.zeros(rows * seq, dtype=np.int64)
    targets[: len(stream) - 1] = stream[1:]
    lengths = np.full(rows, seq, dtype=np.int64)
    lengths[-1] = len(stream) - 1 - (rows - 1) * seq
    return TensorSplit(name, torch.from_numpy(inputs.reshape(rows, seq)), targets.reshape(rows, seq), vocabulary, lengths,
                       source_sha256=source)


def _stdlib_files() -> list[Path]:
    """The standard library's top-level .py files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise InputError(f"no Python source files in {root} (a stripped Python install?)")
    return files


def stdlib_tokenizer(folder: Path, vocab: int = 8192) -> Path:
    """A byte-level BPE tokenizer of exactly `vocab` tokens trained on the standard library's
    top-level .py sources, saved to `folder` for `hf:FOLDER` (AutoTokenizer loads it), and
    returned; an existing one is reused. `<|endoftext|>` (id 0) is its end-of-text, padding,
    beginning and unknown token. Deterministic: one Python version always gives the same
    tokenizer.json. The folder also holds a config.json (a GPT-2 over this vocabulary, without
    weights) because pipeline.hf loads tokenizers from checkpoint folders."""
    folder = Path(folder)
    if vocab < 257:
        raise InputError(f"stdlib tokenizer: vocab must be at least 257 (256 bytes and {END_OF_TEXT}), got {vocab}")
    if (folder / "tokenizer.json").is_file():
        _check_reused(folder, vocab)
        return folder
    tokenizers = require("tokenizers", "hf", "the stdlib tokenizer")
    from pipeline.hf import transformers

    library = transformers("the stdlib tokenizer")
    files = _stdlib_files()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END_OF_TEXT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((file.read_text(encoding="utf-8") for file in files), trainer, length=len(files))
    if bpe.get_vocab_size() != vocab:
        raise InputError(f"stdlib tokenizer: the standard library's sources give {bpe.get_vocab_size()} tokens, not {vocab}; ask for fewer")
    wrapped = library.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                              bos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    end = bpe.token_to_id(END_OF_TEXT)
    config = {"model_type": "gpt2", "vocab_size": vocab, "bos_token_id": end, "eos_token_id": end, "pad_token_id": end}

    def write(partial: Path) -> None:
        wrapped.save_pretrained(partial)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    _folder_written_atomically(folder, write)
    _check_reused(folder, vocab)  # another process's, when it renamed its own into place first
    return folder


def _check_reused(folder: Path, vocab: int) -> None:
    try:
        held = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        held = None
    if held != vocab:
        raise InputError(f"{folder} exists but holds no stdlib tokenizer of {vocab} tokens (its config.json says vocab_size {held}): "
                         "remove it or name another folder")


def _folder_written_atomically(target: Path, write) -> None:
    """`write(partial)` fills a temporary sibling folder, then renamed to `target`, so a kill
    leaves no half-written target (only a .partial folder). When another process renamed its
    own into place first, the rename fails and that one stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        write(partial)
        partial.chmod(0o755)  # mkdtemp's 0o700 would hide the tokenizer from other users
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():
                raise
    except OSError as exc:
        raise PipelineError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def stdlib_corpus(folder: Path) -> Path:
    """folder/stdlib.jsonl: the standard library's top-level .py sources as a corpus, one document
    ({"text", "source": the file name}) per file in name order; written once, atomically."""
    path = Path(folder) / "stdlib.jsonl"
    if path.is_file():
        return path
    data = "".join(json.dumps({"text": file.read_text(encoding="utf-8"), "source": file.name}) + "\n"
                   for file in _stdlib_files()).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(partial, 0o644)  # mkstemp's is 0o600
        os.replace(partial, path)  # a concurrent writer's file is the same bytes
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    return path
