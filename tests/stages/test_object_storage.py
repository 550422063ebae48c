"""Caches on object storage: both stages against a real S3 API (moto's server, in its own process
on loopback), compared with the same work on a local folder."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import fsspec.config
import pytest
import zarr

from stages.errors import CacheLockedError
from stages.storage import LeaseLock, lock_location
from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE, assert_same_cache, cache_with_cli, dying_model, invoke, invoke_json

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

REPO = Path(__file__).resolve().parents[2]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 1800  # a loaded machine starts it slowly; it answers as soon as it is up
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("moto's S3 server did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A new, empty bucket; credentials in the environment, as on a real machine. The endpoint
    is left to each test to give (by option or environment), and fsspec's configuration, which
    --storage-option changes in this process, is restored afterwards."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    saved = copy.deepcopy(fsspec.config.conf)
    yield f"s3://{name}"
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)


def test_both_stages_on_s3_give_what_they_give_on_a_local_folder(tmp_path, teacher_weights, bucket, s3_endpoint):
    endpoint = ("--storage-option", f"endpoint_url={s3_endpoint}")
    local = cache_with_cli(tmp_path / "local.zarr", teacher_weights)
    remote = cache_with_cli(f"{bucket}/caches/remote.zarr", teacher_weights, *endpoint)
    assert remote["cache"] == f"{bucket}/caches/remote.zarr" and remote["chunks_computed"] == 10
    assert remote["bytes_on_disk"] > 0.9 * local["bytes_on_disk"]
    options = {"endpoint_url": s3_endpoint}
    assert_same_cache(tmp_path / "local.zarr", remote["cache"], options)
    fs = s3fs.S3FileSystem(**options)
    assert not fs.exists(lock_location(remote["cache"]).removeprefix("s3://")), "the writer's lease outlived it"

    runs = [invoke_json("train-student", "--cache", cache, "--student", "mlp:width=16", "--epochs", 2, "--batch-size", 64,
                        "--device", "cpu", "--out", tmp_path / name, *extra)
            for name, cache, extra in (("from-local", tmp_path / "local.zarr", ()), ("from-s3", remote["cache"], endpoint))]
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]
    assert (tmp_path / "from-local/model.safetensors").read_bytes() == (tmp_path / "from-s3/model.safetensors").read_bytes()
    measured = invoke_json("evaluate", "--model", "mlp:width=16", "--weights", tmp_path / "from-s3/model.safetensors",
                           "--cache", remote["cache"], *endpoint)
    assert measured["accuracy"] == runs[1]["test_accuracy"] and 0 < measured["teacher_agreement"] <= 1
    described = invoke_json("inspect", remote["cache"], *endpoint, "--png", tmp_path / "s3.png")
    assert described["complete"] and described["bytes_per_row"] > 0
    assert invoke_json("verify", remote["cache"], *endpoint)["ok"]


def test_dask_workers_write_an_s3_cache_with_the_options_given_to_the_coordinator(tmp_path, teacher_weights, bucket, s3_endpoint):
    pytest.importorskip("distributed")
    cache_with_cli(tmp_path / "local.zarr", teacher_weights)
    remote = cache_with_cli(f"{bucket}/spread.zarr", teacher_weights, "--workers", "2", "--storage-option", f"endpoint_url={s3_endpoint}")
    assert_same_cache(tmp_path / "local.zarr", remote["cache"], {"endpoint_url": s3_endpoint})


def test_a_killed_writer_on_s3_leaves_a_lease_that_blocks_until_stale_then_resumes(tmp_path, teacher_weights, bucket, s3_endpoint):
    """A real process, configured by the environment alone, is SIGKILLed partway through: its
    lease object stays behind (no kernel drops it, as with an flock), so a second writer (the same
    command, run in this process with the endpoint as an option) is refused while the lease looks
    alive, and takes it over once it is stale."""
    teacher, marker, _ = dying_model(tmp_path, where="process", after_forwards=9)
    env = {**os.environ, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}
    url = f"{bucket}/killed.zarr"
    command = [sys.executable, "-m", "pipeline", "cache-teacher", "--teacher", teacher, "--teacher-weights", str(teacher_weights),
               "--dataset", DATASET, "--temperature", str(TEMPERATURE), "--chunk-rows", str(CHUNK_ROWS), "--batch-size", "32",
               "--device", "cpu", "--out", url, "--json"]
    killed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    assert killed.returncode == -9 and marker.exists(), killed.stderr
    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    done = zarr.open_group(url, mode="r", storage_options=options)["chunk_done"][:]
    assert 0 < done.sum() < len(done), done  # killed partway, with some chunks written

    again = [*command[3:], "--storage-option", f"endpoint_url={s3_endpoint}"]  # the arguments after `python -m pipeline`
    code, _, err = invoke(*again)
    assert code == 5 and "is being written by another process" in err, err
    lease = lock_location(url).removeprefix("s3://")
    stale = {**json.loads(fs.cat_file(lease)), "renewed_at": time.time() - 3600}  # as it reads an hour later
    fs.pipe_file(lease, json.dumps(stale).encode())

    code, out, err = invoke(*again)
    assert code == 0, err
    assert json.loads(out)["chunks_computed"] == int((done == 0).sum())
    cache_with_cli(tmp_path / "local.zarr", teacher_weights)
    assert_same_cache(tmp_path / "local.zarr", url, options)
    assert not fs.exists(lease)


def _eventually(condition, timeout: float = 1800.0) -> None:
    """Wait for `condition` (polling): a renewal thread may be starved on a loaded machine, so the
    bound is generous and the wait ends as soon as it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _lost(lock: LeaseLock) -> bool:
    try:
        lock.check_held()
        return False
    except CacheLockedError:
        return True


def test_a_lease_is_exclusive_renewed_while_held_and_lost_when_taken_over(bucket, s3_endpoint):
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = s3_endpoint
    url = f"{bucket}/leased.zarr"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    lease = lock_location(url).removeprefix("s3://")
    with LeaseLock(url, refresh_seconds=0.2) as held:
        first = json.loads(fs.cat_file(lease))
        with pytest.raises(CacheLockedError, match="being written by another process"), LeaseLock(url):
            pass
        _eventually(lambda: json.loads(fs.cat_file(lease))["renewed_at"] > first["renewed_at"])
        held.check_held()
        # Another writer judged it stale and took it over: the holder learns at its next renewal.
        fs.pipe_file(lease, json.dumps({**first, "token": "someone else", "renewed_at": time.time()}).encode())
        _eventually(lambda: _lost(held))
        with pytest.raises(CacheLockedError, match="lost its writer lease"):
            held.check_held()
    assert fs.exists(lease), "a holder must not delete a lease it no longer owns"


def test_an_unknown_protocol_and_a_bad_storage_option_are_one_line_errors(tmp_path, teacher_weights):
    code, _, err = invoke("train-student", "--cache", "nosuch://bucket/c.zarr", "--student", "mlp-64", "--dataset", DATASET)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nosuch" in err
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--out", tmp_path / "c.zarr", "--storage-option", "no-equals-sign")
    assert code == 2 and "KEY=VALUE" in err
    assert not (tmp_path / "c.zarr").exists()


def test_storage_options_from_a_config_file_as_a_table_or_a_list(tmp_path, teacher_weights, bucket, s3_endpoint):
    saved = copy.deepcopy(fsspec.config.conf)  # --storage-option sets this process's fsspec configuration
    config = tmp_path / "cache.toml"
    config.write_text(f'teacher = "mlp-64"\nteacher-weights = "{teacher_weights}"\ndataset = "{DATASET}"\n'
                      f'out = "{bucket}/c.zarr"\nchunk-rows = {CHUNK_ROWS}\ndevice = "cpu"\n'
                      f'[storage-option]\nendpoint_url = "{s3_endpoint}"\n')
    cache = invoke_json("cache-teacher", "--config", config)
    assert cache["chunks_computed"] == 10
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)
    config = tmp_path / "student.toml"
    config.write_text(f'student = "mlp-64"\ncache = "{bucket}/c.zarr"\nepochs = 1\nstorage-option = ["endpoint_url={s3_endpoint}"]\n')
    run = invoke_json("train-student", "--config", config, "--out", tmp_path / "run")
    assert run["mode"] == "distilled"
