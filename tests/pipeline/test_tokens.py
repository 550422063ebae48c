"""Token datasets (pipeline.tokens): `pipeline tokenize` of real documents (the standard library's
sources) and of a real instruction set (questions about standard-library functions answered by
their docstrings, rendered through a ChatML template), with the byte-level BPE trained on the
standard library; read back lazily as `tokens:DIR` by every command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.chat import IM_END, stdlib_chat_tokenizer, stdlib_instructions
from pipeline.corpus import stdlib_corpus, stdlib_tokenizer
from pipeline.datasets import resolve_dataset
from pipeline.tokens import TokenSplit, smallest_dtype
from stages.data import TensorSplit, fingerprint
from stages.runtime import check_labels_fit
from tests.conftest import invoke, invoke_json

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
PIPELINE = [sys.executable, "-m", "pipeline"]


@pytest.fixture(scope="session")
def tok512(tmp_path_factory) -> Path:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tokenizers") / "stdlib-512", vocab=512)


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory) -> Path:
    return stdlib_chat_tokenizer(tmp_path_factory.mktemp("tokenizers") / "chat-512")


@pytest.fixture(scope="session")
def stdlib_jsonl(tmp_path_factory) -> Path:
    """The standard library's top-level sources, a document per line (about 4.7 MB)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory, stdlib_jsonl) -> Path:
    """The first 30 of those documents, and an empty one (skipped)."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    lines = stdlib_jsonl.read_text(encoding="utf-8").splitlines()[:30]
    path.write_text("\n".join([*lines[:3], json.dumps({"text": ""}), *lines[3:]]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "instructions.jsonl"
    stdlib_instructions(path, limit=300)
    return path


def tokenize(spec: str, out: Path, *extra) -> dict:
    return invoke_json("tokenize", spec, "--out", out, *extra)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_rows(a, b) -> None:
    """Two splits hold the same rows: inputs, labels, lengths, and the same fingerprint."""
    assert len(a) == len(b)
    index = np.arange(len(a))
    np.testing.assert_array_equal(a.inputs(index).numpy(), b.inputs(index).numpy())
    np.testing.assert_array_equal(np.asarray(a.labels[index]), np.asarray(b.labels[index]))
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.num_classes == b.num_classes
    assert fingerprint(a) == fingerprint(b)


# --- corpus: ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options", ["seq=32,test=20", "seq=48,test=0,max_tokens=5000"])
def test_tokens_rows_and_fingerprints_equal_corpus_rows(tmp_path, tok512, small_jsonl, options):
    spec = f"corpus:{small_jsonl},tokenizer=hf:{tok512},{options}"
    report = tokenize(spec, tmp_path / "t.zarr", "--work-unit-bytes", 20000, "--chunk-tokens", 1000)
    corpus, tokens = resolve_dataset(spec), resolve_dataset(f"tokens:{tmp_path / 't.zarr'}")
    splits = ["train", "test"] if "test=20" in options else ["train"]
    assert sorted(report["splits"]) == sorted(splits)
    for name in splits:
        split = tokens.split(name)
        assert isinstance(split, TokenSplit)
        assert_same_rows(corpus.split(name), split)
        # every target of a corpus is trained; padding never is
        np.testing.assert_array_equal(split.trained_positions(np.arange(len(split))),
                                      np.arange(split.seq)[None, :] < split.lengths[:, None])
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert group.attrs["complete"] and group["train/tokens"].dtype == np.uint16
    assert len(group.attrs["tokenizer"]["files_sha256"]) == len(group.attrs["source"]["sha256"]) == 64


def test_smallest_dtype_holds_the_vocabulary():
    assert [smallest_dtype(v).name for v in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_labels_are_read_lazily_and_the_fingerprint_and_label_check_read_none(tmp_path, tok512, small_jsonl, monkeypatch):
    tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32,test=0", tmp_path / "t.zarr")
    split = resolve_dataset(f"tokens:{tmp_path / 't.zarr'}").split("train")
    labels = split.labels
    whole = np.asarray(labels)
    assert len(labels) == len(split) and labels.shape == whole.shape == (len(split), 32)
    np.testing.assert_array_equal(labels[3:9], whole[3:9])
    np.testing.assert_array_equal(labels[np.array([7, 0, 7, 2])], whole[[7, 0, 7, 2]])
    np.testing.assert_array_equal(labels[5], whole[5])
    np.testing.assert_array_equal(labels[5, :4], whole[5, :4])
    recorded = fingerprint(split)
    read = []
    monkeypatch.setattr(TokenSplit, "label_rows", lambda self, index: read.append(len(index)))
    assert fingerprint(split) == recorded
    check_labels_fit(split, (32, 512), "teacher")
    assert read == [] and labels.max() == int(whole.max())


def test_a_row_range_is_the_same_rows_with_their_own_fingerprint(tmp_path, tok512, small_jsonl):
    tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32,test=0", tmp_path / "t.zarr")
    whole = resolve_dataset(f"tokens:{tmp_path / 't.zarr'}").split("train")
    view = resolve_dataset(f"tokens:{tmp_path / 't.zarr'},rows=10:50").split("train")
    index = np.arange(10, 50)
    in_memory = TensorSplit("train", whole.inputs(index), np.asarray(whole.labels[index]), whole.num_classes, whole.lengths[10:50],
                            source_sha256=whole.source_sha256)
    assert_same_rows(in_memory, view)
    # as a slice: past the end gives the rows there are, none is an empty split
    assert len(resolve_dataset(f"tokens:{tmp_path / 't.zarr'},rows=10:99999").split("train")) == len(whole) - 10
    code, _, err = invoke("cache-teacher", "--dataset", f"tokens:{tmp_path / 't.zarr'},rows=99998:99999", "--teacher", "gpt2:layers=1,dim=16,heads=2")
    assert code == 2 and "is empty" in err and len(err.strip().splitlines()) == 1


# --- resume and workers ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference(tmp_path_factory, tok512, small_jsonl) -> tuple[str, Path]:
    """The 30 documents of small_jsonl (about 0.8 MB: some 15 work units of 16 KB, and nearly 200
    train chunks of 2,048 tokens, whose writing leaves a kill after the fifth seconds to land in)
    tokenized in one uninterrupted single-process run."""
    spec = f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=64,test=10"
    out = tmp_path_factory.mktemp("reference") / "t.zarr"
    tokenize(spec, out, "--work-unit-bytes", 16384, "--chunk-tokens", 2048)
    return spec, out


def test_two_workers_write_the_same_bytes_as_one(tmp_path, reference):
    spec, one = reference
    tokenize(spec, tmp_path / "two.zarr", "--work-unit-bytes", 16384, "--chunk-tokens", 2048, "--workers", 2)
    assert files_of(tmp_path / "two.zarr") == files_of(one)


@pytest.mark.parametrize("kill_on", ["tokenized 5/", "chunk 5/"])
def test_a_killed_tokenize_resumes_to_the_same_bytes(tmp_path, reference, kill_on):
    """SIGKILL once the progress shows finished work units (or written chunks), then the same command again."""
    spec, clean = reference
    out = tmp_path / "t.zarr"
    command = [*PIPELINE, "tokenize", spec, "--out", str(out), "--work-unit-bytes", "16384", "--chunk-tokens", "2048"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if kill_on in line:
                os.killpg(process.pid, signal.SIGKILL)
                break
        process.wait(timeout=1800)
        assert process.returncode == -signal.SIGKILL, "".join(seen[-5:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()
    killed = zarr.open_group(str(out), mode="r")
    assert not killed.attrs["complete"]
    # The kill lands some time after the line it waited for (later still on a loaded machine): what
    # the killed run had marked done is read back, not assumed.
    marked = killed["train"]["chunk_done"][:] if "train" in killed else np.zeros(0, np.uint8)
    code, _, err = invoke("cache-teacher", "--dataset", f"tokens:{out}", "--teacher", "gpt2:layers=1,dim=16,heads=2")
    assert code == 2 and "incomplete" in err and len(err.strip().splitlines()) == 1
    resumed = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    if kill_on.startswith("tokenized"):
        assert "resuming" in resumed.stderr
    else:
        # the train chunks marked before the kill (at least the five it waited for, not all) are not
        # written again; every other one is
        assert marked[:5].all() and not marked.all(), f"{int(marked.sum())} of {len(marked)} chunks marked"
        written = {int(line.split("train chunk ")[1].split("/")[0]) - 1 for line in resumed.stderr.splitlines() if "train chunk " in line}
        again = sorted(written & set(np.flatnonzero(marked).tolist()))
        assert not again and written == set(np.flatnonzero(marked == 0).tolist()), (
            f"chunks {again} were written again; {int(marked.sum())} of {len(marked)} had been marked")
    assert files_of(out) == files_of(clean)


def test_another_source_or_options_at_out_are_refused_and_overwrite_replaces(tmp_path, tok512, small_jsonl):
    out = tmp_path / "t.zarr"
    tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32", out)
    code, _, err = invoke("tokenize", f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=16", "--out", out)
    assert code == 2 and "another seq" in err and len(err.strip().splitlines()) == 1
    # --overwrite deletes nothing before the new source has been read and checked
    code, _, err = invoke("tokenize", f"corpus:{tmp_path / 'missing.jsonl'},tokenizer=hf:{tok512},seq=16", "--out", out, "--overwrite")
    assert code == 2 and "not found" in err and zarr.open_group(str(out), mode="r").attrs["complete"]
    assert tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=16", out, "--overwrite")["splits"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    code, _, err = invoke("tokenize", f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=16", "--out", tmp_path / "other", "--overwrite")
    assert code == 2 and "not a token dataset" in err and (tmp_path / "other" / "keep.txt").read_text() == "mine"


# --- chat: -----------------------------------------------------------------------------------

def assistant_mask_by_token_prefixes(tokenizer, turns: list[dict]) -> np.ndarray:
    """The assistant's tokens found another way than pipeline.tokens: by token prefixes. The tokens of
    the conversation rendered up to an assistant turn (with the generation prompt) and through it
    are prefixes of the whole; the tokens between are the assistant's."""
    whole = tokenizer.apply_chat_template(turns, tokenize=False)
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    mask = np.zeros(len(ids), dtype=bool)
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            before = tokenizer(tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            through = tokenizer(tokenizer.apply_chat_template(turns[: i + 1], tokenize=False), add_special_tokens=False)["input_ids"]
            assert ids[: len(through)] == through and ids[: len(before)] == before
            mask[len(before) : len(through)] = True
    return np.array(ids), mask


def test_chat_trained_positions_are_exactly_the_assistant_tokens(tmp_path, chat_tok):
    conversations = [
        [{"role": "system", "content": "You answer questions about Python."},
         {"role": "user", "content": "What does os.getcwd do?"},
         {"role": "assistant", "content": "Return a string representing the current working directory."}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "And len?"},
         {"role": "assistant", "content": "Return the number of items in a container."},
         {"role": "user", "content": "Thanks! Ünïcödé?"},
         {"role": "assistant", "content": " naïve café, with a leading space"}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations)
                    + json.dumps({"prompt": "What is 2+2?", "completion": "4"}) + "\n", encoding="utf-8")
    tokenize(f"chat:{path},tokenizer=hf:{chat_tok},seq=256,test=0", tmp_path / "c.zarr")
    split = resolve_dataset(f"tokens:{tmp_path / 'c.zarr'}").split("train")
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_tok, local_files_only=True)
    rows = conversations + [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]
    index = np.arange(len(split))
    assert len(split) == 3
    x, labels, trained = split.inputs(index).numpy(), split.labels[index], split.trained_positions(index)
    for row, turns in enumerate(rows):
        ids, mask = assistant_mask_by_token_prefixes(tokenizer, turns)
        n = split.lengths[row]
        assert n == len(ids) - 1
        np.testing.assert_array_equal(x[row, :n], ids[:-1])
        np.testing.assert_array_equal(labels[row, :n], ids[1:])
        np.testing.assert_array_equal(trained[row, :n], mask[1:])  # position i learns token i+1
        assert not trained[row, n:].any()
        # and what is trained reads as the assistant's turns, each with its end of turn
        runs = tokenizer.decode(labels[row][trained[row]].tolist())
        assert runs == "".join(t["content"] + IM_END + "\n" for t in turns if t["role"] == "assistant")
    assert fingerprint(split)["source_sha256"] == split.source_sha256

    tokenize(f"chat:{path},tokenizer=hf:{chat_tok},seq=256,test=0,train_on=all", tmp_path / "all.zarr")
    every = resolve_dataset(f"tokens:{tmp_path / 'all.zarr'}").split("train")
    np.testing.assert_array_equal(every.trained_positions(index), np.arange(256)[None, :] < every.lengths[:, None])
    assert fingerprint(every)["source_sha256"] != fingerprint(split)["source_sha256"]  # another mask is other data


def test_too_long_conversations_are_cut_or_dropped_and_counted(tmp_path, chat_tok, instructions):
    cut = tokenize(f"chat:{instructions},tokenizer=hf:{chat_tok},seq=128,test=0", tmp_path / "cut.zarr")
    dropped = tokenize(f"chat:{instructions},tokenizer=hf:{chat_tok},seq=128,test=0,too_long=drop", tmp_path / "drop.zarr")
    assert cut["counts"]["records"] == dropped["counts"]["records"] == 300
    assert cut["counts"]["cut"] == dropped["counts"]["dropped_too_long"] > 0
    assert cut["splits"]["train"]["rows"] + cut["counts"]["dropped_without_assistant"] == 300
    assert dropped["splits"]["train"]["rows"] == 300 - dropped["counts"]["dropped_too_long"]
    split = resolve_dataset(f"tokens:{tmp_path / 'cut.zarr'}").split("train")
    assert split.lengths.max() == 128 and split.trained_positions(np.arange(len(split))).any(axis=1).all()


# --- Hugging Face datasets sources -----------------------------------------------------------

def test_save_to_disk_parquet_and_arrow_sources_give_the_rows_of_the_jsonl(tmp_path, tok512, chat_tok, small_jsonl, instructions):
    datasets = pytest.importorskip("datasets")
    texts = [json.loads(line) for line in small_jsonl.read_text(encoding="utf-8").splitlines()]
    table = datasets.Dataset.from_list([{"body": row["text"], "source": row.get("source", "")} for row in texts])
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "docs.parquet"))
    tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32,test=20", tmp_path / "jsonl.zarr")
    for source in (tmp_path / "saved", tmp_path / "docs.parquet"):
        tokenize(f"corpus:{source},tokenizer=hf:{tok512},seq=32,test=20,field=body", tmp_path / f"{source.stem}.zarr")
        for name in ("train", "test"):
            assert_same_rows(resolve_dataset(f"tokens:{tmp_path / 'jsonl.zarr'}").split(name),
                             resolve_dataset(f"tokens:{tmp_path / f'{source.stem}.zarr'}").split(name))

    rows = [json.loads(line) for line in instructions.read_text(encoding="utf-8").splitlines()][:50]
    chats = datasets.Dataset.from_list([{"prompt": r["messages"][1]["content"], "answer": r["messages"][2]["content"]} for r in rows])
    arrow = tmp_path / "chats"
    chats.save_to_disk(str(arrow))
    file = next(arrow.glob("*.arrow"))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n" for r in chats.to_list()))
    tokenize(f"chat:{jsonl},tokenizer=hf:{chat_tok},seq=128,test=0", tmp_path / "pairs.zarr")
    tokenize(f"chat:{file},tokenizer=hf:{chat_tok},seq=128,test=0,completion=answer", tmp_path / "arrow.zarr")
    a, b = (resolve_dataset(f"tokens:{tmp_path / n}").split("train") for n in ("pairs.zarr", "arrow.zarr"))
    assert_same_rows(a, b)
    np.testing.assert_array_equal(a.trained_positions(np.arange(len(a))), b.trained_positions(np.arange(len(b))))


# --- bad input: one line, exit 2 -------------------------------------------------------------

def one_line_exit_2(*args) -> str:
    code, _, err = invoke(*args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_rows_missing_templates_and_unknown_columns_are_one_line_errors(tmp_path, tok512, chat_tok):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    cases = {
        "not json": (f"{good}\n{good}\n{{oops\n", "line 3 is not JSON"),
        "no turns": (f"{good}\n\n{json.dumps({'question': 'x'})}\n", "line 3 has neither"),
        "bad turn": (f"{json.dumps({'messages': [{'role': 'user'}]})}\n", "line 1: 'messages' must be"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.jsonl"
        path.write_text(text)
        out = tmp_path / f"{name.replace(' ', '-')}.zarr"
        assert expected in one_line_exit_2("tokenize", f"chat:{path},tokenizer=hf:{chat_tok},seq=32", "--out", out), name
        assert not (out / "train").exists()  # nothing assembled from a partial pass
    # from a worker process of a pool, the same line
    path = tmp_path / "late.jsonl"
    path.write_text(f"{good}\n" * 400 + "[1, 2]\n" + f"{good}\n" * 10)
    err = one_line_exit_2("tokenize", f"chat:{path},tokenizer=hf:{chat_tok},seq=32", "--out", tmp_path / "late.zarr",
                          "--workers", 2, "--work-unit-bytes", 4096)
    assert "line 401 is not a JSON object" in err
    path = tmp_path / "ok.jsonl"
    path.write_text(good + "\n")
    assert "no chat template" in one_line_exit_2("tokenize", f"chat:{path},tokenizer=hf:{tok512},seq=32", "--out", tmp_path / "n.zarr")
    assert "train_on is" in one_line_exit_2("tokenize", f"chat:{path},tokenizer=hf:{chat_tok},seq=32,train_on=x", "--out", tmp_path / "x.zarr")
    assert "tokenized once" in one_line_exit_2("cache-teacher", "--dataset", f"chat:{path},tokenizer=hf:{chat_tok},seq=32",
                                               "--teacher", "gpt2:layers=1,dim=16,heads=2")
    assert "not a token dataset" in one_line_exit_2("cache-teacher", "--dataset", f"tokens:{tmp_path}", "--teacher", "gpt2:layers=1,dim=16,heads=2")

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "some text"}]).to_parquet(str(tmp_path / "t.parquet"))
    err = one_line_exit_2("tokenize", f"corpus:{tmp_path / 't.parquet'},tokenizer=hf:{tok512},seq=32", "--out", tmp_path / "p.zarr")
    assert "no column 'text'" in err and "body" in err
    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(tmp_path / "saved"))
    err = one_line_exit_2("tokenize", f"chat:{tmp_path / 'saved'},tokenizer=hf:{chat_tok},seq=32", "--out", tmp_path / "s.zarr")
    assert "no column 'prompt'" in err


# --- the stages on tokens:DIR, through the CLI --------------------------------------------------

def test_cache_teacher_and_train_student_run_on_a_token_dataset(tmp_path, tok512, small_jsonl, chat_tok, instructions):
    """A cache of tokens:DIR equals the cache of the corpus: it was made from (the same rows and
    fingerprint), a student trains from it, and a chat set's cache and student run too."""
    spec = f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32,test=20"
    tokenize(spec, tmp_path / "t.zarr", "--workers", 1)
    teacher = "gpt2:layers=1,dim=16,heads=2"
    common = ("--teacher", teacher, "--split", "test", "--temperature", 2, "--format", "topk", "--top-k", 4, "--device", "cpu",
              "--batch-size", 16)
    from_tokens = invoke_json("cache-teacher", "--dataset", f"tokens:{tmp_path / 't.zarr'}", "--out", tmp_path / "a.zarr", *common)
    from_corpus = invoke_json("cache-teacher", "--dataset", spec, "--out", tmp_path / "b.zarr", *common)
    assert from_tokens["chunks_total"] == from_corpus["chunks_total"]
    a, b = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("a.zarr", "b.zarr"))
    assert a.attrs["dataset"]["fingerprint"] == b.attrs["dataset"]["fingerprint"]
    for name in ("index", "labels", "lengths"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    run = invoke_json("train-student", "--cache", tmp_path / "a.zarr", "--student", teacher, "--epochs", 1, "--batch-size", 16,
                      "--device", "cpu", "--eval-split", "test", "--out", tmp_path / "run")
    assert run
    # the corpus: cache trains with the token dataset named instead: the fingerprints agree
    assert invoke_json("train-student", "--cache", tmp_path / "b.zarr", "--dataset", f"tokens:{tmp_path / 't.zarr'}", "--student", teacher,
                       "--epochs", 1, "--batch-size", 16, "--device", "cpu", "--eval-split", "test", "--out", tmp_path / "run2")

    tokenize(f"chat:{instructions},tokenizer=hf:{chat_tok},seq=128,test=10", tmp_path / "c.zarr", "--workers", 2)
    invoke_json("cache-teacher", "--dataset", f"tokens:{tmp_path / 'c.zarr'}", "--out", tmp_path / "chat.zarr",
                *common[:2], "--split", "train", *common[4:])
    assert invoke_json("train-student", "--cache", tmp_path / "chat.zarr", "--student", teacher, "--epochs", 1, "--batch-size", 16,
                       "--device", "cpu", "--out", tmp_path / "chat-run")


def test_dask_workers_read_the_token_dataset_and_write_the_same_cache(tmp_path, tok512, small_jsonl):
    """cache-teacher --workers 2: each dask worker opens tokens:DIR itself (no corpus in the task
    graph, none re-tokenized), and the cache equals the single-process one bit for bit."""
    from tests.conftest import assert_same_cache

    tokenize(f"corpus:{small_jsonl},tokenizer=hf:{tok512},seq=32,test=20", tmp_path / "t.zarr")
    dataset, teacher = f"tokens:{tmp_path / 't.zarr'},rows=0:96", "gpt2:layers=1,dim=16,heads=2"
    invoke_json("train-teacher", "--model", teacher, "--dataset", dataset, "--epochs", 1, "--batch-size", 16, "--device", "cpu",
                "--out", tmp_path / "teacher.safetensors")
    common = ("--teacher", teacher, "--teacher-weights", tmp_path / "teacher.safetensors", "--dataset", dataset, "--temperature", 2,
              "--format", "topk", "--top-k", 8, "--chunk-rows", 16, "--batch-size", 16, "--device", "cpu")
    invoke_json("cache-teacher", *common, "--out", tmp_path / "one.zarr")
    invoke_json("cache-teacher", *common, "--workers", 2, "--out", tmp_path / "two.zarr")
    assert_same_cache(tmp_path / "one.zarr", tmp_path / "two.zarr")
    # verify re-runs the teacher on rows it reads from tokens:DIR; evaluate measures on it
    report = invoke_json("verify", tmp_path / "two.zarr", "--teacher", teacher, "--teacher-weights", tmp_path / "teacher.safetensors",
                         "--samples", 4, "--device", "cpu")
    assert report["ok"], report
    metrics = invoke_json("evaluate", "--model", teacher, "--weights", tmp_path / "teacher.safetensors", "--dataset", dataset,
                          "--cache", tmp_path / "one.zarr", "--batch-size", 16, "--device", "cpu")
    assert metrics
