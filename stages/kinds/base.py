"""What every kind of cache implements, and the pieces several kinds share.

A kind (one module of stages.kinds, one line of its registry) owns:
- its options: a frozen dataclass of `KindOptions` whose fields are declared with `option`
  (default, range, help text). A cache records them whole as its `kind_options` attribute, a
  resumed write must find them equal, and cache-teacher's flags are generated from them;
- its arrays (names, shapes, dtypes, fill values, dimension names) and how the teacher's
  logits / T become stored rows;
- how stored rows become the teacher's distribution over the kind's support, and the student's
  distribution collapsed onto the same support, where any divergence of stages.divergences
  compares them (`soft_terms`); a kind that only estimates one divergence says which;
- the meaning checks of its values, verify's comparisons, inspect's statistics and combine.

A kind object holds no state: what it needs of the cache's shape comes from a `Shape` (the
cache's stages.cache.layout.Layout). This module and the kinds import numpy and torch on first
use (stages.lazy): the CLI reads the options at start-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from stages import divergences
from stages.checks import check_range
from stages.errors import InputError
from stages.lazy import lazy_module

np = lazy_module("numpy")
torch = lazy_module("torch")
losses = lazy_module("stages.losses")

Rows = dict[str, "np.ndarray"]
Loss = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class ArraySpec(NamedTuple):
    """One array of a cache: its shape after the sample axis, dtype, fill value, whether it is
    compressed, its dimension names (the sample axis first) and, when compressed, its zstd level
    (None: the cache's, stages.cache.layout.ZSTD_LEVEL)."""

    shape: tuple[int, ...]
    dtype: str
    fill: object
    compressed: bool
    dimensions: tuple[str, ...]
    zstd_level: int | None = None


class Shape(Protocol):
    """What a kind needs to know of a cache's layout (stages.cache.layout.Layout)."""

    num_classes: int
    dtype: str
    codec: str
    options: KindOptions
    tokens: int | None

    @property
    def row_shape(self) -> tuple[int, ...]: ...

    @property
    def position_shape(self) -> tuple[int, ...]: ...

    @property
    def row_axes(self) -> list[str]: ...

    @property
    def position_axes(self) -> list[str]: ...


def option(default: Any = None, *, help: str, low: int, high: int | None = None) -> Any:
    """A field of a kind's options: its default (None: the option must be given), the range a
    value must lie in, and its help text (the flag's, in cache-teacher --help)."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass(frozen=True)
class KindOptions:
    """A kind's options (none for this base). Subclasses declare fields with `option`."""

    def check(self, kind: str) -> None:
        """Each option given (or defaulted) and within its range, else an InputError naming it
        (`kind`: the name of the kind they are for)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                raise InputError(f"`format` {kind} needs `{field.name}`")
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"`{field.name}` must be a whole number, got {value!r}")
            bounds = (field.metadata["low"],) if field.metadata["high"] is None else (field.metadata["low"], field.metadata["high"])
            check_range(field.name, value, *bounds)

    def suffix(self, kind: str) -> str:
        """What the kind `kind` and these options add to a cache's default file name
        (pipeline.specs.cache_file_name): by default the kind's name and each option's value."""
        return f"-{kind}" + "".join(f"-{name}{value}" for name, value in self.attributes().items())

    def attributes(self) -> dict:
        """The options as the cache's `kind_options` attribute."""
        return dataclasses.asdict(self)


def index_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds every class number 0..C-1."""
    return next(t for t in ("uint8", "uint16", "uint32") if num_classes - 1 <= np.iinfo(t).max)


def zero_padding(values: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """`values` ((B, L, ...), any dtype torch computes in) with the positions where `padding`
    ((B, L) bool) is set zeroed."""
    if padding is None:
        return values
    return values.masked_fill(padding.reshape(*padding.shape, *(1,) * (values.ndim - padding.ndim)), 0)


def valid_positions(rows: Rows, positions: int) -> np.ndarray | None:
    """Which of a token cache's positions hold soft labels, (rows, positions) bool: those before
    each row's length and, in a cache with a mask of trained positions, trained; None for rows
    without positions."""
    if "lengths" not in rows:
        return None
    valid = np.arange(positions)[None, :] < rows["lengths"][:, None]
    return valid & (rows["trained"] == 1) if "trained" in rows else valid


def any_in_use(bad: np.ndarray, rows: Rows, layout: Shape, held: np.ndarray) -> bool:
    """Whether `bad` ((rows, [positions], ...) bool) is set at a position holding soft labels: in
    a token cache, one before its row's length (and trained) when `rows` has the lengths, else
    one where `held` ((rows, positions) bool: the kind's arrays there are not zero, as every
    encoder leaves padding) is set; every row of a cache without positions. The mask is
    broadcast over `bad`'s further axes: numpy reduces a short last axis (a row's K entries)
    several times slower than it masks and reduces the whole array."""
    if layout.tokens is not None:
        used = valid_positions(rows, layout.tokens) if "lengths" in rows else held
        bad = bad & used.reshape(used.shape + (1,) * (bad.ndim - used.ndim))
    return bool(bad.any())


def padding_problem(rows: Rows, layout: Shape, soft_arrays: tuple[str, ...]) -> str | None:
    """What is wrong with a token cache's padding, given its lengths: a trained mark past a row's
    length, or soft labels (which every encoder zeroes there) at a position past its length or
    untrained, as a lowered length or a damaged array leaves them; None when rows lack lengths."""
    if layout.tokens is None or "lengths" not in rows:
        return None
    within = np.arange(layout.tokens)[None, :] < rows["lengths"][:, None]
    if "trained" in rows and (rows["trained"][~within] != 0).any():
        return "trained marks past a row's lengths"
    padding = ~valid_positions(rows, layout.tokens)
    for name in soft_arrays:
        if name in rows and rows[name][padding].any():
            return f"{name} values past a row's lengths (or at an untrained position): lengths lowered or {name} damaged"
    return None


def over_positions(values: np.ndarray, rows: Rows) -> tuple:
    """A chunk's (sum, largest, entries) of a per-position statistic (rows, [positions]), over its
    rows, or over a token cache's valid (and trained) tokens: padding does not count."""
    valid = valid_positions(rows, values.shape[1]) if values.ndim > 1 else None
    if valid is not None:
        values = values[valid]
    return values.sum().item(), values.max(initial=0).item(), int(values.size)


def mean_and_max(parts: list[tuple]) -> dict:
    """Chunks' (sum, largest, entries) statistics as one mean and largest over all their entries."""
    total, count = sum(p[0] for p in parts), sum(p[2] for p in parts)
    return {"mean": total / count, "max": max(p[1] for p in parts), "entries": count}


class Kind:
    """The interface every kind implements (see the module docstring)."""

    name: str
    summary: str  # what it stores, in a phrase (cache-teacher --format's help)
    Options: ClassVar[type[KindOptions]] = KindOptions
    soft_arrays: tuple[str, ...]  # the arrays holding its soft labels
    last_axis: str  # the dimension name of a row's last axis
    exact_at_any_temperature: bool  # whether its probabilities re-temper exactly
    entropy_of: str  # what its entropy statistic is taken over
    can_combine: bool
    # The divergences (stages.divergences) it can train with; None: every one, over its support.
    supported_divergences: tuple[str, ...] | None = None
    # Whether its encoding loses more than the cache dtype's rounding: `encode` then also gives
    # "encoding_error" per position (see encoding_error), which the writer sums per write unit.
    lossy: bool = False

    def width(self, layout: Shape) -> int:
        """The length of a row's last axis."""
        raise NotImplementedError

    def check(self, layout: Shape) -> None:
        """Raise an InputError for a layout this kind cannot store (its options are checked already)."""

    def arrays(self, layout: Shape) -> dict[str, ArraySpec]:
        """Its soft-label arrays, by name."""
        raise NotImplementedError

    def position_bytes(self, layout: Shape) -> dict[str, float]:
        """Its byte model: the bytes each soft-label array is expected to take on disk per position
        that holds soft labels (a row, a view or a valid token), before any is written; what
        cache-teacher estimates a cache's size by until it has measured its first chunk. By
        default their uncompressed size, which a compressed array's override replaces."""
        skip = len(layout.position_shape)
        return {name: np.dtype(spec.dtype).itemsize * math.prod(spec.shape[skip:]) for name, spec in self.arrays(layout).items()}

    def encode(self, rounded: torch.Tensor, layout: Shape, padding: torch.Tensor | None,
               scratch: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
               first_position: int = 0) -> dict[str, torch.Tensor]:
        """The stored rows for a batch of teacher logits / T already rounded to the cache dtype,
        with zeros at the token positions where `padding` is set. `scratch`, when given, is a
        float32 tensor of the same shape that the kind may overwrite (the caller's no longer
        needed logits / T): using it saves allocating (and page-faulting) one of that size.
        `row_index` (B,) int64, the rows' dataset indices, and `first_position`, that of the
        batch's first position (token or view), say where the rows are, for a kind whose values
        depend on it (sampled: its draws)."""
        raise NotImplementedError

    def probabilities(self, rows: Rows, num_classes: int, ratio: float) -> np.ndarray:
        """The teacher's probabilities at T' = T_cache / ratio over the kind's support (float64),
        from stored rows: every class, or the kept classes and the tail."""
        raise NotImplementedError

    def support(self, rows: Rows) -> np.ndarray | None:
        """The classes of `probabilities`' entries (..., K), or None for every class in order."""
        return None

    def confidence(self, probabilities: np.ndarray) -> np.ndarray:
        """The teacher's largest probability of a class, from `probabilities`."""
        return probabilities.max(-1)

    def label_probabilities(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """The probability of each label, when the kind knows it exactly (else None)."""
        return None

    def top1(self, rows: Rows) -> np.ndarray:
        """The teacher's most probable class of every stored row (..., without the last axis)."""
        raise NotImplementedError

    def label_nll(self, soft: dict[str, torch.Tensor], labels: torch.Tensor, temperature: float) -> float | None:
        """The summed NLL of `labels` under the teacher at T=1 (soft: (M, ...) rows), when the kind can tell."""
        return None

    def check_temperature(self, temperature: float, cache_temperature: float) -> None:
        """Raise an InputError when its rows cannot train at `temperature` (a cache at `cache_temperature`)."""

    def check_divergence(self, divergence: str) -> None:
        """Raise an InputError when it cannot train with `divergence` (a name of stages.divergences)."""
        if self.supported_divergences is not None and divergences.parse(divergence).name not in self.supported_divergences:
            raise InputError(f"a {self.name} cache gives an unbiased estimate of {' and '.join(self.supported_divergences)} only, "
                             f"not of `divergence` {divergence}: cache the teacher as dense, topk or qtopk for it")

    def support_log_probs(self, student_over_t: torch.Tensor, soft: dict[str, torch.Tensor], *, ratio: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's and the student's log-probabilities over the kind's support, (M, S) each:
        the teacher's at T = T_cache / ratio from (M, ...) stored rows, the student's from its
        (M, C) logits / T collapsed onto the same outcomes (every class, or the kept classes and
        one tail bucket). Kinds that give no distribution (sampled) override `soft_terms` instead."""
        raise NotImplementedError

    def soft_terms(self, student_over_t: torch.Tensor, soft: dict[str, torch.Tensor], divergence: divergences.Divergence,
                   *, ratio: float, cache_temperature: float) -> torch.Tensor:
        """The divergence of the student from the teacher per row, (M,), before the T^2 factor."""
        teacher, student = self.support_log_probs(student_over_t, soft, ratio=ratio)
        return divergence(teacher, student)

    def loss(self, student_logits: torch.Tensor, soft: dict[str, torch.Tensor], labels: torch.Tensor | None, *,
             alpha: float, temperature: float, cache_temperature: float, divergence: str = divergences.DEFAULT) -> Loss:
        """The distillation loss of (M, C) student logits on (M, ...) rows of soft labels at
        temperature T (re-tempered from the cache's) by `divergence`, mixed with the hard labels
        by alpha (stages.losses.soft_target_loss: the one place every kind and divergence meet)."""
        return losses.soft_target_loss(self, student_logits, soft, labels, alpha=alpha, temperature=temperature,
                                       cache_temperature=cache_temperature, divergence=divergence)

    def row_problem(self, rows: Rows, layout: Shape) -> str | None:
        """The meaning check of its values in `rows` (the arrays present, from one chunk or
        several): what its encoder cannot have written, beyond the non-finite floats
        stages.cache.format checks, as a phrase that names the array, or None. Vectorised: the
        reader runs it on a chunk's first read in a process, verify on every write unit (rows
        about to train are checked again, more cheaply, by `loss_problems`). This base checks a
        token cache's padding."""
        return padding_problem(rows, layout, self.soft_arrays)

    def loss_problems(self, soft: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
        """What in rows about to train ((M, ...) tensors of valid positions, on the loss's device)
        would make the loss NaN, an IndexError or of a sign no teacher gives: a bool tensor per
        phrase naming the array, left on the device so that stages.losses.check_soft_rows syncs
        once for them all. The reader checks a chunk's values on its first read only (its
        checksum vouches for the reads after); this catches a chunk rewritten on disk since,
        checksum and all, that a long-lived reader goes on delivering."""
        return {}

    def verify_pairs(self, stored: Rows, fresh_rounded: torch.Tensor, fresh: Rows, padding: np.ndarray | None) -> dict[str, tuple]:
        """Pairs (fresh, stored) to compare besides its float arrays, from the teacher's fresh
        logits / T rounded to the cache dtype and the rows `fresh` encoded from them: what may
        legitimately differ in order is compared by value."""
        return {}

    # Its own figures for `inspect`: per chunk of `statistics_arrays` (out of core, as dask
    # tasks), then summed over the chunks of a complete cache.
    statistics_arrays: tuple[str, ...] = ()

    def chunk_statistics(self, rows: Rows) -> tuple:
        raise NotImplementedError

    def summarise(self, parts: list[tuple]) -> dict:
        raise NotImplementedError

    def combine(self, parts: list[Rows], rule: str, layout: Shape) -> Rows:
        """The soft-label arrays of the ensemble of caches' rows `parts`, by `rule` (kinds that can_combine)."""
        raise NotImplementedError
