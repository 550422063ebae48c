"""DataLoader workers for a map-style dataset: the same rows, in the same order, as without."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import zarr

from pipeline.models import resolve_model
from stages.weights import save_weights
from tests.conftest import invoke_json


def _slow_dataset(tmp_path) -> str:
    (tmp_path / "items.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        class Items(torch.utils.data.Dataset):
            '''Each item computed from its index, as a decoding dataset would be.'''
            def __init__(self, n, offset):
                self.n, self.offset = n, offset
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                rng = np.random.default_rng(self.offset + i)
                label = (self.offset + i) % 3
                return torch.from_numpy(rng.normal(size=6).astype(np.float32) + label), label

        def make(split):
            return {"train": Items(300, 0), "test": Items(90, 10_000)}.get(split)
    """))
    return f"{tmp_path / 'items.py'}:make"


def test_workers_give_the_same_cache_and_the_same_training(tmp_path):
    dataset = _slow_dataset(tmp_path)
    save_weights(resolve_model("mlp-64", num_classes=3, input_shape=(6,)), tmp_path / "t.safetensors")
    common = ["--teacher", "mlp-64", "--teacher-weights", tmp_path / "t.safetensors", "--dataset", dataset,
              "--chunk-rows", "64", "--batch-size", "50"]
    plain = invoke_json("cache-teacher", *common, "--out", tmp_path / "plain.zarr")
    loaded = invoke_json("cache-teacher", *common, "--out", tmp_path / "workers.zarr", "--loader-workers", "2")
    np.testing.assert_array_equal(zarr.open_group(plain["cache"], mode="r")["logits"][:],
                                  zarr.open_group(loaded["cache"], mode="r")["logits"][:])

    # The dataset is the user's code: named here, since a cache never runs the code it records.
    runs = [invoke_json("train-student", "--cache", plain["cache"], "--dataset", dataset, "--student", "mlp-64", "--epochs", "2",
                        "--batch-size", "32", "--out", tmp_path / f"run{w}", "--loader-workers", str(w)) for w in (0, 2)]
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / f"run{w}" / "metrics.jsonl").read_text().splitlines()] for w in (0, 2)]
    assert metrics[0] == metrics[1] and runs[0]["test_errors"] == runs[1]["test_errors"]
