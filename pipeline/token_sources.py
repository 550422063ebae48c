"""Reading what `pipeline tokenize` tokenizes (pipeline.tokens): the spec of a corpus or chat
set, its files planned into work units, each unit's records checked (a malformed row is a
one-line error naming its line or row), and one unit tokenized into a part file, in a worker
process. A chat row is rendered with the tokenizer's own chat template, and its assistant
tokens found from the rendering (`_rendered`)."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from pipeline.corpus import MAX_TEST_PERCENT, SUFFIXES, parse_corpus_spec
from pipeline.hf import tokenizer_from_spec
from pipeline.specs import FileSpec, parse_spec, path_and_options
from stages.errors import InputError
from stages.storage import PARTIAL_SUFFIX

SPLITS = ("train", "test")
CHAT_OPTIONS = {"tokenizer": None, "seq": None, "messages": "messages", "prompt": "prompt", "completion": "completion",
                "train_on": "assistant", "too_long": "cut", "test": "5"}
TABLE_SUFFIXES = (".parquet", ".arrow")
TABLE_UNIT_ROWS = 4096  # rows of a table (Parquet, Arrow, save_to_disk) per work unit
ENCODE_BATCH = 64  # documents per tokenizer call, as pipeline.corpus

# ---------------------------------------------------------------------------------------------
# The spec of what to tokenize
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """What `pipeline tokenize` reads: a corpus or a chat set, with its options checked."""

    kind: str  # "corpus" or "chat"
    spec: str  # as given, with absolute paths
    path: str
    tokenizer: str
    seq: int
    test: int
    field: str = "text"
    max_tokens: int | None = None
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    train_on: str = "assistant"
    too_long: str = "cut"


def parse_source(spec: str) -> Source:
    """`corpus:...` or `chat:...` -> a checked Source (one-line errors for anything else)."""
    parsed = parse_spec(spec)
    if not (isinstance(parsed, FileSpec) and parsed.kind in ("corpus", "chat")):
        raise InputError(f"tokenize: {spec!r} is not a corpus:PATH,... or chat:PATH,... spec")
    spec = str(parsed.absolute())
    args = spec.partition(":")[2]
    if parsed.kind == "corpus":
        o = parse_corpus_spec(args)
        return Source("corpus", spec, str(o.path), o.tokenizer, o.seq, o.test, field=o.field, max_tokens=o.max_tokens)
    path, options = path_and_options("chat", args, CHAT_OPTIONS)
    where = f"dataset spec {spec}"
    if options["seq"] is None:
        raise InputError(f"{where}: give the tokens per row, e.g. seq=512")
    for key in ("messages", "prompt", "completion"):
        if not options[key]:
            raise InputError(f"{where}: {key} must name a column")
    if options["train_on"] not in ("assistant", "all"):
        raise InputError(f"{where}: train_on is assistant or all, got {options['train_on']!r}")
    if options["too_long"] not in ("cut", "drop"):
        raise InputError(f"{where}: too_long is cut or drop, got {options['too_long']!r}")
    seq, test = _whole(where, "seq", options["seq"], 1), _whole(where, "test", options["test"], 0)
    if test > MAX_TEST_PERCENT:
        raise InputError(f"{where}: test is a percentage of the rows from 0 to {MAX_TEST_PERCENT}, got {test}")
    return Source("chat", spec, path, options["tokenizer"], seq, test, messages=options["messages"], prompt=options["prompt"],
                  completion=options["completion"], train_on=options["train_on"], too_long=options["too_long"])


def _whole(where: str, key: str, value: str, least: int) -> int:
    if not value.isdigit() or int(value) < least:
        raise InputError(f"{where}: {key} must be a whole number of at least {least}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Reading the source: files, work units, records
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A piece of the source tokenized on its own: bytes [start, stop) of a .jsonl file whose first
    line is `first` (0-based), rows [start, stop) of an Arrow table (row groups of a Parquet file,
    its first row `first`), or a whole .txt file."""

    file: str
    kind: str  # txt, jsonl, parquet, arrow, hf-disk
    start: int
    stop: int
    first: int


def _source_files(path: Path) -> list[tuple[Path, str]]:
    """(file or folder, kind) of everything the source reads, in order."""
    if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [(path, "hf-disk")]
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        raise InputError(f"{path}: a DatasetDict folder; name one of its splits' folders (e.g. {path / 'train'})")
    if path.is_dir():
        files = sorted((f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file()), key=lambda f: f.relative_to(path).parts)
        if not files:
            raise InputError(f"{path}: no .txt or .jsonl files under this folder (nor a datasets save_to_disk folder)")
        return [(f, f.suffix[1:]) for f in files]
    if path.is_file():
        if path.suffix not in (*SUFFIXES, *TABLE_SUFFIXES):
            raise InputError(f"{path}: a source is a .txt, .jsonl, .parquet or .arrow file, or a folder of them")
        return [(path, path.suffix[1:])]
    raise InputError(f"source not found: {path}")


def _hf_dataset(path: str):
    """A save_to_disk folder or an .arrow file as a datasets.Dataset, memory-mapped, offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages.runtime import require

    datasets = require("datasets", "datasets", "Hugging Face datasets sources")
    datasets.disable_progress_bars()
    try:
        if Path(path).is_dir():
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.Dataset.from_file(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read it with datasets: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise InputError(f"{path}: holds a {type(dataset).__name__}, not one Dataset; name one split's folder")
    return dataset


def _parquet():
    from stages.runtime import require

    require("pyarrow", "datasets", "Parquet sources")
    import pyarrow.parquet

    return pyarrow.parquet


def _table_rows_and_columns(file: str, kind: str) -> tuple[int, list[str]]:
    if kind == "parquet":
        pq = _parquet()
        try:
            meta = pq.ParquetFile(file)
        except Exception as exc:
            raise InputError(f"{file}: cannot read it as Parquet: {exc}") from exc
        return meta.metadata.num_rows, meta.schema_arrow.names
    dataset = _hf_dataset(file)
    return len(dataset), list(dataset.column_names)


def _columns_needed(source: Source, columns: list[str], file: str) -> None:
    """A table must hold the columns the options name: a one-line error listing the ones it has."""
    if source.kind == "corpus":
        wanted = [source.field]
    elif source.messages in columns:
        wanted = [source.messages]
    else:
        wanted = [source.prompt, source.completion]
    missing = [c for c in wanted if c not in columns]
    if missing:
        hint = "field=" if source.kind == "corpus" else ("messages= (or prompt= and completion=)")
        raise InputError(f"{file}: no column {missing[0]!r} (its columns: {', '.join(columns)}); name the right one with {hint}")


def plan(source: Source, unit_bytes: int) -> tuple[list[Unit], str, list[str]]:
    """The work units of the source, the sha256 of its files' bytes and its files, in one pass."""
    digest = hashlib.sha256()
    units: list[Unit] = []
    files = []
    for file, kind in _source_files(Path(source.path)):
        files.append(str(file))
        if kind == "hf-disk":
            hashed = sorted(f for f in file.rglob("*") if f.is_file())
        else:
            hashed = [file]
        for part in hashed:
            digest.update(str(part.relative_to(file.parent if kind != "hf-disk" else file)).encode() + b"\0")
            with open(part, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        if kind == "txt":
            units.append(Unit(str(file), kind, 0, file.stat().st_size, 0))
        elif kind == "jsonl":
            units.extend(_line_units(file, unit_bytes))
        elif kind == "parquet":
            units.extend(_parquet_units(source, file))
        else:
            rows, columns = _table_rows_and_columns(str(file), kind)
            _columns_needed(source, columns, str(file))
            units.extend(Unit(str(file), kind, start, min(start + TABLE_UNIT_ROWS, rows), start)
                         for start in range(0, rows, TABLE_UNIT_ROWS))
    return units, digest.hexdigest(), files


def _parquet_units(source: Source, file: Path) -> list[Unit]:
    """Runs of whole row groups (what Parquet reads at least) of about TABLE_UNIT_ROWS rows; a
    unit's start and stop count row groups, `first` its first row."""
    _, columns = _table_rows_and_columns(str(file), "parquet")
    _columns_needed(source, columns, str(file))
    metadata = _parquet().ParquetFile(file).metadata
    units, group, row = [], 0, 0
    while group < metadata.num_row_groups:
        last, count = group, 0
        while last < metadata.num_row_groups and (count == 0 or count + metadata.row_group(last).num_rows <= TABLE_UNIT_ROWS):
            count += metadata.row_group(last).num_rows
            last += 1
        units.append(Unit(str(file), "parquet", group, last, row))
        group, row = last, row + count
    return units


def _line_units(file: Path, unit_bytes: int) -> list[Unit]:
    """Line-aligned byte ranges of about unit_bytes each, with their first line number."""
    units, start, line = [], 0, 0
    size = file.stat().st_size
    with open(file, "rb") as handle:
        while start < size:
            handle.seek(min(start + unit_bytes, size))
            handle.readline()  # to the end of the line the target falls in
            stop = min(handle.tell(), size) if start + unit_bytes < size else size
            handle.seek(start)
            lines = handle.read(stop - start).count(b"\n")
            units.append(Unit(str(file), "jsonl", start, stop, line))
            start, line = stop, line + lines
    return units


def _records(source: Source, unit: Unit) -> Iterator[tuple[int, object]]:
    """(record number, its text (corpus) or its turns (chat)) of the unit, checked: a malformed
    row is a one-line error naming its line (or table row)."""
    if unit.kind == "txt":
        try:
            text = Path(unit.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read source file {unit.file}: {exc}") from exc
        if source.kind == "chat":
            raise InputError(f"{unit.file}: chat rows are .jsonl lines or table rows, not a .txt file")
        yield 0, text
        return
    if unit.kind == "jsonl":
        with open(unit.file, "rb") as handle:
            handle.seek(unit.start)
            data = handle.read(unit.stop - unit.start)
        for offset, raw in enumerate(data.split(b"\n")):
            number = unit.first + offset + 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise InputError(f"{unit.file}: line {number} is not JSON ({exc})") from exc
            yield number - 1, _record(source, row, f"{unit.file}: line {number}")
        return
    for number, row in _table_rows(unit):
        yield number, _record(source, row, f"{unit.file}: row {number}")


def _table_rows(unit: Unit) -> Iterator[tuple[int, dict]]:
    if unit.kind == "parquet":  # start and stop count row groups
        rows = _parquet().ParquetFile(unit.file).read_row_groups(list(range(unit.start, unit.stop))).to_pylist()
    else:
        rows = _hf_dataset(unit.file).select(range(unit.start, unit.stop)).to_list()
    yield from enumerate(rows, unit.first)


def _record(source: Source, row, where: str):
    if not isinstance(row, dict):
        raise InputError(f"{where} is not a JSON object")
    if source.kind == "corpus":
        if not isinstance(row.get(source.field), str):
            raise InputError(f"{where} is not a JSON object with a text field {source.field!r}")
        return row[source.field]
    if source.messages in row and row[source.messages] is not None:
        turns = row[source.messages]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns):
            raise InputError(f"{where}: {source.messages!r} must be a non-empty list of {{\"role\", \"content\"}} turns with string values")
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    prompt, completion = row.get(source.prompt), row.get(source.completion)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InputError(f"{where} has neither a {source.messages!r} list nor {source.prompt!r} and {source.completion!r} strings")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


# ---------------------------------------------------------------------------------------------
# Tokenizing a unit (in a worker process)
# ---------------------------------------------------------------------------------------------

@cache
def source_tokenizer(spec: str, chat: bool):
    """The tokenizer a source names (loaded once per process), checked for chat data."""
    tokenizer = tokenizer_from_spec(spec)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"tokenizer {spec} has no chat template (no chat_template in its tokenizer_config.json "
                             "or chat_template.jinja); chat data is rendered with the tokenizer's own template")
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"tokenizer {spec}: chat data needs a fast tokenizer (a tokenizer.json) to find the assistant's tokens")
    return tokenizer


def end_of_text(tokenizer, spec: str) -> int:
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise InputError(f"tokenizer {spec}: it has no end-of-text (eos) or separator token to end each document with")
    return end


def _split_of(key: str, test: int) -> str:
    return "test" if zlib.crc32(key.encode("utf-8")) % 100 < test else "train"


def tokenize_unit(source: Source, unit: Unit, number: int, parts: str) -> dict:
    """Tokenize one unit into parts/NUMBER.npz (written whole, then renamed into place) and
    return its counts. Runs in a worker process."""
    tokenizer = source_tokenizer(source.tokenizer, source.kind == "chat")
    out: dict[str, dict[str, list]] = {s: {"tokens": [], "trained": [], "records": []} for s in SPLITS}
    counts = {"records": 0, "cut": 0, "dropped_too_long": 0, "dropped_without_assistant": 0}
    if source.kind == "corpus":
        end = end_of_text(tokenizer, source.tokenizer)
        batch = []
        records = ((n, text) for n, text in _records(source, unit) if text)

        def flush():
            encoded = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
            for (n, text), ids in zip(batch, encoded):
                split = out[_split_of(text, source.test)]
                split["tokens"].append(np.array([*ids, end], dtype=np.int64))
                split["trained"].append(np.ones(len(ids) + 1, dtype=bool))
                split["records"].append(n)
            batch.clear()

        for record in records:
            counts["records"] += 1
            batch.append(record)
            if len(batch) == ENCODE_BATCH:
                flush()
        if batch:
            flush()
    else:
        for n, turns in _records(source, unit):
            counts["records"] += 1
            ids, trained = _rendered(tokenizer, turns, source.tokenizer)
            if source.train_on == "all":
                trained = np.ones_like(trained)
            if len(ids) > source.seq + 1:
                if source.too_long == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                counts["cut"] += 1
                ids, trained = ids[: source.seq + 1], trained[: source.seq + 1]
            if len(ids) < 2 or not trained[1:].any():
                counts["dropped_without_assistant"] += 1
                continue
            split = out[_split_of(json.dumps(turns, sort_keys=True, ensure_ascii=False), source.test)]
            split["tokens"].append(ids)
            split["trained"].append(trained)
            split["records"].append(n)
    arrays = {}
    for name, split in out.items():
        lengths = np.array([len(t) for t in split["tokens"]], dtype=np.int64)
        arrays[f"{name}_tokens"] = np.concatenate(split["tokens"]) if split["tokens"] else np.zeros(0, np.int64)
        arrays[f"{name}_trained"] = np.concatenate(split["trained"]) if split["trained"] else np.zeros(0, bool)
        arrays[f"{name}_documents"] = lengths
        arrays[f"{name}_records"] = np.array(split["records"], dtype=np.int64)
    arrays["counts"] = np.array([counts[k] for k in COUNT_KEYS], dtype=np.int64)
    target = Path(parts) / f"{number:08d}.npz"
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, target)
    return {"tokens": int(sum(len(arrays[f"{s}_tokens"]) for s in SPLITS)), **counts}


COUNT_KEYS = ("records", "cut", "dropped_too_long", "dropped_without_assistant")


def _rendered(tokenizer, turns: list[dict], spec: str) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's token ids through the chat template, and which of them are the
    assistant's. Each assistant turn's characters are found by rendering the conversation up to
    it (with the generation prompt: where the assistant starts) and through it (where it ends);
    both must be prefixes of the whole rendering. A token is the assistant's when it starts
    inside such a span (its offsets, from the fast tokenizer)."""
    def render(messages, prompt):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:
            raise InputError(f"tokenizer {spec}: its chat template failed: {type(exc).__name__}: {exc}") from exc

    text = render(turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        begin, end = render(turns[:i], True) if i else "", render(turns[: i + 1], False)
        if not (text.startswith(begin) and text.startswith(end)):
            raise InputError(f"tokenizer {spec}: its chat template does not render a conversation's beginning as a prefix "
                             "of the whole, so the assistant's tokens cannot be found; use train_on=all")
        spans.append((len(begin), len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.array(encoded["input_ids"], dtype=np.int64)
    starts = np.array([s for s, _ in encoded["offset_mapping"]], dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    for begin, end in spans:
        trained |= (starts >= begin) & (starts < end)
    return ids, trained
