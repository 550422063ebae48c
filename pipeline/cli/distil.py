"""The two stages and the teacher they need: cache-teacher, train-student and train-teacher."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import (CACHE, DATA, DATASET_SPEC, DISTILLATION, MODEL, MODEL_SPEC, OUTPUT, REQUIRED, SCALE_OUT, SPEC_FORMS, TRAINING,
                          ConfigOption, DatasetOption, DeviceOption, JsonOption, LoaderWorkersOption, ModelOption,
                          StorageOption, TrainAugmentOption, ViewsAugmentOption, _apply_storage_options, _emit, _key_value_table,
                          _progress_bar, command, data_root)
from pipeline.config import build_config, field_default, field_of_option, merge_options
from pipeline.specs import FileSpec, cache_file_name, parse_spec, run_folder_name, teacher_file_name
from stages.config import CacheTeacherConfig as CT, TrainConfig as TS
from stages.divergences import DIVERGENCES
from stages.errors import InputError
from stages.kinds import KINDS, option_fields
from stages.storage import cache_location

# Each divergence of stages.divergences, as its docstring's first line says it.
DIVERGENCE_NAMES = "; ".join(f"{name}: {divergence.__doc__.splitlines()[0]}" for name, divergence in DIVERGENCES.items())


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
                                               annotation=Annotated[option.type | None, typer.Option(help=help, rich_help_panel=CACHE)]))
        after = next(i for i, p in enumerate(parameters) if p.name == "format") + 1
        parameters[after - 1] = parameters[after - 1].replace(annotation=Annotated[str, typer.Option(
            rich_help_panel=CACHE, help=f"The kind of cache: {', '.join(KINDS)} (each described below).")])
        return inspect.Signature([*parameters[:after], *generated, *parameters[after:]])

    def __call__(self, **values):
        options = option_fields()
        return self.__wrapped__(**{name: value for name, value in values.items() if name not in options},
                                kind_flags={name: values.get(name) for name in options})


def _cache_teacher_epilog() -> str:
    kinds = "\n".join(f"{name}: {kind.summary}" for name, kind in KINDS.items())
    return f"Kinds of cache (--format):\n{kinds}\n\n{SPEC_FORMS}"


# A command's docstring is its --help text. Typer joins the lines of its first paragraph and
# keeps the others' line breaks, and the terminal wraps what is longer: so a paragraph of prose
# is one line, and an example is lines of at most 76 characters continued with " \", which
# a terminal of 80 columns shows as written (tests/pipeline/test_help.py runs each one's parser).
@command("cache-teacher", rich_help_panel="The two stages", epilog=_cache_teacher_epilog)
@with_kind_options
def cache_teacher_command(
    ctx: typer.Context,
    teacher: Annotated[str | None, typer.Option(rich_help_panel=MODEL, help=f"The teacher: {MODEL_SPEC[0].lower()}{MODEL_SPEC[1:]}{REQUIRED}")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(rich_help_panel=MODEL, help="Teacher weights: .safetensors or a PyTorch state dict (loaded with weights_only).")] = None,
    dataset: Annotated[str | None, typer.Option(rich_help_panel=DATA, help=f"{DATASET_SPEC}{REQUIRED}")] = None,
    split: Annotated[str, typer.Option(rich_help_panel=DATA, help="Split to cache.")] = field_default(CT, "split"),
    out: Annotated[str | None, typer.Option(rich_help_panel=CACHE, help="Cache to write: a .zarr folder, or an fsspec URL such as s3://bucket/path.zarr. (default: data/caches/TEACHER-DATASET-SPLIT-T.zarr)")] = None,
    temperature: Annotated[float, typer.Option(rich_help_panel=CACHE, help="Temperature T: the cache stores teacher logits / T.")] = field_default(CT, "temperature"),
    batch_size: Annotated[int | None, typer.Option(rich_help_panel=MODEL, help="Teacher batch size in rows. (default: 256, or a chunk's rows where a chunk holds fewer, as a language model's token cache does: a batch never crosses a chunk)")] = field_default(CT, "batch_size"),
    device: DeviceOption = field_default(CT, "device"),
    dtype: Annotated[str, typer.Option(rich_help_panel=CACHE, help="Stored dtype: float16 or float32.")] = field_default(CT, "dtype"),
    format: str = field_default(CT, "format"),  # with_kind_options gives its help, and a flag for each kind's option after it
    augment: ViewsAugmentOption = field_default(CT, "augment"),
    views: Annotated[int, typer.Option(rich_help_panel=DATA, help="Augmented views per sample (with --augment).")] = field_default(CT, "views"),
    features: Annotated[bool, typer.Option("--features", rich_help_panel=CACHE, help="Also cache the teacher's features (hf: models: mean-pooled last hidden state), for train-student --feature-loss.")] = False,
    view_seed: Annotated[int, typer.Option(rich_help_panel=DATA, help="Base seed of the views' seeds (recorded in the cache).")] = field_default(CT, "view_seed"),
    chunk_rows: Annotated[int | None, typer.Option(rich_help_panel=CACHE, help="Rows per chunk, the unit a reader decodes and shuffles. (default: about 2 MB of soft labels per chunk)")] = None,
    shard_rows: Annotated[int | None, typer.Option(rich_help_panel=CACHE, help="Rows per shard, a multiple of --chunk-rows: each array's shard is one file or object (zarr v3 sharding); 0: unsharded. (default: unsharded up to 1 GiB of soft labels, else shards of about 64-128 MiB per array)")] = None,
    codec: Annotated[str, typer.Option(rich_help_panel=CACHE, help="Compression of the logits: none (fastest to read) or zstd (about 10% smaller for float16).")] = field_default(CT, "codec"),
    amp: Annotated[str, typer.Option(rich_help_panel=MODEL, help="Run the teacher under autocast: none, bf16 or fp16 (recorded in the cache).")] = field_default(CT, "amp"),
    num_classes: Annotated[int | None, typer.Option(rich_help_panel=MODEL, help="Classes the teacher outputs; needed only for a split without labels.")] = None,
    loader_workers: LoaderWorkersOption = field_default(CT, "loader_workers"),
    workers: Annotated[int, typer.Option(rich_help_panel=SCALE_OUT, help="Compute the chunks on a local dask cluster of N worker processes (0: in this process).")] = field_default(CT, "workers"),
    scheduler: Annotated[str | None, typer.Option(rich_help_panel=SCALE_OUT, help="Compute the chunks on the workers of this running dask scheduler, e.g. tcp://10.0.0.5:8786.")] = None,
    max_gib: Annotated[float, typer.Option(rich_help_panel=CACHE, help="Refuse a cache whose soft labels would take more than this many GiB (0: no limit); the size is logged before the pass.")] = field_default(CT, "max_gib"),
    storage_option: StorageOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=CACHE, help="Replace an existing cache at --out. Without it, re-running the same command resumes an interrupted cache.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    kind_flags: dict | None = None,
) -> None:
    """Run a teacher once over a dataset split and store its temperature-softened logits.

    A teacher with logits per token (a language model) gets a token-level cache. If the process is killed, run the same command again: it computes only the missing chunks.

    Examples:

        pipeline cache-teacher --teacher cnn --dataset mnist-5k --temperature 4 \\
          --teacher-weights data/teachers/cnn-mnist-5k.safetensors

        pipeline cache-teacher --teacher bytelm-teacher --dataset stdlib-bytes \\
          --temperature 1 --format topk --top-k 32 --teacher-weights \\
          data/teachers/bytelm-teacher-stdlib-bytes.safetensors

        pipeline cache-teacher --teacher cnn --dataset mnist-5k --workers 4 \\
          --teacher-weights data/teachers/cnn-mnist-5k.safetensors \\
          --out s3://my-bucket/caches/cnn-T4.zarr
    """
    from pipeline.jobs import run_caching

    given = {k: v for k, v in locals().items() if k not in ("ctx", "config", "as_json", "kind_flags")}
    option_types = {name: option.type.__name__ for name, option in option_fields().items()}
    values = merge_options(ctx, config, {**given, **kind_flags}, CT, option_types=option_types)
    values["kind_options"] = {name: value for name in kind_flags if (value := values.pop(name)) is not None}
    if values["out"] is None and values["teacher"] and values["dataset"]:
        values["out"] = data_root() / "caches" / cache_file_name(values["teacher"], values["dataset"], values["split"],
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


# The options train-teacher shares with train-student, each with its help once.
EpochsOption = Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Training epochs.")]
BatchSizeOption = Annotated[int, typer.Option(rich_help_panel=TRAINING,
                                              help="Rows per forward pass, the micro-batch (the global batch under torchrun).")]
LrOption = Annotated[float, typer.Option(rich_help_panel=TRAINING,
                                         help="AdamW peak learning rate; by default cosine-annealed to 0 over the steps.")]
SeedOption = Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Seed for initialisation and data order.")]


@command("train-student", rich_help_panel="The two stages",
         epilog=lambda: f"Divergences (--divergence): {DIVERGENCE_NAMES}.\n\n{SPEC_FORMS}")
def train_student_command(
    ctx: typer.Context,
    cache: Annotated[str | None, typer.Option(rich_help_panel=DATA, help="Cache written by cache-teacher: a folder or an fsspec URL (s3://...). Without it the student trains on hard labels only (the baseline).")] = None,
    student: Annotated[str | None, typer.Option(rich_help_panel=MODEL, help=f"The student: {MODEL_SPEC[0].lower()}{MODEL_SPEC[1:]}{REQUIRED}")] = None,
    student_weights: Annotated[Path | None, typer.Option(rich_help_panel=MODEL, help="Initial student weights (.safetensors or a state dict).")] = None,
    dataset: Annotated[str | None, typer.Option(rich_help_panel=DATA, help=f"{DATASET_SPEC} Required without --cache (here or in --config); default: the cache's dataset.")] = None,
    split: Annotated[str | None, typer.Option(rich_help_panel=DATA, help="Training split. (default: the cache's split, else train)")] = None,
    eval_split: Annotated[str, typer.Option(rich_help_panel=DATA, help="Held-out split evaluated after every epoch.")] = field_default(TS, "eval_split"),
    out: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help="Run folder to write. (default: a folder in data/runs named after the student, the cache or the dataset, alpha, T and the seed)")] = None,
    alpha: Annotated[float, typer.Option(rich_help_panel=DISTILLATION, help="Weight of the soft (KD) term; 1 - alpha weighs cross-entropy with the hard labels.")] = field_default(TS, "alpha"),
    temperature: Annotated[float | None, typer.Option(rich_help_panel=DISTILLATION, help="Distillation temperature. (default: the cache's T; another T' re-tempers exactly)")] = None,
    logit_pieces: Annotated[bool, typer.Option("--logit-pieces/--whole-logits", rich_help_panel=MODEL, help="A causal LM student (gpt2:, hf:) takes its loss and evaluation a piece of positions at a time, never batch x length x classes logits; --whole-logits computes them whole (to compare).")] = field_default(TS, "logit_pieces"),
    eval_batch_size: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Rows per evaluation batch.")] = field_default(TS, "eval_batch_size"),
    divergence: Annotated[str, typer.Option(rich_help_panel=DISTILLATION, help=f"Between the teacher's and the student's distributions: {', '.join(DIVERGENCES)} (each described below). A sampled cache estimates forward-kl only.")] = field_default(TS, "divergence"),
    epochs: EpochsOption = field_default(TS, "epochs"),
    max_steps: Annotated[int | None, typer.Option(rich_help_panel=TRAINING, help="Optimizer steps in all, over as many epochs as they take; overrides --epochs.")] = field_default(TS, "max_steps"),
    batch_size: BatchSizeOption = field_default(TS, "batch_size"),
    accumulate: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Micro-batches per optimizer step, their gradients averaged: a step sees --batch-size x --accumulate rows.")] = field_default(TS, "accumulate"),
    lr: LrOption = field_default(TS, "lr"),
    warmup_steps: Annotated[int, typer.Option(rich_help_panel=TRAINING, help="Optimizer steps of linear warmup to --lr.")] = field_default(TS, "warmup_steps"),
    schedule: Annotated[str, typer.Option(rich_help_panel=TRAINING, help="The learning rate after warmup, per step: cosine or linear decay to 0 at the last step, or constant.")] = field_default(TS, "schedule"),
    weight_decay: Annotated[float, typer.Option(rich_help_panel=TRAINING, help="AdamW's decoupled weight decay (0: plain Adam).")] = field_default(TS, "weight_decay"),
    max_grad_norm: Annotated[float, typer.Option(rich_help_panel=TRAINING, help="Clip the gradients' global norm to this before each step (0: no clipping).")] = field_default(TS, "max_grad_norm"),
    amp: Annotated[str, typer.Option(rich_help_panel=MODEL, help="The student under autocast: none, bf16 (CPU or CUDA) or fp16 (CUDA, with loss scaling).")] = field_default(TS, "amp"),
    seed: SeedOption = field_default(TS, "seed"),
    augment: TrainAugmentOption = field_default(TS, "augment"),
    view_policy: Annotated[str, typer.Option(rich_help_panel=DATA, help="From a view cache: random (a random view each time a sample is drawn) or cycle (view = epoch mod V).")] = field_default(TS, "view_policy"),
    feature_loss: Annotated[str, typer.Option(rich_help_panel=DISTILLATION, help="With a cache of features (cache-teacher --features): none, mse or cosine between the student's projected features and the teacher's.")] = field_default(TS, "feature_loss"),
    feature_weight: Annotated[float, typer.Option(rich_help_panel=DISTILLATION, help="Weight of the feature loss, added to the distillation loss.")] = field_default(TS, "feature_weight"),
    buffer_chunks: Annotated[int, typer.Option(rich_help_panel=DATA, help="Cache chunks buffered and shuffled together.")] = field_default(TS, "buffer_chunks"),
    loader_workers: LoaderWorkersOption = field_default(TS, "loader_workers"),
    device: DeviceOption = field_default(TS, "device"),
    checkpoint_every: Annotated[int, typer.Option(rich_help_panel=OUTPUT, help="Save a checkpoint every N epochs (and after the last); 0: never.")] = field_default(TS, "checkpoint_every"),
    checkpoint_every_steps: Annotated[int, typer.Option(rich_help_panel=OUTPUT, help="Also save a checkpoint every N optimizer steps, which --resume continues mid-epoch exactly; 0: never.")] = field_default(TS, "checkpoint_every_steps"),
    log_every_steps: Annotated[int, typer.Option(rich_help_panel=OUTPUT, help="Log the loss and its parts, the learning rate and rows (tokens) per second every N optimizer steps, also into steps.jsonl in the run folder; 0: never.")] = field_default(TS, "log_every_steps"),
    hf_out: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help="Folder to write an hf: or gpt2: student to as a Hugging Face model (config, safetensors weights, the dataset's tokenizer) that AutoModelForCausalLM.from_pretrained loads. (default: RUN/hf)")] = field_default(TS, "hf_out"),
    storage_option: StorageOption = None,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT, help="Continue the run in --out from its last checkpoint (same options required); a finished run is left as it is; without a checkpoint, a warning says so and the run starts from the beginning.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=OUTPUT, help="Replace an existing run folder at --out.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a student from a cache (the teacher is never loaded), or from hard labels without one.

    Example:

        pipeline train-student --cache data/caches/cnn-mnist-5k-train-T4.zarr \\
          --student mlp-400 --alpha 0.9 --epochs 20

    With torchrun, the processes train one model with DDP (--batch-size is the global batch):

        torchrun --standalone --nproc-per-node 2 -m pipeline train-student \\
          --cache data/caches/cnn-mnist-5k-train-T4.zarr --student mlp-400

    A language model, by steps, written out as a Hugging Face folder (RUN/hf):

        pipeline train-student --cache data/caches/lm.zarr --max-steps 300 \\
          --student gpt2:layers=2,dim=128,heads=2,positions=1024 \\
          --warmup-steps 30 --accumulate 4 --max-grad-norm 1 \\
          --log-every-steps 10 --checkpoint-every-steps 50
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
        values["out"] = data_root() / "runs" / run_folder_name(
            values["student"], values["seed"], cache=values["cache"], alpha=values["alpha"],
            temperature=values["temperature"] or attrs.get("temperature"), dataset=values["dataset"], divergence=values["divergence"])
    values.update({field: values.pop(option) for option, field in field_of_option("train-student").items()})
    cfg = build_config(TS, _absolute_paths(values, "model", "dataset"))
    with _progress_bar("training (steps)") as progress:
        result = run_training(cfg, progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports (and evaluated)
        _emit(as_json, vars(result), _key_value_table(f"student run {result.mode}", vars(result)))


@command("train-teacher", rich_help_panel="The two stages", epilog=SPEC_FORMS)
def train_teacher_command(
    model: ModelOption = "cnn",
    dataset: DatasetOption = "mnist-5k",
    out: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help="Weights file to write (.safetensors); the run folder goes beside it. (default: data/teachers/MODEL-DATASET.safetensors)")] = None,
    epochs: EpochsOption = 15,
    batch_size: BatchSizeOption = field_default(TS, "batch_size"),
    lr: LrOption = field_default(TS, "lr"),
    seed: SeedOption = field_default(TS, "seed"),
    augment: TrainAugmentOption = field_default(TS, "augment"),
    device: DeviceOption = field_default(TS, "device"),
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=OUTPUT, help="Replace existing weights at --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT, help="Continue an interrupted run (the .run folder beside --out) from its last checkpoint (same options required).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a teacher on hard labels and save its weights, so that there is a teacher to cache.

    Its run folder (checkpoints, logs) goes beside the weights, as WEIGHTS.run: --resume continues it.

    Example:

        pipeline train-teacher --model cnn --dataset mnist-5k --epochs 15 \\
          --augment shift:2
    """
    from pipeline.jobs import run_training

    out = out or data_root() / "teachers" / teacher_file_name(model, dataset)
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
