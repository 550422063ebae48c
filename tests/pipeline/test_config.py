"""pipeline.config: between the command line and the stages' configs. The library's errors name
config fields (`top_k`) and the user sees flags (--top-k); options come from a TOML file under the
command line; the CLI's defaults are the configs' own."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import typer

import stages
from pipeline.cli import app
from pipeline.config import FIELD_OF_OPTION, build_config, field_of_option, in_flags
from stages.config import CacheTeacherConfig, TrainConfig
from stages.errors import InputError
from tests.conftest import DATASET, invoke, invoke_json

# The commands that build a stage's config from their options, and the config each builds.
CONFIGS = {"cache-teacher": CacheTeacherConfig, "train-student": TrainConfig}


def _options(command: str) -> dict[str, list[str]]:
    """The command's options: parameter name -> its flags (--top-k)."""
    return {p.name: p.opts for p in typer.main.get_command(app).commands[command].params}


def _fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _fields_named_by_library_errors() -> set[str]:
    """Every field name that a message raised in the library (stages/) can hold: the names in
    backticks in the text of its raise statements, and the fields its check_positive,
    check_range and _check_counts helpers are called for (they write `field` themselves)."""
    named = set()
    for file in Path(stages.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for part in ast.walk(node.exc):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        named |= set(re.findall(r"`([a-z][a-z0-9_]*)`", part.value))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                if node.func.id in ("check_positive", "check_range") and isinstance(node.args[0], ast.Constant):
                    named.add(node.args[0].value)
                elif node.func.id == "_check_counts" and isinstance(node.args[-1], ast.Dict):
                    named |= {key.value for key in node.args[-1].keys if isinstance(key, ast.Constant)}
    return named


def test_every_config_field_a_library_error_names_is_a_flag_of_its_command():
    named = _fields_named_by_library_errors()
    assert {"top_k", "format", "batch_size", "temperature", "teacher_weights", "resume", "overwrite", "lr", "seed"} <= named
    for command, config_class in CONFIGS.items():
        flags = {flag for opts in _options(command).values() for flag in opts}
        mine = named & _fields(config_class)
        assert len(mine) >= 12, (command, mine)
        assert {name: in_flags(f"`{name}`", command) for name in mine if in_flags(f"`{name}`", command) not in flags} == {}


def test_each_option_that_field_of_option_renames_is_an_option_of_its_command_for_a_field_of_its_config():
    assert set(FIELD_OF_OPTION) <= set(CONFIGS)
    for command, renamed in FIELD_OF_OPTION.items():
        options = _options(command)
        for option, field in renamed.items():
            assert option in options and field in _fields(CONFIGS[command]) and field not in options, (command, option)
            assert in_flags(f"`{field}`", command) == f"--{option.replace('_', '-')}"
    assert field_of_option("train-student") == {"student": "model", "student_weights": "model_weights"}
    assert field_of_option("cache-teacher") == {}  # its options are its fields' names


def test_in_flags_turns_only_backticked_field_names_into_the_commands_flags():
    message = "`batch_size` 7 does not divide; batch_size, `Batch_size` and `top-k` stay as written"
    assert in_flags(message, "train-student") == "--batch-size 7 does not divide; batch_size, `Batch_size` and `top-k` stay as written"
    assert in_flags("`model_weights` do not fit `model`", "train-student") == "--student-weights do not fit --student"
    assert in_flags("give `teacher_weights`", "cache-teacher") == "give --teacher-weights"


def test_the_defaults_of_both_stage_commands_are_their_configs_defaults():
    for command, config_class in CONFIGS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
        params = typer.main.get_command(app).commands[command].params
        # An option without a default (None) is resolved later: from the cache, or named by the user.
        compared = {p.name: (p.default, defaults[field_of_option(command).get(p.name, p.name)]) for p in params
                    if p.default is not None and field_of_option(command).get(p.name, p.name) in defaults}
        assert len(compared) >= 12, (command, compared)
        assert {name: pair for name, pair in compared.items() if pair[0] != pair[1]} == {}


@pytest.mark.parametrize(("line", "message"), [
    ('overwrite = "yes"', "overwrite must be true or false, got 'yes'"),
    ('alpha = "0.5"', "alpha must be a number, got '0.5'"),
    ("alpha = true", "alpha must be a number, got True"),
    ("epochs = 2.5", "epochs must be a whole number, got 2.5"),
    ("epochs = true", "epochs must be a whole number, got True"),
    ("student = 3", "student must be a string, got 3"),
    ("student-weights = 3", "student-weights must be a string, got 3"),
    ("storage-option = [1, 2]", 'storage-option must be a list of "KEY=VALUE" strings or a table of KEY = VALUE, got [1, 2]'),
])
def test_a_config_file_value_of_another_type_than_its_option_is_a_one_line_error(tmp_path, line, message):
    config = tmp_path / "student.toml"
    student = "" if line.startswith("student =") else 'student = "mlp-64"\n'
    config.write_text(f'dataset = "{DATASET}"\n{student}{line}\n')
    code, _, err = invoke("train-student", "--config", config, "--out", tmp_path / "r")
    assert code == 2 and err == f"error: config file {config}: {message}\n", err
    assert not (tmp_path / "r").exists()


def test_a_config_file_may_give_a_whole_number_where_a_number_belongs(tmp_path):
    config = tmp_path / "student.toml"
    config.write_text('student = "linear"\ndataset = "synthetic:n=40,test=10,features=4,classes=2"\nalpha = 0\nfeature-weight = 2\nepochs = 1\n')
    run = invoke_json("train-student", "--config", config, "--device", "cpu", "--out", tmp_path / "r")
    resolved = json.loads((Path(run["run_dir"]) / "config.json").read_text())
    assert (resolved["alpha"], resolved["feature_weight"], resolved["epochs"], resolved["model"]) == (0, 2, 1, "linear")


def test_a_missing_config_file_is_a_one_line_error(tmp_path):
    for path in (tmp_path / "none.toml", tmp_path):
        code, _, err = invoke("cache-teacher", "--config", path, "--teacher", "mlp-64", "--dataset", DATASET,
                              "--out", tmp_path / "c.zarr")
        assert code == 2 and err == f"error: config file not found: {path}\n"
    assert not (tmp_path / "c.zarr").exists()


def test_build_config_makes_paths_and_cache_locations_and_keeps_the_other_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"teacher": "mlp-64", "dataset": "digits", "out": "c.zarr", "teacher_weights": "w.safetensors",
              "temperature": 2.0, "storage_option": ["endpoint_url=x"]}  # an option that is no field is left out
    config = build_config(CacheTeacherConfig, values, required=("teacher", "dataset"))
    assert config.out == tmp_path / "c.zarr"  # a cache location: absolute, the same folder from anywhere
    assert config.teacher_weights == Path("w.safetensors") and config.temperature == 2.0
    assert config.batch_size == CacheTeacherConfig.batch_size and config.split == "train"
    train = build_config(TrainConfig, {"model": "mlp-64", "dataset": "digits", "out": "run", "cache": "s3://bucket/c.zarr/"})
    assert (train.cache, train.out, train.model_weights) == ("s3://bucket/c.zarr", Path("run"), None)  # a URL stays a URL
    with pytest.raises(InputError, match=r"^missing option\(s\): --teacher, --dataset$"):
        build_config(CacheTeacherConfig, {"teacher": None, "dataset": None, "out": "c.zarr"}, required=("teacher", "dataset"))
