"""Every kind checks its values for what its encoder writes (Kind.row_problem, run by the reader on
a chunk's first read and by verify on every write unit), and rows about to train for what would
make the loss NaN, an IndexError or negative (Kind.loss_problems): values no writer produces are
damage naming the array, at a small class count and at a language model's 32,000, for rows with
and without positions, and through the CLI (train-student, verify and inspect exit 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.datasets import resolve_dataset
from stages.cache.format import row_problem
from stages.cache.layout import Layout
from stages.errors import CacheDamagedError
from stages.kinds import KINDS
from stages.loop import CacheDataset, kd_loss
from stages.teacher_rows import stored_rows
from tests.conftest import DATASET, cache_with_cli, invoke
from tests.stages.cache.conftest import as_schema, reseal

OPTIONS = {"dense": {}, "topk": {"top_k": 6}, "qtopk": {"top_k": 6, "value_bits": 4}, "sampled": {"samples": 12},
           "headtail": {"top_k": 6, "value_bits": 4, "samples": 12}}
ROWS, TOKENS = 6, 12
LENGTHS = np.array([12, 9, 4, 12, 7, 5])
AT = (1, 2)  # a valid position of the token rows (row 1 has 9 tokens); row 1 of the rows without positions


def _layout(kind: str, classes: int, tokens: int | None, **options) -> Layout:
    return Layout(kind=kind, num_samples=ROWS, num_classes=classes, chunk_rows=ROWS, dtype="float16",
                  options={**OPTIONS[kind], **options}, tokens=tokens)


def _rows(kind: str, classes: int, tokens: int | None) -> dict[str, np.ndarray]:
    """A chunk of rows as `kind`'s encoder writes them from a teacher's logits / T, with their
    index (and lengths: some rows end early, their padding zeroed)."""
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(ROWS, *((tokens,) if tokens else ()), classes, generator=generator) * 3
    lengths = torch.from_numpy(LENGTHS) if tokens else None
    stored = stored_rows(logits, _layout(kind, classes, tokens), lengths, row_index=torch.arange(ROWS))
    rows = {name: values.numpy().copy() for name, values in stored.items() if name != "encoding_error"}
    rows["index"] = np.arange(ROWS)
    if tokens:
        rows["lengths"] = LENGTHS.astype(np.int32)
    return rows


def _at(rows, tokens):
    return AT if tokens else AT[:1]


def _set(name, value):
    def tamper(rows, at, classes):
        rows[name][at] = value(rows[name][at], classes) if callable(value) else value
    return tamper


def _ids_reversed(rows, at, classes):
    used = rows["sampled_counts"][at] > 0
    ids = rows["sampled_ids"][at]
    ids[used] = ids[used][::-1]


def _first_repeated(values, classes):
    out = values.copy()
    out[1] = out[0]
    return out


# (kind, case, tamper, the array the problem names): each a value its encoder cannot write.
CASES = [
    ("qtopk", "scale 0", _set("qtopk_scale", 0), "qtopk_scale"),
    ("qtopk", "scale 60000", _set("qtopk_scale", 60000), "qtopk_scale"),
    ("qtopk", "scale below the smallest step", _set("qtopk_scale", 2.0**-16), "qtopk_scale"),
    ("qtopk", "a code above 2^value_bits - 1", _set("qtopk_codes", lambda c, _: np.where(c == c.max(), 200, c)), "qtopk_codes"),
    ("qtopk", "no code 0 for the top class", _set("qtopk_codes", lambda c, _: c + 1), "qtopk_codes"),
    ("qtopk", "one class repeated K times", _set("qtopk_class_deltas", lambda d, _: np.r_[d[:1], np.zeros(len(d) - 1, d.dtype)]),
     "qtopk_class_deltas"),
    ("qtopk", "every class 0", _set("qtopk_class_deltas", 0), "qtopk_class_deltas"),
    ("qtopk", "a class past the last", _set("qtopk_class_deltas", lambda d, c: np.r_[d[:-1], d[-1:] + c]), "qtopk_class_deltas"),
    ("qtopk", "a tail of 1", _set("qtopk_tail", 1.0), "qtopk_tail"),
    ("qtopk", "a negative tail", _set("qtopk_tail", -0.25), "qtopk_tail"),
    ("sampled", "counts zeroed", _set("sampled_counts", 0), "sampled_counts"),
    ("sampled", "counts summing past S", _set("sampled_counts", lambda n, _: n + (n > 0)), "sampled_counts"),
    ("sampled", "an unused slot first", _set("sampled_counts", lambda n, _: np.r_[0, n[:-1]]), "sampled_counts"),
    ("sampled", "ids out of order", _ids_reversed, "sampled_ids"),
    ("sampled", "an id repeated", _set("sampled_ids", _first_repeated), "sampled_ids"),
    ("sampled", "an id past the vocabulary", _set("sampled_ids", lambda i, c: np.where(i == i.max(), c, i)), "sampled_ids"),
    ("headtail", "a code above 2^value_bits - 1", _set("qtopk_codes", lambda c, _: np.where(c == c.max(), 200, c)), "qtopk_codes"),
    ("headtail", "a tail of 1", _set("qtopk_tail", 1.0), "qtopk_tail"),
    ("headtail", "counts zeroed", _set("sampled_counts", 0), "sampled_counts"),
    ("headtail", "counts summing past S", _set("sampled_counts", lambda n, _: n + (n > 0)), "sampled_counts"),
    ("headtail", "ids out of order", _ids_reversed, "sampled_ids"),
    ("headtail", "an id past the vocabulary", _set("sampled_ids", lambda i, c: np.where(i == i.max(), c, i)), "sampled_ids"),
    ("headtail", "a negative tail entropy", _set("tail_entropy", -1.0), "tail_entropy"),
    ("topk", "a class past the last", _set("topk_indices", lambda i, c: np.r_[i[:-1], c]), "topk_indices"),
    ("topk", "a class repeated", _set("topk_indices", _first_repeated), "topk_indices"),
    ("topk", "values reversed", _set("topk_values", lambda v, _: v[::-1]), "topk_values"),
    ("topk", "log-sum-exp lowered", _set("logsumexp", lambda s, _: s - 5), "logsumexp"),
    ("dense", "a NaN", _set("logits", np.nan), "logits"),
    ("dense", "an infinity", _set("logits", np.inf), "logits"),
]


@pytest.mark.parametrize("classes,tokens,lengths", [(50, None, False), (32_000, TOKENS, True), (32_000, TOKENS, False)],
                         ids=["50-classes-per-row", "32000-classes-per-token", "32000-classes-per-token-without-lengths"])
@pytest.mark.parametrize("kind,case,tamper,array", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_value_no_encoder_writes_is_a_problem_naming_its_array(kind, case, tamper, array, classes, tokens, lengths):
    """`lengths` False: the rows as train-student reads them (without the lengths array): which
    positions are padding, the zeros every encoder leaves there tell."""
    layout = _layout(kind, classes, tokens)
    rows = _rows(kind, classes, tokens)
    if not lengths:
        rows.pop("lengths", None)
    assert row_problem(rows, layout, ROWS) is None
    tamper(rows, _at(rows, tokens), classes)
    problem = row_problem(rows, layout, ROWS)
    assert problem is not None and array in problem, (case, problem)


@pytest.mark.parametrize("classes", [50, 32_000])
def test_value_bits_other_than_the_codes_were_written_with_are_a_problem(classes):
    rows = _rows("qtopk", classes, TOKENS)
    assert "above 2^value_bits - 1 = 7" in row_problem(rows, _layout("qtopk", classes, TOKENS, value_bits=3), ROWS)
    assert "not reaching 31" in row_problem(rows, _layout("qtopk", classes, TOKENS, value_bits=5), ROWS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lengths_lowered_or_a_trained_mark_past_them_are_a_problem(kind):
    layout = _layout(kind, 32_000, TOKENS)
    rows = _rows(kind, 32_000, TOKENS)
    lowered = {**rows, "lengths": rows["lengths"] - 2}
    assert "lengths lowered" in row_problem(lowered, layout, ROWS)
    within = np.arange(TOKENS)[None, :] < rows["lengths"][:, None]
    trained = within.astype(np.uint8)
    assert row_problem({**rows, "trained": trained}, layout, ROWS) is None
    trained[2, 6] = 1  # row 2 has 4 tokens
    assert "trained marks past a row's lengths" in row_problem({**rows, "trained": trained}, layout, ROWS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_encoders_own_rows_pass_at_the_edges(kind):
    """Every class kept (no tail), one kept, one draw, a flat teacher and a sharp one."""
    for classes, options in ((8, {"top_k": 8, "samples": 1}), (8, {"top_k": 1, "samples": 255})):
        options = {name: value for name, value in options.items() if name in OPTIONS[kind]}
        layout = _layout(kind, classes, None, **options)
        for scale in (0.0, 1e-3, 30.0):
            logits = torch.randn(ROWS, classes, generator=torch.Generator().manual_seed(classes)) * scale
            rows = {name: values.numpy() for name, values in stored_rows(logits, layout, row_index=torch.arange(ROWS)).items()}
            assert KINDS[kind].row_problem(rows, layout) is None, (options, scale)


# The loss path: rows that reach kd_loss after their chunk was checked.
LOSS_CASES = [
    ("dense", "logits", lambda rows, c: rows["logits"].__setitem__((1, 3), np.nan), "non-finite logits"),
    ("topk", "topk_indices", lambda rows, c: rows["topk_indices"].__setitem__((1, 0), c), "topk_indices outside"),
    ("qtopk", "qtopk_class_deltas", lambda rows, c: rows["qtopk_class_deltas"].__setitem__((1, 0), c), "qtopk_class_deltas"),
    ("qtopk", "qtopk_scale", lambda rows, c: rows["qtopk_scale"].__setitem__(1, np.nan), "qtopk_scale"),
    ("sampled", "sampled_counts", lambda rows, c: rows["sampled_counts"].__setitem__(1, 0), "sampled_counts"),
    ("sampled", "sampled_ids", lambda rows, c: rows["sampled_ids"].__setitem__((1, 0), c), "sampled_ids"),
    ("headtail", "sampled_counts", lambda rows, c: rows["sampled_counts"].__setitem__(1, 0), "sampled_counts"),
    ("headtail", "qtopk_scale", lambda rows, c: rows["qtopk_scale"].__setitem__(1, np.nan), "qtopk_scale"),
    ("headtail", "tail_entropy", lambda rows, c: rows["tail_entropy"].__setitem__(1, np.nan), "tail_entropy"),
]


@pytest.mark.parametrize("classes", [50, 32_000])
@pytest.mark.parametrize("kind,array,tamper,named", LOSS_CASES, ids=[f"{c[0]}-{c[1]}" for c in LOSS_CASES])
def test_rows_that_would_give_a_nan_an_index_error_or_a_negative_loss_are_damage_in_the_loss(kind, array, tamper, named, classes):
    rows = _rows(kind, classes, None)
    student = torch.randn(ROWS, classes, generator=torch.Generator().manual_seed(5))
    batch = {"kind": kind, "temperature": 2.0, **{name: torch.from_numpy(rows[name]) for name in KINDS[kind].soft_arrays}}
    assert torch.isfinite(kd_loss(student, batch, alpha=1.0))
    tamper(rows, classes)
    batch.update({name: torch.from_numpy(rows[name]) for name in KINDS[kind].soft_arrays})
    with pytest.raises(CacheDamagedError, match=named):
        kd_loss(student, batch, alpha=1.0)


# Through the CLI: a chunk rewritten with impossible values (its checksum recomputed by zarr).
CLI_CASES = [
    ("dense", (), "logits", lambda a: np.where(np.arange(a.shape[-1]) == 1, np.nan, a)),
    ("topk", ("--top-k", 3), "topk_indices", lambda a: np.where(np.arange(a.shape[-1]) == 1, a[..., :1], a)),
    ("qtopk", ("--top-k", 3, "--value-bits", 4), "qtopk_scale", lambda a: np.zeros_like(a)),
    ("qtopk", ("--top-k", 3, "--value-bits", 4), "qtopk_codes", lambda a: a + 1),
    ("sampled", ("--samples", 8), "sampled_counts", lambda a: np.zeros_like(a)),
    ("sampled", ("--samples", 8), "sampled_ids", lambda a: a[..., ::-1]),
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_weights):
    made = {}

    def made_cache(kind, options):
        if (kind, options) not in made:
            out = tmp_path_factory.mktemp("caches") / f"{kind}.zarr"
            made[kind, options] = cache_with_cli(out, teacher_weights, "--format", kind, *options)["cache"]
        return made[kind, options]
    return made_cache


def _rewrite_chunk(cache, array: str, chunk: int, change) -> None:
    """Chunk `chunk` of `array` changed by `change`, its first row kept: zarr deletes a chunk
    written all fill value, which would make this a missing chunk rather than impossible values.
    The manifest is resealed, as a faulty writer would have recorded its own values: else the
    manifest's check, not the kind's, would find the edit."""
    values = zarr.open_array(f"{cache}/{array}", mode="r+")
    rows = slice(chunk * values.chunks[0] + 1, (chunk + 1) * values.chunks[0])
    values[rows] = change(values[rows])
    if "chunk_manifest" in zarr.open_group(str(cache), mode="r"):
        reseal(cache)


@pytest.mark.parametrize("kind,options,array,change", CLI_CASES, ids=[f"{c[0]}-{c[2]}" for c in CLI_CASES])
def test_impossible_values_in_a_chunk_stop_train_student_verify_and_inspect_naming_the_array(
        kind, options, array, change, caches, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(caches(kind, options), broken)
    _rewrite_chunk(broken, array, 2, change)
    commands = {"train-student": ("train-student", "--cache", broken, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run"),
                "verify": ("verify", broken), "inspect": ("inspect", broken)}
    for command, args in commands.items():
        code, _, err = invoke(*args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "internal error" not in err, (command, code, err)
        named = err if command != "verify" else json.dumps(json.loads(invoke(*args, "--json")[1]))
        assert array in named and ("chunk 2" in named or command == "inspect"), (command, named)
    assert not (tmp_path / "run" / "summary.json").exists()


def _epoch(data: CacheDataset, student: torch.nn.Module) -> int:
    """One epoch of kd_loss over `data`, as a user's loop runs it; the batches it took."""
    batches = 0
    for batch in data:
        loss = kd_loss(student(batch["inputs"]), batch, alpha=1.0 if "labels" not in batch else 0.5)
        assert torch.isfinite(loss)
        batches += 1
    return batches


LONG_LIVED_CASES = [
    ("dense", (), "logits", lambda a: np.where(np.arange(a.shape[-1]) == 1, np.nan, a), "non-finite logits"),
    ("topk", ("--top-k", 3), "topk_indices", lambda a: np.where(np.arange(a.shape[-1]) == 1, 4, a), "topk_indices outside"),
    ("qtopk", ("--top-k", 3, "--value-bits", 4), "qtopk_class_deltas", lambda a: a + 4, "qtopk_class_deltas"),
    ("sampled", ("--samples", 8), "sampled_counts", lambda a: np.zeros_like(a), "sampled_counts"),
]


@pytest.mark.parametrize("kind,options,array,change,named", LONG_LIVED_CASES, ids=[c[0] for c in LONG_LIVED_CASES])
def test_a_chunk_damaged_after_a_long_lived_reader_checked_it_is_damage_not_a_nan_loss_or_an_index_error(
        kind, options, array, change, named, caches, tmp_path):
    """The reader checks a chunk's values on its first read, and its checksum on every read. In a
    cache of schema 5 (no manifest, which a reader holds from its opening and checks every chunk
    read against), a chunk rewritten since, checksum and all, reaches the loss, which refuses
    what it cannot train on; in a schema 6 cache the manifest finds it first."""
    for schema in (5, 6):
        cache = tmp_path / f"cache-{schema}.zarr"
        shutil.copytree(caches(kind, options), cache)
        if schema == 5:
            as_schema(cache, 5)
        data = CacheDataset(cache, resolve_dataset(DATASET).split("train"), batch_size=64, seed=0)
        student = torch.nn.Linear(8, 4)
        assert _epoch(data, student) > 1
        _rewrite_chunk(cache, array, 2, change)
        with pytest.raises(CacheDamagedError, match=named if schema == 5 else f"array {array}: chunk 2 is not the chunk written there"):
            _epoch(data, student)


@pytest.mark.parametrize("damaged", ["before", "after"])
def test_labels_a_cache_holds_other_than_the_datasets_are_damage_naming_their_chunk(damaged, cache_path):
    """The dataset's labels matched the cache's fingerprint when it was opened: a labels chunk
    replaced (its checksum, and in a schema 6 cache its manifest entry, recomputed) before the
    cache is opened, or after the reader first read it (schema 5: without a manifest to find it
    first), is damage."""
    student = torch.nn.Linear(8, 4)
    if damaged == "after":
        as_schema(cache_path, 5)
        data = CacheDataset(cache_path, resolve_dataset(DATASET).split("train"), batch_size=64, seed=0)
        assert _epoch(data, student) > 1
    _rewrite_chunk(cache_path, "labels", 2, lambda labels: (labels + 1) % 4)
    if damaged == "before":
        data = CacheDataset(cache_path, resolve_dataset(DATASET).split("train"), batch_size=64, seed=0)
    with pytest.raises(CacheDamagedError, match="array labels: chunk 2 holds labels that differ from the dataset's"):
        _epoch(data, student)


@pytest.mark.parametrize("figure,value", [("kl", -0.5), ("positions", 1e9), ("largest", 1.5), ("positions", 0.5)])
def test_an_encoding_error_record_no_encoding_gives_is_damage_for_inspect(figure, value, caches, tmp_path):
    cache = tmp_path / "q.zarr"
    shutil.copytree(caches("qtopk", ("--top-k", 3, "--value-bits", 4)), cache)
    assert invoke("inspect", cache)[0] == 0
    record = zarr.open_array(f"{cache}/encoding_error", mode="r+")
    record[1, {"positions": 0, "largest": 2, "kl": 3}[figure]] = value
    code, _, err = invoke("inspect", cache)
    assert code == 4 and "encoding_error record of chunk 1 holds figures no encoding gives" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_token_cache_at_32000_classes_whose_counts_were_zeroed_at_valid_positions_never_trains(tmp_path):
    """Zeroed counts where a sequence has tokens looked like padding to a reader without the
    lengths (train-student's), and trained with a negative distillation loss."""
    pytest.importorskip("transformers")
    model = "gpt2:layers=1,dim=16,heads=2,vocab=32000"
    cache = tmp_path / "sampled.zarr"
    code, _, err = invoke("cache-teacher", "--teacher", model, "--dataset", "stdlib-bytes:seq=16,train=2048,test=256",
                          "--format", "sampled", "--samples", 8, "--chunk-rows", 32, "--device", "cpu", "--out", cache)
    assert code == 0, err
    lengths = zarr.open_array(f"{cache}/lengths", mode="r")[33:64]
    valid = np.arange(16)[None, :] < lengths[:, None]
    _rewrite_chunk(cache, "sampled_counts", 1, lambda counts: np.where(valid[..., None], 0, counts))
    commands = {"train-student": ("train-student", "--cache", cache, "--student", model, "--epochs", "1", "--device", "cpu",
                                  "--out", tmp_path / "run"),
                "verify": ("verify", cache), "inspect": ("inspect", cache)}
    for command, args in commands.items():
        code, _, err = invoke(*args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "internal error" not in err, (command, code, err)
        named = err if command != "verify" else json.dumps(json.loads(invoke(*args, "--json")[1]))
        assert "sampled_counts that do not sum" in named and "chunk 1" in named, (command, named)
    assert not (tmp_path / "run" / "summary.json").exists()
