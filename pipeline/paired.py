"""Paired comparisons over seeds: the statistics every quality claim of the demos and the sweep rests on.

Seed s fixes a student's initial weights and its batch order in every arm of a comparison, so
the difference between two arms at one seed has most of the seed's noise cancelled. An arm is
judged by the mean of its per-seed differences from the reference arm, with a 95% t interval:
mean +- t_{0.975, n-1} * sd / sqrt(n) (n seeds; sd the sample standard deviation of the
differences). A claim is printed only when the interval decides it; otherwise it is "not
resolved at n seeds".

The t quantile is computed here, without scipy: the t distribution's CDF for an integer number
of degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3-4), inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` (a positive integer) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # A&S 26.7.3: P(|T| < t) = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term = series = 1.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        within = 2 / math.pi * (theta + (sin * math.cos(theta) * series if df > 1 else 0.0))
    else:  # A&S 26.7.4: P(|T| < t) = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term = series = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        within = sin * series
    return 0.5 + math.copysign(within / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t value below which a fraction `p` of Student's t with `df` degrees of freedom lies."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):  # bisection to the last bits of a float
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Paired:
    """An arm against the reference arm over the seeds both ran: its difference at each seed
    (arm - reference, or arm / reference - 1 when relative), their mean and 95% t interval
    (None with fewer than two seeds)."""

    arm: str
    reference: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    relative: bool = False

    def as_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds), "differences": list(self.differences), "confidence": CONFIDENCE}


def paired(arm: str, values: Mapping[int, float], reference: str, reference_values: Mapping[int, float], *,
           relative: bool = False) -> Paired:
    """`arm`'s figures by seed against `reference`'s, over the seeds both have."""
    seeds = tuple(sorted(set(values) & set(reference_values)))
    if not seeds:
        raise ValueError(f"{arm} and {reference} share no seed")
    differences = tuple(values[s] / reference_values[s] - 1 if relative else values[s] - reference_values[s] for s in seeds)
    mean = statistics.fmean(differences)
    if len(seeds) < 2:
        return Paired(arm, reference, seeds, differences, mean, None, None, None, relative)
    sd = statistics.stdev(differences)
    half = t_quantile(0.5 + CONFIDENCE / 2, len(seeds) - 1) * sd / math.sqrt(len(seeds))
    return Paired(arm, reference, seeds, differences, mean, sd, mean - half, mean + half, relative)


def verdict(comparison: Paired, *, below: str, above: str, margin: float = 0.0) -> str:
    """What the interval says about the difference against `margin`: `below` when it lies
    wholly below, `above` when wholly above, else "not resolved at n seeds"."""
    if comparison.high is not None and comparison.high < margin:
        return below
    if comparison.low is not None and comparison.low > margin:
        return above
    n = len(comparison.seeds)
    return f"not resolved at {n} seed{'s' if n != 1 else ''}"


def resolved(text: str) -> bool:
    """Whether a verdict decided its claim."""
    return not text.startswith("not resolved")


def interval_text(comparison: Mapping, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """"-1.23 [-2.00, -0.46]": a comparison's mean difference and its interval (a Paired's
    as_dict(), as reports hold it), times `scale` (100 for %)."""
    def number(x: float) -> str:
        return f"{x * scale:+.{digits}f}{unit}"
    if comparison["low"] is None:
        return f"{number(comparison['mean'])} (one seed: no interval)"
    return f"{number(comparison['mean'])} [{number(comparison['low'])}, {number(comparison['high'])}]"
