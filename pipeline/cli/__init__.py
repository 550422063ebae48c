"""The `pipeline` command line: parse options into a typed config, call the stage, report.

Known errors print one line on stderr and exit with their code (README: exit codes); set
PIPELINE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup, TyperOption

from pipeline import DATA_ROOT, __version__
from pipeline.config import in_flags
from pipeline.specs import DATASET_HELP, MODEL_HELP
from stages import storage
from stages.errors import InputError, PipelineError, Terminated

# Modules that load torch, zarr, dask or matplotlib are imported inside the commands that use
# them: `pipeline --help` and `--version` took 3 s when they were imported here.

# One console for the log lines and the progress bar on a terminal: rich then prints each log
# line above the bar and redraws the bar below it. With a console each, log lines landed on the
# bar's line and a stale bar stayed above every one.
STDERR = Console(stderr=True)
# Piped or redirected output is read by programs as much as by people: tables at their natural
# width, never folded mid-value (rich assumes 80 columns where there is no terminal).
UNBOUNDED_WIDTH = 10_000

# The panels that group a command's options in its --help, in the order it lists them (a
# command that puts its options in none keeps typer's one list). Options keep their order in each.
PANELS = MODEL, DATA, CACHE, DISTILLATION, TRAINING, SCALE_OUT, STORAGE, OUTPUT, GENERAL = (
    "Model", "Data", "The cache", "Distillation", "Training", "Scale-out", "Storage", "Output", "General")


def _shown_type(param) -> None:
    """The type typer 0.29's rich help shows in an option's second column, fixed where it reads
    wrong: it shows a flag's type too (<bool>), where click's own help leaves it out, since a flag
    takes no value; and a number with bounds as <int range> [x>=1], where <int> [x>=1] says as much
    in less of the 80 columns (and <list[int]>: <int>). An option's metavar is what typer shows instead."""
    if not isinstance(param, TyperOption) or param.metavar is not None:  # an argument's metavar is its name
        return
    if param.is_flag:
        param.metavar = ""
    elif param.type_descriptor.is_list:  # <list[int]>: the option's help says it is repeatable
        param.metavar = f"<{param.bare_type().removeprefix('list[').removesuffix(']')}>"
    elif param.type_descriptor.is_ranged:
        param.metavar = f"<{param.bare_type()}>"


class _HelpFixes:
    """typer's rich help as this CLI wants it, for the commands and the group alike: the types
    _shown_type shows, the panels in PANELS' order, and an epilog that may be a function, called
    when the command line is built (so that it sees what registries hold by then, as
    with_kind_options does)."""

    def __init__(self, *args, epilog=None, **kwargs):
        super().__init__(*args, epilog=epilog() if callable(epilog) else epilog, **kwargs)
        for param in self.params:
            _shown_type(param)
        # Panels are all or nothing: a command whose own options are in none keeps one list,
        # rather than a shared option or two (--device, --storage-option) in panels of their own.
        options = [p for p in self.params if isinstance(p, TyperOption) and not p.hidden]
        if not all(p.rich_help_panel for p in options):
            for param in options:
                param.rich_help_panel = None
        # typer lists the panels in the order of their first option; here in PANELS' order.
        self.params.sort(key=lambda p: PANELS.index(p.rich_help_panel) if getattr(p, "rich_help_panel", None) in PANELS else -1)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _shown_type(option)
        return option


class PipelineCommand(_HelpFixes, TyperCommand):
    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:  # beside --json, which every command has, not in a panel of its own
            option.rich_help_panel = next((p.rich_help_panel for p in self.params if p.name == "as_json"), None)
        return option


class PipelineGroup(_HelpFixes, TyperGroup):
    pass


app = typer.Typer(
    cls=PipelineGroup,
    name="pipeline",
    help="Offline knowledge distillation: cache a teacher's softened logits once, train many students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ConfigOption = Annotated[Path | None, typer.Option("--config", rich_help_panel=GENERAL,
                                                   help="TOML file of options; command-line options override it.")]
JsonOption = Annotated[bool, typer.Option("--json", rich_help_panel=GENERAL, help="Print one JSON object on stdout (for scripts).")]
StorageOption = Annotated[list[str] | None, typer.Option(
    metavar="KEY=VALUE", rich_help_panel=STORAGE,
    help="For the cache's fsspec filesystem, e.g. endpoint_url=URL (repeatable; FSSPEC_S3_* and AWS_* environment "
         "variables work too). Never written into a cache or run folder; dask workers receive them with their tasks.")]
DeviceOption = Annotated[str, typer.Option(rich_help_panel=MODEL, help="auto (CUDA when available), cpu, cuda or cuda:N.")]
# Options that several commands share, each with its help once (the `hf` CLI's pattern). A
# model option keeps its command's name (--teacher, --student, --model): typer takes it from the parameter.
# The forms of a spec are too long for a column of the options' table (rich cuts a word wider
# than its column with "…"): they are the command's epilog, SPEC_FORMS.
REQUIRED = " Required, here or in --config."
MODEL_SPEC = "A model spec (the forms are below)."
DATASET_SPEC = "A dataset spec (the forms are below)."
ModelOption = Annotated[str | None, typer.Option(rich_help_panel=MODEL, help=MODEL_SPEC)]
DatasetOption = Annotated[str | None, typer.Option(rich_help_panel=DATA, help=DATASET_SPEC)]
CachedDatasetOption = Annotated[str | None, typer.Option(rich_help_panel=DATA, help=f"{DATASET_SPEC} (default: the cache's dataset)")]
SPEC_FORMS = f"{MODEL_HELP}\n\n{DATASET_HELP}"
AUGMENT_SPECS = "none, shift:N, rotate:D, flip, A+B, or package.module:factory / file.py:factory"
TrainAugmentOption = Annotated[str, typer.Option(rich_help_panel=DATA,
    help=f"Random input augmentation of each batch: {AUGMENT_SPECS} (a view cache replays its own instead).")]
ViewsAugmentOption = Annotated[str, typer.Option(rich_help_panel=DATA,
    help=f"Cache the teacher on augmented views: {AUGMENT_SPECS}; students replay each view exactly.")]
ReplayAugmentOption = Annotated[str | None, typer.Option(rich_help_panel=DATA,
    help="The view cache's augmentation, when it is module:factory code: a cache never runs code the user did not name.")]
LoaderWorkersOption = Annotated[int, typer.Option(rich_help_panel=DATA,
    help="DataLoader worker processes loading a map-style dataset's items (0: a prefetch thread).")]


def data_root() -> Path:
    """Where outputs go when no path is given, read when a command runs (tests point it elsewhere)."""
    return DATA_ROOT


def command(name: str, **options):
    """Register a command under `name`, with known failures turned into one line on stderr and an
    exit code, never a traceback. The library's messages name config fields; the user sees the
    command's flags (pipeline.config.in_flags)."""

    def register(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            _setup_logging()
            if os.environ.get("PIPELINE_DEBUG"):
                return function(*args, **kwargs)
            try:
                return function(*args, **kwargs)
            except typer.Exit:
                raise
            except PipelineError as exc:
                _fail(in_flags(str(exc), name), exc.exit_code)
            except Terminated:
                _fail("terminated", Terminated.exit_code)
            except KeyboardInterrupt:
                _fail("interrupted", 130)
            except MemoryError:
                _fail("out of memory", 1)
            except OSError as exc:
                _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
            except Exception as exc:  # a bug: still one line, with a pointer to the traceback
                if type(exc).__module__.startswith(("botocore", "aiobotocore")):  # credentials, endpoint: the user's to fix
                    _fail(f"object storage: {exc}", 1)
                _fail(f"internal error: {type(exc).__name__}: {exc} (set PIPELINE_DEBUG=1 for the traceback)", 1)

        return app.command(name, cls=PipelineCommand, **options)(wrapper)

    return register


def main() -> None:
    """The console entry point: the app, with click's usage errors (bad option values, unknown
    options) also reduced to one line on stderr and exit code 2. SIGTERM is an interrupt, as Ctrl-C is."""
    signal.signal(signal.SIGTERM, _terminate)
    # Python leaves SIGINT ignored when it started ignored (a job a script put in the background):
    # a long pass (cache-teacher on dask workers) then ran to the end through every interrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(prog_name="pipeline", standalone_mode=False)
    except typer.Abort:
        code = 130
    except typer.exceptions.TyperException as exc:  # click's UsageError and friends
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message:  # empty when the error is "no arguments": the help was printed instead
            print(f"error: {message}".splitlines()[0], file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


def _terminate(signum, frame) -> None:
    # Raised in the main thread, wherever it is, as Ctrl-C's KeyboardInterrupt is: the same
    # cleanup runs, and the command's wrapper (command) reports it.
    raise Terminated()


def _fail(message: str, code: int) -> None:
    print(f"error: {message}".splitlines()[0], file=sys.stderr)
    raise typer.Exit(code)


def _setup_logging() -> None:
    root = logging.getLogger()
    if root.handlers:
        return
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=STDERR, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    import dask

    # dask.distributed logs every cluster start and stop at INFO: only its warnings matter here.
    # It sets its loggers' levels from dask's config when first imported, so say it there.
    dask.config.set({"logging.distributed": "warning"})
    for chatty in ("botocore", "aiobotocore"):  # "Found credentials in environment variables", on every start
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _emit(as_json: bool, payload: dict, table: Table) -> None:
    if as_json:
        print(json.dumps(_strict_json(payload), allow_nan=False))
    else:
        _print_table(table)


def _print_table(table: Table) -> None:
    if sys.stdout.isatty():
        Console().print(table)
        return
    if table.title:  # rich wraps a title to its table's width
        table.min_width = len(str(table.title)) + 4
    Console(width=UNBOUNDED_WIDTH).print(table)


class _RemainingAtThisPace(TimeRemainingColumn):
    """Time left at this process's pace since its first report: a resumed run's first report counts
    work done before this process, which rich's own estimate would take for a burst of speed."""

    def render(self, task) -> Text:
        since = task.fields.get("since")
        if task.total is None or since is None or task.completed <= since[1]:
            return Text("-:--:--", style="progress.remaining")
        started, done = since
        left = (task.total - task.completed) * (task.get_time() - started) / (task.completed - done)
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


@contextlib.contextmanager
def _progress_bar(description: str):
    """A rich progress bar on stderr when it is a terminal (else None: log lines only). It shows
    once the stage's first report gives the total (never "0/?"), with the time elapsed since the
    command started. That report may count work done before this process (a resumed run): the bar
    starts there, and its time left is estimated from this process's pace only."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
               TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("remaining"), _RemainingAtThisPace())
    with Progress(*columns, console=STDERR, transient=True) as bar:
        task = bar.add_task(description, total=None, visible=False)

        def report(done: int, total: int) -> None:
            if "since" not in bar.tasks[0].fields:
                bar.update(task, completed=done, total=total, visible=True, since=(bar.get_time(), done))
            else:
                bar.update(task, completed=done, total=total)

        yield report


def _strict_json(value):
    """NaN and infinity are not JSON: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _key_value_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(overflow="fold")  # fold, not cut: paths must stay whole to be copied
    table.add_column(overflow="fold")
    for key, value in values.items():
        table.add_row(key, _number(value) if isinstance(value, float) else str(value))
    return table


def _number(value: float) -> str:
    """Four decimals, or four significant digits for what four decimals would show as 0 (an error of 3e-05)."""
    return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def _renamed(ctx: typer.Context, old: str, new: str, old_value, new_value):
    """The value of option `new`, or of `old`, its former name, still taken with a notice on stderr."""
    if old_value is None:
        return new_value
    if ctx.get_parameter_source(new).name != "DEFAULT":  # compared by name, as pipeline.config does
        raise InputError(f"--{old} is the old name of --{new}: give --{new} only")
    print(f"warning: {ctx.info_name} --{old} is now --{new}; the old name will go", file=sys.stderr)
    return old_value


def _version(value: bool) -> None:
    if value:
        print(f"pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Offline knowledge distillation: cache a teacher's softened logits once, train many students from the cache.

    Quick start:  pipeline demo
    """


def _apply_storage_options(options: list[str] | None, location) -> None:
    """--storage-option KEY=VALUE pairs for the filesystem of `location`. A VALUE that reads as
    JSON (true, 3, {"region_name": "x"}) is taken as that; anything else is a string."""
    parsed = {}
    for option in options or []:
        key, sep, text = option.partition("=")
        if not sep or not key:
            raise InputError(f"--storage-option takes KEY=VALUE, got {option!r}")
        try:
            parsed[key] = json.loads(text)
        except ValueError:
            parsed[key] = text
    if parsed:
        storage.set_storage_options(parsed, location)


# Each module registers its commands with `command` when imported; the order here is their order in --help.
from pipeline.cli import distil, data, caches, runs, measure, demos  # noqa: F401, I001
