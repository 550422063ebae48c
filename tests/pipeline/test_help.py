"""Every command's --help as a terminal of 80 columns shows it: nothing cut with "…", no type on
a flag, and each example shown as written (a copied one runs) and accepted by its command's parser."""

from __future__ import annotations

import inspect
import re
import shlex

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import invoke_json

GROUP = get_command(app)
COMMANDS = sorted(GROUP.commands)
# An example: an indented line that runs the CLI, and the lines it continues onto with " \".
EXAMPLE_START = re.compile(r"^ {3,}(pipeline |\S.* -m pipeline )")


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


def _examples(text: str) -> list[list[str]]:
    """The examples in `text`, each as its lines, indented as they are under its first line; a
    line rich wrapped onto the padding's column keeps its own indentation, and so differs."""
    examples, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if EXAMPLE_START.match(line):
            indent = len(line) - len(line.lstrip())
            example = [line[indent:].rstrip()]
            while example[-1].endswith("\\") and i + len(example) < len(lines):
                following = lines[i + len(example)]
                example.append(following[indent:].rstrip() if following[:indent].isspace() else following.rstrip())
            examples.append(example)
    return examples


def _arguments(example: list[str]) -> list[str]:
    """The command line after `pipeline` (or `-m pipeline`), as a shell splits it."""
    words = shlex.split(" ".join(line.removesuffix("\\").strip() for line in example))
    return words[words.index("pipeline") + 1:]


def test_the_checks_read_examples_and_tell_a_rewrapped_one():
    assert sum(len(_examples(inspect.cleandoc(GROUP.commands[c].help))) for c in COMMANDS) >= 15
    written = "Examples:\n\n    pipeline verify data/c.zarr \\\n      --teacher cnn\n"
    shown = " Examples:\n\n     pipeline verify data/c.zarr \\\n       --teacher cnn\n"
    rewrapped = " Examples:\n\n     pipeline verify data/c.zarr \\\n --teacher cnn\n"  # as rich wraps a long line
    assert _examples(written) == _examples(shown) == [["pipeline verify data/c.zarr \\", "  --teacher cnn"]]
    assert _examples(rewrapped) != _examples(written)
    assert _examples(" Prose that wraps onto a line that starts\n pipeline bench, as prose may.\n") == []


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_at_80_columns_cuts_nothing_and_shows_no_flag_type(command):
    shown = _help(*filter(None, [command]))
    assert max(map(len, shown.splitlines())) <= 80
    assert "…" not in shown, [line for line in shown.splitlines() if "…" in line]
    assert "<bool>" not in shown


@pytest.mark.parametrize("command", COMMANDS)
def test_each_example_is_shown_as_written_and_parses(command):
    written = _examples(inspect.cleandoc(GROUP.commands[command].help))
    assert _examples(_help(command)) == written  # a line rich wrapped (over 74 characters) differs
    for example in written:
        arguments = _arguments(example)
        assert arguments[0] == command, example
        # Parsed as the command line would be, without running it: an option that does not
        # exist, a value of the wrong type or a missing required option fails here.
        GROUP.commands[command].make_context(command, arguments[1:])


def test_train_teacher_shares_train_students_options_with_their_help():
    """It copied them by hand once, and its --lr help drifted from train-student's."""
    teacher, student = ({p.name: p for p in GROUP.commands[c].params} for c in ("train-teacher", "train-student"))
    own_meaning = {"out", "overwrite", "resume", "dataset"}  # a weights file, not a run folder; no cache to default from
    shared = set(teacher) & set(student) - own_meaning
    assert shared >= {"epochs", "batch_size", "lr", "seed", "augment", "device"}
    assert {name: teacher[name].help for name in shared} == {name: student[name].help for name in shared}


def test_verify_takes_rows_and_its_old_name_samples_with_a_notice(cache_path, teacher_weights):
    args = ("verify", cache_path, "--teacher", "mlp-64", "--teacher-weights", teacher_weights)
    result = CliRunner().invoke(app, [str(a) for a in (*args, "--samples", "40", "--json")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: verify --samples is now --rows; the old name will go\n"
    assert invoke_json(*args, "--rows", "40")["ok"]
    both = CliRunner().invoke(app, [str(a) for a in (*args, "--samples", "40", "--rows", "40")])
    assert both.exit_code == 2 and both.stderr == "error: --samples is the old name of --rows: give --rows only\n"
