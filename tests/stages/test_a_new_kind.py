"""A kind is one module and one registry line: a kind defined here, with an option of its own,
caches, resumes, verifies, inspects and trains through the command line, and no file of the
project knows of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch.nn.functional as F
import zarr

from stages.kinds import KINDS
from stages.kinds.base import ArraySpec, Kind, KindOptions, mean_and_max, option, over_positions, zero_padding
from tests.conftest import CHUNK_ROWS, DATASET, TEMPERATURE, cache_with_cli, invoke, invoke_json


@dataclass(frozen=True)
class RoundedOptions(KindOptions):
    decimals: int = option(2, help="Decimal places kept of each logit / T.", low=0, high=6)


class Rounded(Kind):
    """Every class's logit / T rounded to `decimals` places (float32): a lossy dense cache."""

    name = "rounded"
    summary = "every class's logit / T rounded to --decimals places"
    Options = RoundedOptions
    soft_arrays = ("rounded_logits",)
    last_axis = "class"
    exact_at_any_temperature = True
    entropy_of = "the rounded distribution"
    can_combine = False
    statistics_arrays = ("rounded_logits",)

    def width(self, layout):
        return layout.num_classes

    def arrays(self, layout):
        return {"rounded_logits": ArraySpec(layout.row_shape, "float32", float("nan"), True, ("sample", *layout.row_axes))}

    def encode(self, rounded, layout, padding, scratch=None, row_index=None, first_position=0):
        return {"rounded_logits": zero_padding(rounded.float().mul(10**layout.options.decimals).round().div(10**layout.options.decimals),
                                               padding)}

    def probabilities(self, rows, num_classes, ratio):
        z = rows["rounded_logits"].astype(np.float64) * ratio
        probs = np.exp(z - z.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True)

    def top1(self, rows):
        return rows["rounded_logits"].argmax(-1)

    def support_log_probs(self, student_over_t, soft, *, ratio):
        return F.log_softmax(soft["rounded_logits"].float() * ratio, -1), F.log_softmax(student_over_t, -1)

    def verify_pairs(self, stored, fresh_rounded, fresh, padding):
        return {"rounded_logits": (fresh["rounded_logits"], stored["rounded_logits"])}

    def chunk_statistics(self, rows):
        """The spread of each row's rounded logits: its largest minus its smallest."""
        values = rows["rounded_logits"]
        return over_positions(values.max(-1) - values.min(-1), rows)

    def summarise(self, parts):
        return {"logit_spread": mean_and_max(parts)}


@pytest.fixture
def rounded(monkeypatch):
    monkeypatch.setitem(KINDS, "rounded", Rounded())  # the one line that registers it


def test_a_kind_defined_outside_the_project_caches_resumes_verifies_inspects_and_trains(rounded, tmp_path, teacher_weights):
    cache = tmp_path / "rounded.zarr"
    made = cache_with_cli(cache, teacher_weights, "--format", "rounded", "--decimals", "1")
    group = zarr.open_group(str(cache), mode="r")
    assert group.attrs["kind_options"] == {"decimals": 1} and made["chunks_computed"] == made["chunks_total"]
    stored = group["rounded_logits"][:]
    np.testing.assert_array_equal(stored, np.round(stored, 1))  # its option reached the encoding
    assert len(np.unique(stored)) > 20  # and it holds the teacher's values, not a constant

    # resumed: a unit marked undone is the only one computed again, to the same values
    writable = zarr.open_group(str(cache), mode="r+")
    writable["chunk_done"][1] = 0
    writable["rounded_logits"][64:128] = np.nan
    writable.attrs["complete"] = False
    again = cache_with_cli(cache, teacher_weights, "--format", "rounded", "--decimals", "1")
    assert again["chunks_computed"] == 1
    np.testing.assert_array_equal(zarr.open_group(str(cache), mode="r")["rounded_logits"][:], stored)
    # another value of the option is another cache: not resumed
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--temperature", TEMPERATURE, "--chunk-rows", CHUNK_ROWS, "--device", "cpu", "--out", cache, "--format", "rounded",
                          "--decimals", "2")
    assert code == 2 and "decimals: cache has 1, this run 2" in err, err

    report = invoke_json("verify", cache, "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--rows", "40")
    assert report["ok"], report
    described = invoke_json("inspect", cache)
    assert described["kind"] == "rounded" and described["decimals"] == 1 and described["logit_spread"]["entries"] == 600

    trained = invoke_json("train-student", "--cache", cache, "--student", "mlp-64", "--epochs", "2", "--device", "cpu",
                          "--out", tmp_path / "run")
    assert trained["mode"] == "distilled" and trained["test_accuracy"] > 0.5
    # the kind's option is a flag of cache-teacher, with its help
    code, help_text, _ = invoke("cache-teacher", "--help")
    help_text = " ".join(help_text.replace("│", " ").split())  # as one line, whatever the terminal's width
    assert "--decimals" in help_text and "With --format rounded" in help_text and "rounded: every class's logit" in help_text


def test_a_kinds_option_is_checked_by_its_declaration(rounded, tmp_path, teacher_weights):
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--device", "cpu", "--out", tmp_path / "c.zarr", "--format", "rounded", "--decimals", "9")
    assert code == 2 and err.strip() == "error: --decimals must be at most 6, got 9", err
    code, _, err = invoke("cache-teacher", "--teacher", "mlp-64", "--teacher-weights", teacher_weights, "--dataset", DATASET,
                          "--device", "cpu", "--out", tmp_path / "c.zarr", "--decimals", "1")
    assert code == 2 and "--decimals goes with --format rounded, not dense" in err, err
    assert not (tmp_path / "c.zarr").exists()
