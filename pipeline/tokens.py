"""Token datasets: a corpus or a chat set tokenized once (`pipeline tokenize`) into a Zarr v3 group
that every command reads lazily by row (`tokens:DIR`), so that no command holds or re-tokenizes
the whole corpus.

    pipeline tokenize corpus:docs.jsonl,tokenizer=hf:tok,seq=512 --out data/tokens/docs.zarr --workers 2
    pipeline cache-teacher --dataset tokens:data/tokens/docs.zarr --split train ...

Sources (`SPEC`):
    corpus:PATH,tokenizer=hf:FOLDER,seq=N[,field=text,test=5,max_tokens=M]
        the rows `corpus:` makes in memory (pipeline.corpus), bit for bit, with the same fingerprint:
        a cache made from `corpus:` is used with the token dataset and the other way round.
    chat:PATH,tokenizer=hf:FOLDER,seq=N[,messages=messages,prompt=prompt,completion=completion,
         train_on=assistant,too_long=cut,test=5]
        one conversation per row: rows holding `messages` (role/content turns), else `prompt` and
        `completion` strings (a user turn and an assistant turn), rendered with the tokenizer
        folder's own chat template; the trained positions are the assistant's tokens (its content
        and the end of its turn, as the template writes them), or every position with
        train_on=all. A conversation of more than seq+1 tokens is cut to seq+1 (too_long=cut) or
        dropped (too_long=drop); rows left without an assistant token are dropped; the counts are
        reported and recorded. The test split is chosen by a CRC-32 of the row, as corpus's by document.
PATH is a .txt or .jsonl file or a folder of them (as corpus:), a .parquet or .arrow file, or a
Hugging Face `datasets` folder written by `save_to_disk` (a Dataset; read memory-mapped,
offline). `field`, `messages`, `prompt` and `completion` name the columns of a table.

The format (FORMAT, schema SCHEMA_VERSION), readable with plain zarr:
  attributes of the group: format, schema_version, complete, source {spec, kind, sha256 of its
      files' bytes, files}, tokenizer {spec, files_sha256 (its files' bytes), pipeline_sha256,
      vocabulary, pad, end_of_text}, split_source_sha256 (the splits' fingerprint's source_sha256:
      the tokenizer's pipeline and seq, and for chat its template and mask options), seq, options, chunk_tokens, dtype, work_unit_bytes, counts (chat),
      tool; no timestamps, so that the same source, tokenizer and options give the same bytes.
  one subgroup per split (`train`, `test`), attributes: num_rows, num_tokens, num_documents,
      num_trained_targets (positions learned), max_label, fingerprint (what stages.data.fingerprint gives for the split,
      labels included, computed once here), complete. Arrays:
      tokens (T,)          the split's token stream, the smallest unsigned dtype that holds the vocabulary
      trained (T,) bool    whether token j is learned as a target (a corpus: every token)
      chunk_done (T/C,)    1 once chunk c of tokens and trained is written
      row_start (R,) int64 the stream position of row r's first input; its inputs are
                           tokens[s : s+L], its next-token labels tokens[s+1 : s+L+1]
      lengths (R,) int32   L, the row's valid positions (the rest is padding: pad id, label 0)
      document_start (D,)  the stream position where each document (conversation) begins
      document_record (D,) where it came from in its source file: its 0-based line (.jsonl) or
                           row (a table), 0 for a .txt file (its id is its place in these arrays)
  A corpus packs its stream into rows of seq+1 tokens stepping seq (row_start r*seq), a chat set
  puts a conversation per row.

Resume and parallelism (reading and tokenizing the source: pipeline.token_sources). Tokenizing
runs in two steps. (1) The source is planned into work units of about `work_unit_bytes` of text (line-aligned byte ranges of .jsonl files, row ranges of
tables, whole .txt files); each unit is tokenized into a part file under DIR/parts, written to a
temporary name and renamed, so a part that exists is complete: after a kill only the missing
units are tokenized again. Units are independent CPU-bound work (JSON parsing, chat templates in
Python, the tokenizer in Rust), so they run in a pool of `workers` processes: processes rather
than threads because the Python parts hold the GIL; a plain process pool rather than dask because
the units need no scheduler, no shared state and no cluster start-up, and results travel as
files. The pool forks where the platform can (Linux): a forked worker starts at once with the
tokenizer already loaded, where a spawned one first re-imports torch and transformers (10-20 s
per worker on a busy 2-core machine, more than a 10 MB corpus takes to tokenize). Forking is safe
here because a worker only reads the source, tokenizes and writes its part file: it uses no zarr,
torch or thread of the parent. Each worker tokenizes on one thread (TOKENIZERS_PARALLELISM=false),
so --workers is the number of cores used. (2) The parts are concatenated in unit order into whole
chunks of `chunk_tokens` tokens, each marked in chunk_done once written (skipped when resumed);
then the split's fingerprint is computed by reading the rows back once, in order, and the split
and the dataset are marked complete and the parts removed. The output does not depend on the
number of workers, nor on where a run was killed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.corpus import _tokenizer_sha256
from pipeline.hf import TOKENIZER_FILES
from pipeline.specs import parse_spec
from pipeline.token_sources import COUNT_KEYS, SPLITS, Source, Unit, source_tokenizer, end_of_text, parse_source, plan, tokenize_unit
from stages import __version__
from stages.data import fingerprint
from stages.errors import InputError
from stages.storage import PARTIAL_SUFFIX

log = logging.getLogger(__name__)

FORMAT = "kd-pipeline-tokens"
SCHEMA_VERSION = 1
TOKENS_OPTIONS = {"rows": None}
SPLIT_ARRAYS = ("tokens", "trained", "chunk_done", "row_start", "lengths", "document_start", "document_record")
DEFAULT_CHUNK_TOKENS = 1 << 16  # 128 KiB of uint16 tokens: a random row decodes one or two such chunks
DEFAULT_WORK_UNIT_BYTES = 1 << 20
ROW_CHUNK = 1 << 16  # rows per chunk of the row arrays
FINGERPRINT_BLOCK_ROWS = 1024  # rows of labels hashed at a time: bounded memory whatever the split's size
# Tokenizer files hashed into the tokenizer's identity (a checkpoint folder's weights are not).
TOKENIZER_IDENTITY_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                            "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------------------------------------
# pipeline tokenize: plan, tokenize the units, assemble the chunks, fingerprint
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizeConfig:
    spec: str
    out: Path
    workers: int = 1
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    work_unit_bytes: int = DEFAULT_WORK_UNIT_BYTES
    overwrite: bool = False


def smallest_dtype(vocabulary: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocabulary - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(f"a vocabulary of {vocabulary:,} tokens does not fit in 32 bits")


def tokenizer_files_sha256(spec: str) -> str:
    """sha256 of the tokenizer folder's tokenizer files (names and bytes; not a checkpoint's weights)."""
    folder = Path(parse_spec(spec).path)
    digest = hashlib.sha256()
    for name in sorted(TOKENIZER_IDENTITY_FILES):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def _identity(source: Source, tokenizer) -> tuple[str, dict]:
    """The split fingerprint's source_sha256 (the hash corpus: records, for a corpus) and the
    tokenizer's description."""
    if source.kind == "corpus":
        end = end_of_text(tokenizer, source.tokenizer)
        pipeline_sha = _tokenizer_sha256(tokenizer, end, source.seq)
        return pipeline_sha, {"end_of_text": end, "pipeline_sha256": pipeline_sha}
    backend = tokenizer.backend_tokenizer
    described = {"tokenizer": backend.to_str(), "vocabulary": len(tokenizer), "pad": tokenizer.pad_token_id, "seq": source.seq,
                 "chat_template": tokenizer.chat_template, "train_on": source.train_on, "too_long": source.too_long}
    pipeline_sha = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return pipeline_sha, {"end_of_text": tokenizer.eos_token_id, "pipeline_sha256": pipeline_sha}


def is_token_dataset(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def tokenize(config: TokenizeConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize `config.spec` into the token dataset at `config.out`, or finish an interrupted one
    of the same source, tokenizer and options. Returns a summary (per split: rows, tokens, trained
    tokens; the chat counts; tokens per second)."""
    started = time.perf_counter()
    if config.workers < 1:
        raise InputError(f"workers must be at least 1, got {config.workers}")
    if config.chunk_tokens < 1 or config.work_unit_bytes < 1:
        raise InputError("chunk_tokens and work_unit_bytes must be positive")
    source = parse_source(config.spec)
    tokenizer = source_tokenizer(source.tokenizer, source.kind == "chat")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not is_token_dataset(out):
        raise InputError(f"{out} exists and is not a token dataset; refusing to write there")
    source_sha, tokenizer_described = _identity(source, tokenizer)
    unit_bytes = config.work_unit_bytes if config.overwrite else _recorded_unit_bytes(out, config.work_unit_bytes)
    units, files_sha, files = plan(source, unit_bytes)
    if config.overwrite and is_token_dataset(out):  # only once the source has been read and checked
        shutil.rmtree(out)
    attrs = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False,
        "source": {"spec": source.spec, "kind": source.kind, "sha256": files_sha, "files": files},
        "tokenizer": {"spec": source.tokenizer, "files_sha256": tokenizer_files_sha256(source.tokenizer),
                      "vocabulary": len(tokenizer), "pad": tokenizer.pad_token_id, **tokenizer_described},
        "seq": source.seq, "options": {k: v for k, v in asdict(source).items() if k not in ("spec", "path", "tokenizer", "kind")},
        "split_source_sha256": source_sha,
        "chunk_tokens": config.chunk_tokens, "dtype": smallest_dtype(len(tokenizer)).name,
        "work_unit_bytes": unit_bytes,
        "tool": {"name": "pipeline", "version": __version__},
    }
    group = _open_or_create(out, attrs)
    if group.attrs.get("complete"):
        shutil.rmtree(out / "parts", ignore_errors=True)  # a kill between marking it complete and this
        log.info("%s: already complete", out)
        return summary(out, time.perf_counter() - started, 0)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    for leftover in parts.glob(f"*{PARTIAL_SUFFIX}"):
        leftover.unlink()
    todo = [n for n in range(len(units)) if not (parts / f"{n:08d}.npz").is_file()]
    if len(todo) < len(units):
        log.info("resuming %s: %d of %d work units already tokenized", out, len(units) - len(todo), len(units))
    tokens_done = _tokenize_units(source, units, todo, parts, config.workers, progress)
    counts = np.zeros(len(COUNT_KEYS), np.int64)
    for n in range(len(units)):
        with np.load(parts / f"{n:08d}.npz") as part:
            counts += part["counts"]
    group.attrs["counts"] = dict(zip(COUNT_KEYS, map(int, counts)))
    if source.kind == "chat":
        log.info("%s: %d rows; %d cut to seq+1 tokens, %d dropped as too long, %d dropped without an assistant token",
                 source.path, *map(int, counts))
    written = []
    for split in SPLITS:
        if _assemble(out, group, split, source, len(units), config.chunk_tokens, tokenizer.pad_token_id):
            written.append(split)
    if not written:
        raise InputError(f"{source.path}: no documents (every text is empty, or every row was dropped)")
    group.attrs["splits"] = written
    group.attrs["complete"] = True
    shutil.rmtree(parts)
    return summary(out, time.perf_counter() - started, tokens_done)


def _recorded_unit_bytes(out: Path, wanted: int) -> int:
    """An interrupted dataset keeps the work units it was planned with, so that its parts fit."""
    if is_token_dataset(out):
        return int(zarr.open_group(str(out), mode="r").attrs.get("work_unit_bytes", wanted))
    return wanted


def _open_or_create(out: Path, attrs: dict) -> zarr.Group:
    if is_token_dataset(out):
        group = zarr.open_group(str(out), mode="r+")
        held = dict(group.attrs)
        def facts(a: dict) -> dict:
            return {"source": (a.get("source") or {}).get("sha256"), "tokenizer": (a.get("tokenizer") or {}).get("files_sha256"),
                    **{k: a.get(k) for k in ("seq", "options", "chunk_tokens", "dtype", "schema_version")}}

        mine = facts(attrs)
        differ = [k for k, v in facts(held).items() if json.dumps(v, sort_keys=True) != json.dumps(mine[k], sort_keys=True)]
        if differ:
            raise InputError(f"{out} holds a token dataset of another {' and '.join(differ)}; use --overwrite to replace it, "
                             "or another --out")
        return group
    out.mkdir(parents=True, exist_ok=True)
    return zarr.open_group(str(out), mode="w", attributes=attrs)


def _tokenize_units(source: Source, units: list[Unit], todo: list[int], parts: Path, workers: int,
                    progress: Callable[[int, int], None] | None) -> int:
    """Tokenize the units `todo` into their parts, in this process or a pool; progress lines as
    units complete. On an error, the error of the first unit seen failing is raised and the units not started are cancelled."""
    done, tokens, started = len(units) - len(todo), 0, time.perf_counter()

    def report(result: dict) -> None:
        nonlocal done, tokens
        done += 1
        tokens += result["tokens"]
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        log.info("tokenized %d/%d work units (%s tokens, %s tokens/s)", done, len(units), f"{tokens:,}", f"{rate:,.0f}")
        if progress is not None:
            progress(done, len(units))

    if progress is not None:
        progress(done, len(units))
    # The tokenizer on one thread in every process (set before a fork: its thread pool is not forked in use).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        if workers == 1 or len(todo) <= 1:
            for n in todo:
                report(tokenize_unit(source, units[n], n, str(parts)))
        else:
            _in_pool(source, units, todo, parts, workers, report)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return tokens


def _in_pool(source: Source, units: list[Unit], todo: list[int], parts: Path, workers: int, report: Callable[[dict], None]) -> None:
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(tokenize_unit, source, units[n], n, str(parts)): n for n in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                failed = sorted((futures[f], f) for f in finished if f.exception() is not None)
                if failed:
                    raise failed[0][1].exception()
                for future in sorted(finished, key=futures.get):
                    report(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _assemble(out: Path, group: zarr.Group, split: str, source: Source, units: int, chunk_tokens: int, pad: int) -> bool:
    """Write the split's arrays from the parts, a whole chunk at a time (chunks marked done are not
    written again), then its fingerprint; False for a split without documents."""
    parts = out / "parts"
    sizes = []
    for n in range(units):
        with np.load(parts / f"{n:08d}.npz") as part:
            sizes.append(part[f"{split}_documents"])
    documents = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    if not len(documents):
        return False
    total = int(documents.sum())
    cap = None if source.max_tokens is None else (source.max_tokens if split == "train" else max(2, source.max_tokens * source.test // 100))
    if cap is not None:
        total = min(total, cap)
    starts = np.concatenate([[0], np.cumsum(documents)[:-1]])
    kept_documents = int(np.sum(starts < total))
    if source.kind == "corpus":
        if total < 2:
            raise InputError(f"{source.spec}: the {split} split has {total} token, too few for one row (it needs 2)")
        rows = (total - 1 + source.seq - 1) // source.seq
        row_start = np.arange(rows, dtype=np.int64) * source.seq
        lengths = np.minimum(source.seq, total - 1 - row_start).astype(np.int32)
    else:
        row_start, lengths = starts.astype(np.int64), (documents - 1).astype(np.int32)
    dtype = smallest_dtype(int(group.attrs["tokenizer"]["vocabulary"]))
    sub = _split_group(group, split, total, len(row_start), kept_documents, chunk_tokens, dtype)
    if sub.attrs.get("complete"):
        return True
    sub["row_start"][:] = row_start
    sub["lengths"][:] = lengths
    sub["document_start"][:] = starts[:kept_documents]
    records = []
    for n in range(units):
        with np.load(parts / f"{n:08d}.npz") as part:
            records.append(part[f"{split}_records"])
    records = np.concatenate(records)
    sub["document_record"][:] = records[:kept_documents]
    done = sub["chunk_done"][:]
    chunks = len(done)
    tokens_array = sub["tokens"].with_config({"write_empty_chunks": True})
    trained_array = sub["trained"].with_config({"write_empty_chunks": True})
    held_tokens, held_trained, held, chunk = [], [], 0, 0
    for piece, piece_trained in _pieces(parts, split, units, total):
        held_tokens.append(piece)
        held_trained.append(piece_trained)
        held += len(piece)
        while chunk < chunks and held >= min(chunk_tokens, total - chunk * chunk_tokens):
            size = min(chunk_tokens, total - chunk * chunk_tokens)
            stream, mask = np.concatenate(held_tokens), np.concatenate(held_trained)
            if not done[chunk]:
                first = chunk * chunk_tokens
                tokens_array[first : first + size] = stream[:size].astype(dtype)
                trained_array[first : first + size] = mask[:size]
                sub["chunk_done"][chunk] = 1  # after both arrays' chunk: a kill before it writes the chunk again
                log.info("%s: %s chunk %d/%d written", out, split, chunk + 1, chunks)
            held_tokens, held_trained, held = [stream[size:]], [mask[size:]], held - size
            chunk += 1
    reader = TokenSplit(out, split, require_complete=False)
    labels_sha, max_label, trained_targets = _streamed_labels(reader)
    reader.labels_sha256 = labels_sha
    sub.attrs.update({"num_trained_targets": trained_targets, "max_label": max_label})
    sub.attrs["fingerprint"] = fingerprint(reader)
    sub.attrs["complete"] = True
    return True


def _pieces(parts: Path, split: str, units: int, total: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split's stream and trained mask, one part at a time, cut at `total` tokens."""
    left = total
    for n in range(units):
        if left == 0:
            return
        with np.load(parts / f"{n:08d}.npz") as part:
            tokens, trained = part[f"{split}_tokens"][:left], part[f"{split}_trained"][:left]
        left -= len(tokens)
        if len(tokens):
            yield tokens, trained


def _split_group(group: zarr.Group, split: str, total: int, rows: int, documents: int, chunk_tokens: int, dtype) -> zarr.Group:
    """The split's subgroup, created with empty arrays on first use (again when a kill cut its
    creation short)."""
    if split in group:
        if set(group[split].array_keys()) >= set(SPLIT_ARRAYS):
            return group[split]
        del group[split]
    sub = group.create_group(split, attributes={"name": split, "num_rows": rows, "num_tokens": total, "num_documents": documents,
                                                "complete": False})
    crc = Crc32cCodec()
    zstd = ZstdCodec(level=3)

    def array(name, shape, chunks, dtype, dims, fill):
        sub.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=[zstd, crc],
                         dimension_names=dims)

    array("tokens", (total,), (chunk_tokens,), dtype, ("token",), 0)
    array("trained", (total,), (chunk_tokens,), bool, ("token",), False)
    array("chunk_done", (-(-total // chunk_tokens),), (ROW_CHUNK,), np.uint8, ("chunk",), 0)
    array("row_start", (rows,), (ROW_CHUNK,), np.int64, ("row",), -1)
    array("lengths", (rows,), (ROW_CHUNK,), np.int32, ("row",), 0)
    array("document_start", (documents,), (ROW_CHUNK,), np.int64, ("document",), -1)
    array("document_record", (documents,), (ROW_CHUNK,), np.int64, ("document",), -1)
    return sub


def _streamed_labels(split: TokenSplit) -> tuple[str, int, int]:
    """sha256 of the split's labels as stages.data.fingerprint hashes them ((N, L) int64, in row
    order), their largest value and the trained positions, reading FINGERPRINT_BLOCK_ROWS rows at
    a time."""
    digest, high, trained = hashlib.sha256(), 0, 0
    for start in range(0, len(split), FINGERPRINT_BLOCK_ROWS):
        index = np.arange(start, min(start + FINGERPRINT_BLOCK_ROWS, len(split)))
        tokens, mask, lengths = split.windows(index)
        valid = np.arange(split.seq)[None, :] < lengths[:, None]
        block = np.where(valid, tokens[:, 1:], 0)
        digest.update(np.ascontiguousarray(block, dtype=np.int64).tobytes())
        high = max(high, int(block.max()) if block.size else 0)
        trained += int((mask[:, 1:] & valid).sum())
    return digest.hexdigest(), high, trained


def summary(out: Path, seconds: float, tokens_this_run: int) -> dict:
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)
    splits = {}
    for name in attrs.get("splits", []):
        sub = dict(group[name].attrs)
        splits[name] = {"rows": sub["num_rows"], "tokens": sub["num_tokens"], "documents": sub["num_documents"],
                        "trained_targets": sub["num_trained_targets"]}
    return {"out": str(out), "source": attrs["source"]["spec"], "dtype": attrs["dtype"], "splits": splits,
            "counts": attrs.get("counts", {}), "seconds": round(seconds, 3), "tokens_tokenized": tokens_this_run,
            "tokens_per_second": round(tokens_this_run / seconds) if seconds > 0 else None}


# ---------------------------------------------------------------------------------------------
# tokens:DIR, read lazily by row
# ---------------------------------------------------------------------------------------------

class TokenSplit:
    """One split of a token dataset, read by row: it holds the row table (two numbers per row)
    and a few decoded chunks of tokens, never the stream.

    A stages Split: `inputs(index)` (B, seq) int64 padded with the tokenizer's pad id,
    `labels` (a TokenLabels: rows of next-token labels, 0 past each row's length, read on
    indexing), `lengths`, `trained_positions(index)`, and `labels_sha256` (recorded at tokenize
    time, so stages.data.fingerprint never reads every label). `rows=(a, b)` views rows a..b-1."""

    CACHED_CHUNKS = 16

    def __init__(self, folder: Path, name: str, rows: tuple[int, int] | None = None, require_complete: bool = True):
        root = zarr.open_group(str(folder), mode="r")
        if require_complete and not root.attrs.get("complete"):
            raise InputError(f"token dataset {folder} is incomplete (its tokenize was interrupted): run the same "
                             "pipeline tokenize command again to finish it")
        group = root[name]
        self.name = name
        self.folder = Path(folder)
        self.num_classes = int(root.attrs["tokenizer"]["vocabulary"])
        self.source_sha256 = root.attrs["split_source_sha256"]
        self.seq = int(root.attrs["seq"])
        self.pad = int(root.attrs["tokenizer"]["pad"])
        self._tokens, self._trained = group["tokens"], group["trained"]
        self._chunk = int(self._tokens.chunks[0])
        first, last = rows if rows is not None else (0, int(group["lengths"].shape[0]))
        self.first_row = first  # the split's row 0 in the whole split (recorded by a cache: stages.cache_teacher)
        self._row_start = group["row_start"][first:last]
        self.lengths = group["lengths"][first:last].astype(np.int64)
        whole = rows is None or (first, last) == (0, int(group["lengths"].shape[0]))
        recorded = dict(group.attrs).get("fingerprint") if whole else None
        self._labels_sha256 = None if recorded is None else recorded["labels_sha256"]
        self._max_label = dict(group.attrs).get("max_label") if whole else None
        self.labels = TokenLabels(self)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def labels_sha256(self) -> str:
        if self._labels_sha256 is None:
            self._labels_sha256, self._max_label, _ = _streamed_labels(self)
        return self._labels_sha256

    @labels_sha256.setter
    def labels_sha256(self, value: str) -> None:
        self._labels_sha256 = value

    @property
    def max_label(self) -> int:
        if self._max_label is None:
            self._labels_sha256, self._max_label, _ = _streamed_labels(self)
        return self._max_label

    def _chunk_of(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if c in self._cache:
                self._cache.move_to_end(c)
                return self._cache[c]
        span = slice(c * self._chunk, min((c + 1) * self._chunk, self._tokens.shape[0]))
        value = (self._tokens[span], self._trained[span])
        with self._lock:
            self._cache[c] = value
            while len(self._cache) > self.CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return value

    def windows(self, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `index`'s tokens (B, seq+1) int64 (pad past each row's end), which of them are
        trained (B, seq+1) bool, and their lengths (B,)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        lengths = self.lengths[index]
        tokens = np.full((len(index), self.seq + 1), self.pad, dtype=np.int64)
        trained = np.zeros((len(index), self.seq + 1), dtype=bool)
        for b, (start, length) in enumerate(zip(self._row_start[index], lengths)):
            stop = start + length + 1
            at = 0
            for c in range(start // self._chunk, (stop - 1) // self._chunk + 1):
                values, mask = self._chunk_of(c)
                lo, hi = max(start, c * self._chunk) - c * self._chunk, min(stop, (c + 1) * self._chunk) - c * self._chunk
                tokens[b, at : at + hi - lo] = values[lo:hi]
                trained[b, at : at + hi - lo] = mask[lo:hi]
                at += hi - lo
        return tokens, trained, lengths

    def inputs(self, index: np.ndarray) -> torch.Tensor:
        tokens, _, lengths = self.windows(index)
        inputs = tokens[:, :-1]
        inputs[np.arange(self.seq)[None, :] >= lengths[:, None]] = self.pad
        return torch.from_numpy(np.ascontiguousarray(inputs))

    def trained_positions(self, index: np.ndarray) -> np.ndarray:
        """(B, seq) bool: True where the student learns the row's next token (the target at that
        position is trained); False past the row's length."""
        _, trained, lengths = self.windows(index)
        return trained[:, 1:] & (np.arange(self.seq)[None, :] < lengths[:, None])

    def label_rows(self, index) -> np.ndarray:
        tokens, _, lengths = self.windows(index)
        labels = tokens[:, 1:].copy()
        labels[np.arange(self.seq)[None, :] >= lengths[:, None]] = 0
        return labels


class TokenLabels:
    """A token split's labels as an array-like, read on indexing: `len`, `shape`, `dtype`,
    slices and integer arrays of rows (plus a column key, as numpy), and `max()` (recorded at
    tokenize time). `np.asarray` of it reads every row: what the stages avoid."""

    dtype = np.dtype(np.int64)
    ndim = 2

    def __init__(self, split: TokenSplit):
        self._split = split

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._split), self._split.seq)

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, slice):
            index = np.arange(*rows.indices(len(self)))
        elif np.isscalar(rows) or (isinstance(rows, np.ndarray) and rows.ndim == 0):
            row = self._split.label_rows([int(rows) + (len(self) if int(rows) < 0 else 0)])[0]
            return row[rest] if rest else row
        else:
            index = np.asarray(rows)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            index = np.where(index < 0, index + len(self), index)
        result = self._split.label_rows(index.astype(np.int64))
        return result[(slice(None), *rest)] if rest else result

    def max(self) -> int:
        return self._split.max_label

    def __array__(self, dtype=None, copy=None):
        whole = self._split.label_rows(np.arange(len(self)))
        return whole if dtype is None else whole.astype(dtype)


def token_splits(args: str) -> dict[str, TokenSplit]:
    """`tokens:DIR[,rows=A:B]` -> its splits (read lazily; `rows` views rows A..B-1 of each split,
    as a slice does: fewer where a split is shorter)."""
    path, *items = args.split(",")
    options = dict(TOKENS_OPTIONS)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in options:
            raise InputError(f"dataset spec tokens:{args}: bad option {item!r}; options are {', '.join(options)}")
        options[key] = value
    folder = Path(path)
    if not is_token_dataset(folder):
        raise InputError(f"tokens:{path}: not a token dataset (make one with pipeline tokenize SPEC --out {path})")
    root = zarr.open_group(str(folder), mode="r")
    if not root.attrs.get("complete"):
        raise InputError(f"token dataset {folder} is incomplete (its tokenize was interrupted): run the same pipeline tokenize "
                         "command again to finish it")
    if root.attrs.get("schema_version", 0) > SCHEMA_VERSION:
        raise InputError(f"token dataset {folder} has schema {root.attrs['schema_version']}, newer than this tool's {SCHEMA_VERSION}")
    rows = None
    if options["rows"] is not None:
        first, sep, last = options["rows"].partition(":")
        if not (sep and first.isdigit() and last.isdigit() and int(first) < int(last)):
            raise InputError(f"dataset spec tokens:{args}: rows is FIRST:STOP, e.g. rows=0:1000, got {options['rows']!r}")
        rows = (int(first), int(last))
    splits = {}
    for name in root.attrs.get("splits", []):
        count = int(root[name].attrs["num_rows"])
        # as a Python slice: a split shorter than the range gives the rows it has (none: an empty split, refused by its user)
        splits[name] = TokenSplit(folder, name, None if rows is None else (min(rows[0], count), min(rows[1], count)))
    return splits


def chat_directly(args: str) -> dict:
    """`chat:` as a command's dataset: chat data is tokenized once, by pipeline tokenize."""
    raise InputError(f"chat data is tokenized once: run pipeline tokenize chat:{args} --out DIR, then use --dataset tokens:DIR")
