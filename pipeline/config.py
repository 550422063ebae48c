"""Options from a TOML file, overridden by the command line, into a typed stage config.

A config file holds the same option names as the command (dashes or underscores), e.g.

    teacher = "cnn"
    teacher-weights = "data/teachers/cnn-mnist-5k.safetensors"
    temperature = 4.0

Precedence: an option given on the command line > the file > the option's default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import typer

from stages.errors import InputError
from stages.storage import cache_location


# The one table between a command's options and its config's fields, where they differ: each
# other option is its field with dashes (--top-k sets `top_k`).
FIELD_OF_OPTION = {"train-student": {"student": "model", "student_weights": "model_weights"}}


def field_of_option(command: str) -> dict[str, str]:
    """The options of `command` whose config field has another name: option -> field."""
    return FIELD_OF_OPTION.get(command, {})


def in_flags(message: str, command: str) -> str:
    """A library message with the config fields it names in backticks (`top_k`, stages.config)
    as `command`'s flags (--top-k): the library speaks of fields, the user typed flags."""
    option = {field: name for name, field in field_of_option(command).items()}
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + option.get(m[1], m[1]).replace("_", "-"), message)


def field_default(config_class, name: str) -> Any:
    """The default a config dataclass declares for `name`: the one source of CLI defaults."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def read_toml(path: Path, allowed: set[str]) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}") from exc
    values, spelled = {}, {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in values:  # batch-size and batch_size: which one wins would be an accident of the file's order
            raise InputError(f"config file {path}: {spelled[name]} and {key} are the same option; give it once")
        values[name], spelled[name] = value, key
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InputError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def merge_options(ctx: typer.Context, config_file: Path | None, values: dict[str, Any], config_class,
                  option_types: dict[str, str] | None = None) -> dict[str, Any]:
    """Command-line values, with those left at their defaults taken from `config_file`. File
    values are type-checked against `config_class`'s fields (FIELD_OF_OPTION names the field of
    an option where they differ), or `option_types` for options that are no field of their own
    (a kind's options). An option that the command line takes several times (--storage-option)
    is a list of strings in the file, or a table of KEY = VALUE."""
    if config_file is None:
        return values
    from_file = read_toml(config_file, set(values))
    types = {**{f.name: str(f.type) for f in dataclasses.fields(config_class)}, **(option_types or {})}
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    merged = dict(values)
    for name, value in from_file.items():
        source = ctx.get_parameter_source(name)
        # Compared by name: typer ships its own copy of click, so the enum class is not click's.
        if source is None or source.name == "DEFAULT":
            if name in repeatable:
                value = _key_value_list(config_file, name, value)
            else:
                check_type(config_file, name, value, types.get(field_of_option(ctx.info_name).get(name, name), "str"))
            merged[name] = value
    return merged


def _key_value_list(config_file: Path, name: str, value: Any) -> list[str]:
    """A repeatable KEY=VALUE option from the file: a list of "KEY=VALUE" strings, or a table whose
    values (JSON-encoded, as the command line's VALUE is read) keep their TOML types."""
    if isinstance(value, dict):
        return [f"{key}={json.dumps(item)}" for key, item in value.items()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise InputError(f'config file {config_file}: {name.replace("_", "-")} must be a list of "KEY=VALUE" strings '
                     f"or a table of KEY = VALUE, got {value!r}")


def check_type(config_file: Path, name: str, value: Any, annotation: str) -> None:
    """TOML values must have the option's type: a string where a number belongs would only
    fail much later, inside the stage."""
    if "bool" in annotation:
        ok, kind = isinstance(value, bool), "true or false"
    elif "int" in annotation:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif "float" in annotation:
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise InputError(f"config file {config_file}: {name.replace('_', '-')} must be {kind}, got {value!r}")


def build_config(config_class, values: dict[str, Any], required: tuple[str, ...] = ()):
    """The frozen config dataclass from merged option values (paths converted, required ones checked)."""
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise InputError(f"missing option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    kwargs = {}
    for f in dataclasses.fields(config_class):
        if f.name not in values:
            continue
        value = values[f.name]
        if value is not None and "CacheLocation" in str(f.type):
            value = cache_location(value)
        elif value is not None and "Path" in str(f.type) and not isinstance(value, Path):
            value = Path(value)
        kwargs[f.name] = value
    return config_class(**kwargs)
