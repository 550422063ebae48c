"""The two stage configs' checks (stages.config): every refusal is an InputError (exit code 2)
whose message names the field in backticks and the value given, and every value at the edge of
its range is accepted. The CLI's flag spelling of these messages is tested in tests/pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stages.checks import MAX_COUNT, check_positive, check_range
from stages.config import MAX_CLASSES, MAX_SEED, MAX_TEMPERATURE, MAX_VIEW_SEED, CacheTeacherConfig, TrainConfig
from stages.errors import InputError


def _cache_config(**changes) -> CacheTeacherConfig:
    return CacheTeacherConfig(teacher="mlp-64", dataset="synthetic", out=Path("c.zarr"), **changes)


def _train_config(**changes) -> TrainConfig:
    return TrainConfig(model="mlp-64", dataset="synthetic", out=Path("run"), **changes)


def _refusal(config) -> str:
    with pytest.raises(InputError) as error:
        config.validate()
    assert error.value.exit_code == 2
    return str(error.value)


def test_the_defaults_of_both_configs_are_valid():
    _cache_config().validate()
    _train_config().validate()


@pytest.mark.parametrize("changes", [
    {"temperature": MAX_TEMPERATURE}, {"num_classes": 2}, {"num_classes": MAX_CLASSES}, {"view_seed": 0},
    {"view_seed": MAX_VIEW_SEED}, {"batch_size": 1}, {"batch_size": MAX_COUNT}, {"chunk_rows": 1}, {"loader_workers": 0},
    {"shard_rows": 0}, {"shard_rows": MAX_COUNT},
    {"format": "topk", "kind_options": {"top_k": 1}}, {"codec": "zstd"}, {"amp": "bf16"}, {"amp": "fp16"}, {"dtype": "float32"},
    {"views": 3, "augment": "flip"}, {"workers": 2}, {"scheduler": "tcp://host:8786"},
])
def test_cache_config_accepts_every_value_at_the_edge_of_its_range(changes):
    _cache_config(**changes).validate()


@pytest.mark.parametrize("changes, words", [
    ({"temperature": 0.0}, ("`temperature` must be a positive number up to 1000", "got 0.0")),
    ({"temperature": MAX_TEMPERATURE * 1.01}, ("`temperature` must be a positive number up to 1000", "got 1010")),
    ({"temperature": math.nan}, ("`temperature`", "got nan")),
    ({"batch_size": 0}, ("`batch_size` must be 1 or more", "got 0")),
    ({"batch_size": MAX_COUNT + 1}, (f"`batch_size` must be at most {MAX_COUNT}", f"got {MAX_COUNT + 1}")),
    ({"chunk_rows": 0}, ("`chunk_rows` must be 1 or more",)),
    ({"shard_rows": -1}, ("`shard_rows` must be 0 or more", "got -1")),
    ({"views": 0}, ("`views` must be 1 or more",)),
    ({"loader_workers": -1}, ("`loader_workers` must be 0 or more", "got -1")),
    ({"workers": -1}, ("`workers` must be 0 or more",)),
    ({"num_classes": 1}, ("`num_classes` must be 2 or more", "got 1")),
    ({"num_classes": MAX_CLASSES + 1}, (f"`num_classes` must be at most {MAX_CLASSES}",)),
    ({"view_seed": -1}, ("`view_seed` must be 0 or more", "got -1")),
    ({"view_seed": MAX_VIEW_SEED + 1}, (f"`view_seed` must be at most {MAX_VIEW_SEED}",)),
    ({"dtype": "int8"}, ("`dtype` must be one of float16, float32", "'int8'")),
    ({"codec": "gzip"}, ("`codec` must be one of none, zstd", "'gzip'")),
    ({"format": "sparse"}, ("`format` must be one of dense, topk", "'sparse'")),
    ({"kind_options": {"top_k": 3}}, ("`top_k` goes with `format` topk",)),
    ({"format": "topk"}, ("`format` topk needs `top_k`",)),
    ({"format": "topk", "kind_options": {"top_k": 0}}, ("`top_k` must be 1 or more",)),
    ({"format": "qtopk"}, ("`format` qtopk needs `top_k`",)),
    ({"format": "qtopk", "kind_options": {"top_k": 4, "value_bits": 9}}, ("`value_bits` must be at most 8", "got 9")),
    ({"format": "qtopk", "kind_options": {"top_k": 4, "value_bits": 0}}, ("`value_bits` must be between 1 and 8", "got 0")),
    ({"format": "topk", "kind_options": {"top_k": 4, "value_bits": 4}}, ("`value_bits` goes with `format` qtopk or headtail, not topk",)),
    ({"views": 2}, ("`views` 2 needs `augment` SPEC",)),
    ({"workers": 2, "scheduler": "tcp://host:8786"}, ("`workers`", "`scheduler`", "give one of them")),
    ({"workers": 2, "loader_workers": 2}, ("`loader_workers` cannot go with dask workers",)),
    ({"scheduler": "tcp://host:8786", "loader_workers": 1}, ("`loader_workers` cannot go with dask workers",)),
    ({"amp": "int8"}, ("`amp` must be none, bf16 or fp16", "'int8'")),
])
def test_cache_config_refusals_name_the_field_and_the_value(changes, words):
    message = _refusal(_cache_config(**changes))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("changes", [
    {"alpha": 0.0}, {"alpha": 1.0}, {"temperature": MAX_TEMPERATURE}, {"seed": MAX_SEED}, {"checkpoint_every": 0},
    {"weight_decay": 0.0}, {"feature_weight": 0.0}, {"view_policy": "cycle"}, {"feature_loss": "mse"},
    {"feature_loss": "cosine"}, {"epochs": MAX_COUNT}, {"lr": 1e-12},
])
def test_train_config_accepts_every_value_at_the_edge_of_its_range(changes):
    _train_config(**changes).validate()


@pytest.mark.parametrize("changes, words", [
    ({"alpha": -0.1}, ("`alpha` must be between 0.0 and 1.0", "got -0.1")),
    ({"alpha": math.nan}, ("`alpha` must be a finite number", "got nan")),
    ({"temperature": MAX_TEMPERATURE * 2}, ("`temperature` must be a positive number up to 1000",)),
    ({"epochs": 0}, ("`epochs` must be 1 or more",)),
    ({"buffer_chunks": 0}, ("`buffer_chunks` must be 1 or more",)),
    ({"checkpoint_every": -1}, ("`checkpoint_every` must be 0 or more", "got -1")),
    ({"loader_workers": MAX_COUNT + 1}, (f"`loader_workers` must be at most {MAX_COUNT}",)),
    ({"lr": math.inf}, ("`lr` must be a positive number", "got inf")),
    ({"lr": -1e-3}, ("`lr` must be a positive number",)),
    ({"weight_decay": -1.0}, ("`weight_decay` must be 0.0 or more", "got -1.0")),
    ({"weight_decay": math.inf}, ("`weight_decay` must be a finite number", "got inf")),
    ({"feature_weight": math.nan}, ("`feature_weight` must be a finite number", "got nan")),
    ({"seed": -1}, ("`seed` must be 0 or more", "got -1")),
    ({"seed": MAX_SEED + 1}, (f"`seed` must be at most {MAX_SEED}", f"got {MAX_SEED + 1}")),
    ({"view_policy": "best"}, ("`view_policy` must be one of random, cycle", "'best'")),
    ({"feature_loss": "l1"}, ("`feature_loss` must be none, mse or cosine", "'l1'")),
])
def test_train_config_refusals_name_the_field_and_the_value(changes, words):
    message = _refusal(_train_config(**changes))
    assert all(word in message for word in words), message


def test_a_train_config_without_temperature_takes_the_caches_and_is_not_checked():
    _train_config(temperature=None).validate()
    assert "`temperature`" in _refusal(_train_config(temperature=0.0))


@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan])
def test_range_and_positive_checks_refuse_non_finite_numbers_even_without_a_bound(value):
    with pytest.raises(InputError, match="`x` must be a finite number"):
        check_range("x", value, 0.0, math.inf)
    with pytest.raises(InputError, match="`x` must be a positive number"):
        check_positive("x", value)


def test_range_and_positive_checks_accept_their_bounds_inclusive():
    check_range("x", 2, 2, 5)
    check_range("x", 5, 2, 5)
    check_positive("x", 5.0, 5.0)
    with pytest.raises(InputError, match="between 2 and 5, got 1"):
        check_range("x", 1, 2, 5)
    with pytest.raises(InputError, match="at most 5, got 6"):
        check_range("x", 6, 2, 5)
