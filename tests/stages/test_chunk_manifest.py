"""A cache reads only what its writer wrote there: chunks swapped, copied from another cache,
moved inside a shard's index or linked to another cache's; a chunk or `chunk_done` deleted; an
edited `temperature`; checksums removed; a link to /dev/zero or a FIFO in place of a chunk. Each
is damage (exit 4, one line naming the array and the chunk) for train-student, verify and inspect,
for unsharded and sharded caches and every kind it applies to. Each case edits a real small cache
with plain file writes or plain zarr, as someone outside this tool would."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from stages.cache import CacheReader
from stages.errors import CacheDamagedError
from tests.conftest import CHUNK_ROWS, SHARD_ROWS, cache_with_cli, invoke

KIND_FLAGS = {
    "dense": [], "topk": ["--format", "topk", "--top-k", "2"],
    "qtopk": ["--format", "qtopk", "--top-k", "2", "--value-bits", "4"],
    "sampled": ["--format", "sampled", "--samples", "5", "--sample-seed", "3"],
}
INTEGER_ARRAYS = {"topk": ["topk_indices"], "qtopk": ["qtopk_codes", "qtopk_class_deltas"], "sampled": ["sampled_ids", "sampled_counts"]}
PER_SHARD = SHARD_ROWS // CHUNK_ROWS


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_weights):
    """Made once: (kind, sharded, temperature) -> a complete cache; the tests damage copies."""
    folder = tmp_path_factory.mktemp("caches")
    made = {}

    def get(kind: str = "dense", sharded: bool = False, temperature: float | None = None) -> Path:
        key = (kind, sharded, temperature)
        if key not in made:
            out = folder / f"{kind}-{'sharded' if sharded else 'plain'}-{temperature}.zarr"
            extra = [*KIND_FLAGS[kind], "--shard-rows", str(SHARD_ROWS if sharded else 0)]
            cache_with_cli(out, teacher_weights, *extra, *(["--temperature", str(temperature)] if temperature else []))
            made[key] = out
        return made[key]

    return get


def _copy(source: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken.zarr"
    shutil.copytree(source, broken)
    return broken


def _object(cache: Path, name: str, key: int) -> Path:
    """The file of chunk (or shard) `key` of array `name`: c/KEY/0/... for each axis after the first."""
    return cache / name / "c" / str(key) / Path(*["0"] * (len(zarr.open_array(str(cache / name), mode="r").shape) - 1))


def _assert_damage(cache: Path, tmp_path: Path, *named: str) -> None:
    """train-student, verify and inspect each stop with exit 4 and one line naming one of `named`."""
    commands = {
        "train-student": ["train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run"],
        "verify": ["verify", cache, "--json"],
        "inspect": ["inspect", cache, "--png", tmp_path / "i.png"],
    }
    for command, args in commands.items():
        code, out, err = invoke(*args)
        lines = err.strip().splitlines()
        assert code == 4 and "internal error" not in err, (command, code, err)
        # verify reports the damage it finds in its report; damage that stops it before one, as the others do
        in_report = command == "verify" and out.strip()
        text = out if in_report else lines[0]
        assert in_report or len(lines) == 1, (command, err)
        assert any(n in text for n in named), (command, text[:2000])
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_two_logits_chunks_swapped_are_damage(caches, tmp_path, sharded):
    broken = _copy(caches(sharded=sharded), tmp_path)
    if sharded:  # two whole shards of the same size swapped
        first, second = _object(broken, "logits", 1), _object(broken, "logits", 2)
        chunks = [2, 4]
    else:
        first, second = _object(broken, "logits", 1), _object(broken, "logits", 3)
        chunks = [1, 3]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    _assert_damage(broken, tmp_path, *(f"array logits: chunk {c} is not the chunk written there" for c in chunks))


def test_swapped_entries_of_a_shard_index_with_its_checksum_recomputed_are_damage(caches, tmp_path):
    broken = _copy(caches(sharded=True), tmp_path)
    shard = _object(broken, "logits", 1)
    data = bytearray(shard.read_bytes())
    index_bytes = 16 * PER_SHARD + 4
    index = np.frombuffer(bytes(data[-index_bytes:-4]), "<u8").reshape(PER_SHARD, 2)[::-1].copy()
    data[-index_bytes:-4] = index.tobytes()
    data[-4:] = google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    assert CacheReader(caches(sharded=True)).read_chunks(2, 3)  # the original reads
    _assert_damage(broken, tmp_path, "array logits: chunk 2 is not the chunk written there",
                   "array logits: chunk 3 is not the chunk written there")


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("how", ["copied", "linked"])
def test_a_chunk_or_shard_copied_or_linked_from_another_cache_of_the_same_geometry_is_damage(caches, tmp_path, sharded, how):
    broken, other = _copy(caches(sharded=sharded), tmp_path), caches(sharded=sharded, temperature=2.0)
    target, source = _object(broken, "logits", 2), _object(other, "logits", 2)
    target.unlink()
    if how == "copied":
        shutil.copyfile(source, target)
        named = [f"array logits: chunk {c} is not the chunk written there" for c in ([4, 5] if sharded else [2])]
    else:  # never followed: a cache's chunks are its own files
        target.symlink_to(source)
        named = [f"array logits: chunk {4 if sharded else 2} cannot be read ({target} is a symbolic link"]
    _assert_damage(broken, tmp_path, *named)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_labels_chunk_copied_from_another_chunk_is_damage(caches, tmp_path, sharded):
    broken = _copy(caches(sharded=sharded), tmp_path)
    shutil.copyfile(_object(broken, "labels", 0), _object(broken, "labels", 1))
    _assert_damage(broken, tmp_path, *(f"array labels: chunk {c} is not the chunk written there"
                                       for c in ([2, 3] if sharded else [1])))


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(("kind", "name"), [(kind, name) for kind, names in INTEGER_ARRAYS.items() for name in names]
                         + [("dense", "index"), ("dense", "labels")])
def test_a_deleted_chunk_of_any_array_is_damage_never_its_fill_value(caches, tmp_path, kind, name, sharded):
    broken = _copy(caches(kind, sharded=sharded), tmp_path)
    _object(broken, name, 1).unlink()
    _assert_damage(broken, tmp_path, f"array {name}: chunk {PER_SHARD if sharded else 1} is missing")


def test_a_chunk_missing_from_its_shard_index_is_damage(caches, tmp_path):
    broken = _copy(caches("topk", sharded=True), tmp_path)
    shard = _object(broken, "topk_indices", 1)
    data = bytearray(shard.read_bytes())
    index_bytes = 16 * PER_SHARD + 4
    index = np.frombuffer(bytes(data[-index_bytes:-4]), "<u8").reshape(PER_SHARD, 2).copy()
    index[1] = 2**64 - 1  # "never written", as zarr marks an empty chunk
    data[-index_bytes:-4] = index.tobytes()
    data[-4:] = google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    _assert_damage(broken, tmp_path, "array topk_indices: chunk 3 is missing")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_deleted_chunk_done_record_of_a_complete_cache_is_damage(caches, tmp_path, sharded):
    broken = _copy(caches(sharded=sharded), tmp_path)
    (broken / "chunk_done" / "c" / "1").unlink()
    _assert_damage(broken, tmp_path, "array chunk_done: chunk 1 is missing")


@pytest.mark.parametrize("kind", ["dense", "qtopk"])
def test_an_edited_temperature_is_damage(caches, tmp_path, kind):
    broken = _copy(caches(kind), tmp_path)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["temperature"] = 2.0  # made at 3
    (broken / "zarr.json").write_text(json.dumps(meta))
    _assert_damage(broken, tmp_path, "is not the chunk written there")
    assert "an attribute the manifest binds was edited" in invoke("verify", broken, "--json")[1]


@pytest.mark.parametrize("kind", ["dense", "sampled"])
def test_an_array_rewritten_without_checksums_is_refused(caches, tmp_path, kind):
    broken = _copy(caches(kind), tmp_path)
    group = zarr.open_group(str(broken), mode="r+")
    name = "logits" if kind == "dense" else "sampled_counts"
    old = group[name]
    values, spec = old[:], {"shape": old.shape, "chunks": old.chunks, "dtype": old.dtype, "fill_value": old.fill_value,
                            "dimension_names": old.metadata.dimension_names}
    del group[name]
    group.create_array(name, **spec, compressors=None)[:] = values
    _assert_damage(broken, tmp_path, f"{name}: its chunks carry no crc32c checksum (schema 6 requires one)")


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("what", ["/dev/zero", "fifo"])
def test_a_chunk_that_is_not_a_regular_file_is_damage_at_once(caches, tmp_path, sharded, what):
    """A link to /dev/zero was read without end (19 GB before the kernel killed it), a FIFO waited
    forever: each is now refused before anything reads it."""
    broken = _copy(caches(sharded=sharded), tmp_path)
    chunk = _object(broken, "logits", 1)
    chunk.unlink()
    if what == "fifo":
        os.mkfifo(chunk)
        named = [f"array logits: chunk {PER_SHARD if sharded else 1} cannot be read ({chunk} is not a regular file)"]
    else:
        chunk.symlink_to("/dev/zero")
        named = [f"array logits: chunk {PER_SHARD if sharded else 1} cannot be read ({chunk} is a symbolic link"]
    _assert_damage(broken, tmp_path, *named)


@pytest.mark.parametrize("document", ["zarr.json", "logits/zarr.json"])
@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "huge"])
def test_metadata_that_is_not_a_regular_file_of_metadata_size_is_damage_at_once(caches, teacher_weights, tmp_path, document, what):
    """zarr reads a zarr.json whole: a FIFO in place of the group's or an array's waited forever, a
    link to /dev/zero never ended. Each is refused before anything reads it."""
    broken = _copy(caches(), tmp_path)
    target = broken / document
    target.unlink()
    if what == "fifo":
        os.mkfifo(target)
    elif what == "huge":
        with open(target, "wb") as file:  # sparse: 17 MiB that take no disk
            file.truncate(17 * 2**20)
    else:
        target.symlink_to("/dev/zero")
    problem = "more than a cache's metadata ever does" if what == "huge" else "is not a regular file"
    _assert_damage(broken, tmp_path, f"cache {broken}: {target} {'holds' if what == 'huge' else problem}")
    with pytest.raises(AssertionError, match="is not a cache"):  # not a cache, so not replaced: its files stay
        cache_with_cli(broken, teacher_weights, "--overwrite")
    assert target.is_fifo() if what == "fifo" else target.is_symlink() if what == "/dev/zero" else target.stat().st_size == 17 * 2**20


def test_a_chunk_damaged_after_the_reader_opened_the_cache_is_caught_on_its_next_read(caches, tmp_path):
    """The manifest is checked on every read, the files' kind and size on every open."""
    broken = _copy(caches(sharded=True), tmp_path)
    reader = CacheReader(broken)
    reader.read_chunks(0, 5)
    first, second = _object(broken, "logits", 0), _object(broken, "logits", 1)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(CacheDamagedError, match="array logits: chunk 0 is not the chunk written there"):
        reader.read_chunks(0, 1)
    first.unlink()
    first.symlink_to("/dev/zero")
    with pytest.raises(CacheDamagedError, match="array logits: chunk 0 cannot be read .* is a symbolic link"):
        reader.read_chunks(0, 1)


def test_a_schema_5_cache_without_a_manifest_still_reads_verifies_and_trains(caches, tmp_path):
    """Older caches have no manifest: read without the binding check (every other check stays)."""
    from tests.conftest import invoke_json
    from tests.stages.cache.conftest import as_schema

    old = _copy(caches(sharded=True), tmp_path)
    as_schema(old, 5)
    reader = CacheReader(old)
    assert reader.manifest is None and not reader.layout.manifest
    np.testing.assert_array_equal(reader.read_chunk(3)["logits"], CacheReader(caches(sharded=True)).read_chunk(3)["logits"])
    assert invoke_json("verify", old)["ok"]
    assert invoke_json("train-student", "--cache", old, "--student", "mlp-64", "--epochs", "1", "--out", tmp_path / "run")
    _object(old, "index", 1).unlink()  # a missing chunk is damage in every schema
    with pytest.raises(CacheDamagedError, match="array index: chunk 2 is missing"):
        CacheReader(old)


@pytest.mark.parametrize("sharded", [False, True])
def test_on_an_object_store_swapped_and_missing_chunks_are_damage_too(teacher_weights, tmp_path, sharded):
    """Behind a URL zarr reads the chunks; the manifest and the objects are checked all the same
    (memory://, fsspec's in-process store, which the CLI run in this process shares)."""
    import fsspec

    url = f"memory://manifest-{'sharded' if sharded else 'plain'}/c.zarr"
    fs = fsspec.filesystem("memory")
    try:
        cache_with_cli(url, teacher_weights, "--shard-rows", str(SHARD_ROWS if sharded else 0))
        root = url.removeprefix("memory://")
        first, second = (f"/{root}/logits/c/{key}/0" for key in (1, 2))
        a, b = fs.cat_file(first), fs.cat_file(second)
        fs.pipe_file(first, b)
        fs.pipe_file(second, a)
        chunks = [2, 3, 4, 5] if sharded else [1, 2]
        _assert_damage(url, tmp_path, *(f"array logits: chunk {c} is not the chunk written there" for c in chunks))
        fs.rm_file(f"/{root}/labels/c/1")
        _assert_damage(url, tmp_path, f"array labels: chunk {PER_SHARD if sharded else 1} is missing")
    finally:
        fs.rm(f"/{url.removeprefix('memory://').split('/')[0]}", recursive=True)
