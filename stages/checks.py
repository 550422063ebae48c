"""Range checks on option values, shared by the stage configs (stages.config) and the kinds'
options (stages.kinds): one wording for every message, which names the field in backticks so
that the CLI can print its flag instead (pipeline.config.in_flags). Imports nothing heavy."""

from __future__ import annotations

import math

from stages.errors import InputError

# Counts (rows per batch or chunk, epochs, views, workers, ...) end up as C ints in torch, zarr
# and the OS: a larger value is a typo, and it failed deep inside with an internal error (a
# `batch_size` of 2**70 did) instead of here.
MAX_COUNT = 2**31 - 1


def check_positive(field: str, value: float, high: float = math.inf) -> None:
    """`value` is a finite number above 0 (and at most `high`), else an InputError naming `field`."""
    if not (0 < value <= high and math.isfinite(value)):
        bound = "" if high == math.inf else f" up to {high:g}"
        raise InputError(f"`{field}` must be a positive number{bound}, got {value}")


def check_range(field: str, value: float, low: float, high: float = MAX_COUNT) -> None:
    """`value` is a finite number in [low, high], else an InputError naming `field`."""
    if low <= value <= high and math.isfinite(value):
        return
    if value > high:
        bound = f"at most {high}"
    elif high >= MAX_COUNT:  # no upper bound a user would aim at
        bound = f"{low} or more"
    else:
        bound = f"between {low} and {high}"
    raise InputError(f"`{field}` must be {'a finite number, ' if not math.isfinite(value) else ''}{bound}, got {value}")
