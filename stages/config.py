"""The two stages' configs, typed and frozen, with the checks that run before any work starts,
and the names those checks accept (dtypes, codecs, autocast modes, feature losses,
view policies), defined here once for the stages and the CLI.

This module imports neither torch nor numpy nor zarr when it loads: the CLI takes its option
defaults from these classes when it starts, and `pipeline --help` must not pay for loading
torch. Checking `format` and its options asks the kind registry (stages.kinds). The stage
modules re-export their config (`stages.cache_teacher.CacheTeacherConfig`,
`stages.train_student.TrainConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stages import divergences
from stages.checks import check_positive, check_range
from stages.errors import InputError
from stages.storage import CacheLocation

DTYPES = ("float16", "float32")
# Codecs for the soft-label arrays (see stages.cache).
CODECS = ("none", "zstd")
# Teacher autocast modes besides "none", with the torch dtype each runs in (by name: no torch here).
AMP_MODES = {"bf16": "bfloat16", "fp16": "float16"}
FEATURE_LOSSES = ("mse", "cosine")
# The learning rate's shape after warmup, per optimizer step (stages.train_student.lr_factor).
SCHEDULES = ("cosine", "linear", "constant")
VIEW_POLICIES = ("random", "cycle")

# Distillation temperatures in use are 1-20 (Hinton et al. use up to 20). Far beyond, teacher
# logits within +-100 soften to within 20% of uniform, float16 keeps little of logits/T, and
# the loss's T**2 factor (1e6 at T = 1000) swamps the hard-label term; 1e200 overflows T**2.
MAX_TEMPERATURE = 1000.0
# np.random.seed (seeded with the run's seed) takes seeds below 2**32; view seeds are uint64.
MAX_SEED = 2**32 - 1
MAX_VIEW_SEED = 2**64 - 1
# Top-k caches store class numbers as uint8, uint16 or uint32 (stages.cache).
MAX_CLASSES = 2**32
# The teacher's default batch in rows. A teacher batch never crosses a chunk, so a chunk of fewer
# rows (a token cache's: about 2 MB of a sequence's soft labels per row, stages.cache.layout) is
# one batch by default: the same batches, without a note that the chunks are smaller.
DEFAULT_TEACHER_BATCH = 256


# Messages name config fields in backticks, "`top_k` must be ...": the library speaks its own
# language, and the CLI turns each field into its flag when it prints the message (pipeline.config).
# The range checks are stages.checks', shared with the kinds' options.


def _check_counts(config, bounds: dict[str, int]) -> None:
    """Each named whole-number field (skipping None) at least its bound and at most MAX_COUNT."""
    for name, low in bounds.items():
        value = getattr(config, name)
        if value is not None:
            check_range(name, value, low)


@dataclass(frozen=True)
class CacheTeacherConfig:
    teacher: str
    dataset: str
    out: CacheLocation
    teacher_weights: Path | None = None
    split: str = "train"
    temperature: float = 4.0
    batch_size: int | None = None  # None: DEFAULT_TEACHER_BATCH rows, or one chunk's rows where a chunk holds fewer
    device: str = "auto"
    dtype: str = "float16"
    format: str = "dense"  # the kind of cache, a name in stages.kinds.KINDS
    kind_options: dict = field(default_factory=dict)  # the kind's options given (the rest at their defaults), by name
    augment: str = "none"  # augmentation of the cached views (stages.augment); none: the inputs as they are
    views: int = 1  # augmented views per sample, with augment
    view_seed: int = 0  # base seed of the views' seeds
    features: bool = False  # also cache the teacher's features (its logits_and_features), for feature targets
    chunk_rows: int | None = None  # None: about 2 MB of soft labels per chunk
    shard_rows: int | None = None  # rows per shard, a multiple of chunk_rows; None: by size (stages.cache.format); 0: unsharded
    codec: str = "none"  # of the logits array: none or zstd (see CODECS)
    amp: str = "none"  # teacher forward under autocast: none, bf16 or fp16
    loader_workers: int = 0  # DataLoader worker processes for a map-style dataset's inputs
    workers: int = 0  # >0: compute the chunks on a local dask cluster of this many worker processes
    scheduler: str | None = None  # address of a running dask.distributed scheduler whose workers compute the chunks
    num_classes: int | None = None  # for building the teacher when the split has no labels to count classes by
    max_gib: float = 100.0  # refuse a cache whose soft labels would take more (0: no limit)
    overwrite: bool = False

    def validate(self) -> None:
        check_positive("temperature", self.temperature, MAX_TEMPERATURE)
        _check_counts(self, {"batch_size": 1, "views": 1, "chunk_rows": 1, "shard_rows": 0, "loader_workers": 0, "workers": 0})
        if self.num_classes is not None:  # one class has nothing to distil: its softmax is 1
            check_range("num_classes", self.num_classes, 2, MAX_CLASSES)
        check_range("view_seed", self.view_seed, 0, MAX_VIEW_SEED)
        if not (self.max_gib >= 0 and math.isfinite(self.max_gib)):
            raise InputError(f"`max_gib` must be a number of GiB >= 0 (0: no limit), got {self.max_gib}")
        if self.dtype not in DTYPES:
            raise InputError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise InputError(f"`codec` must be one of {', '.join(CODECS)}, got {self.codec!r}")
        self.options()
        if self.views > 1 and self.augment == "none":
            raise InputError(f"`views` {self.views} needs `augment` SPEC: without augmentation every view would be the same")
        if self.workers and self.scheduler:
            raise InputError("`workers` starts a local dask cluster and `scheduler` names a running one: give one of them")
        if (self.workers or self.scheduler) and self.loader_workers:
            raise InputError("`loader_workers` cannot go with dask workers (their processes cannot start DataLoader workers)")
        if self.amp not in AMP_MODES and self.amp != "none":
            raise InputError(f"`amp` must be none, {' or '.join(AMP_MODES)}, got {self.amp!r}")

    def options(self):
        """The kind's options (stages.kinds.KindOptions), checked against the kind."""
        # Imported here: the CLI imports this module at start-up, and the kinds' package is the
        # one dependency of a config check beyond this file.
        from stages.kinds import kind_options

        return kind_options(self.format, self.kind_options)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    dataset: str
    out: Path
    cache: CacheLocation | None = None
    model_weights: Path | None = None
    split: str = "train"
    eval_split: str | None = "test"
    alpha: float = 0.9
    temperature: float | None = None  # None: the cache's own T
    divergence: str = "forward-kl"  # between teacher and student (stages.divergences): forward-kl, reverse-kl, jsd[:BETA], tv
    epochs: int = 20
    max_steps: int | None = None  # optimizer steps in all; overrides `epochs` (the run takes as many epochs as they need)
    batch_size: int = 128  # rows per forward (the micro-batch); a step sees batch_size x accumulate rows
    accumulate: int = 1  # micro-batches whose gradients add up to one optimizer step
    lr: float = 3e-3
    warmup_steps: int = 0  # optimizer steps of linear warmup before `schedule` takes over
    schedule: str = "cosine"  # the lr after warmup, per optimizer step: cosine or linear decay to 0, or constant
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 0.0  # clip the gradients' global norm to this before each step; 0: no clipping
    amp: str = "none"  # the student's forward under autocast: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a GradScaler)
    seed: int = 0
    device: str = "auto"
    augment: str = "none"  # random augmentation of the inputs (stages.augment); a view cache replays its own instead
    view_policy: str = "random"  # view caches: which view a drawn sample uses; random, or cycle (view = epoch mod V)
    feature_loss: str = "none"  # with a cache of features: mse or cosine between the projected student's and the teacher's
    feature_weight: float = 1.0  # the feature loss's weight, added to the distillation loss
    buffer_chunks: int = 8
    loader_workers: int = 0  # DataLoader worker processes for a map-style dataset's inputs
    # A student with its last hidden states and output layer apart (`hidden_and_head`: gpt2: and
    # hf: causal LMs) has its loss taken a piece of positions at a time, never B x L x C logits;
    # False: on the whole logits, as any other student.
    logit_pieces: bool = True
    eval_batch_size: int = 512  # rows per evaluation batch
    weights_out: Path | None = None  # None: model.safetensors in the run folder
    checkpoint_every: int = 1  # epochs between checkpoints; 0: none
    checkpoint_every_steps: int = 0  # also a checkpoint every N optimizer steps, resumable mid-epoch; 0: none
    log_every_steps: int = 0  # a log line and a steps.jsonl line every N optimizer steps; 0: none
    hf_out: Path | None = None  # where the student goes as a Hugging Face folder (hf:/gpt2: students); None: RUN/hf
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.temperature is not None:
            check_positive("temperature", self.temperature, MAX_TEMPERATURE)
        _check_counts(self, {"epochs": 1, "max_steps": 1, "batch_size": 1, "accumulate": 1, "warmup_steps": 0, "buffer_chunks": 1,
                             "loader_workers": 0, "checkpoint_every": 0, "checkpoint_every_steps": 0, "log_every_steps": 0,
                             "eval_batch_size": 1})
        check_positive("lr", self.lr)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise InputError(f"`warmup_steps` {self.warmup_steps} exceeds `max_steps` {self.max_steps}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.amp not in AMP_MODES and self.amp != "none":
            raise InputError(f"`amp` must be none, {' or '.join(AMP_MODES)}, got {self.amp!r}")
        check_range("feature_weight", self.feature_weight, 0.0, math.inf)
        check_range("seed", self.seed, 0, MAX_SEED)
        divergences.parse(self.divergence)
        if self.view_policy not in VIEW_POLICIES:
            raise InputError(f"`view_policy` must be one of {', '.join(VIEW_POLICIES)}, got {self.view_policy!r}")
        if self.feature_loss not in ("none", *FEATURE_LOSSES):
            raise InputError(f"`feature_loss` must be none, {' or '.join(FEATURE_LOSSES)}, got {self.feature_loss!r}")
