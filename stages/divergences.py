"""Divergences between the teacher's distribution p and the student's q, the distillation loss's
second axis beside the kinds of cache (stages.kinds).

A kind gives both distributions over its support (every class; the K kept classes and a tail
bucket; ...) as log-probabilities (..., S); a divergence reduces them to one value per row (...).
Adding one is a class here and one line in `DIVERGENCES`; `--divergence NAME[:PARAMETER]`
picks it (train-student, sweep, stages.kd_loss), and the run records the spelling.

    forward-kl   KL(p || q) = sum p (log p - log q): mass-covering, Hinton et al. (2015)
    reverse-kl   KL(q || p) = sum q (log q - log p): mode-seeking (MiniLLM, Gu et al. 2024)
    jsd[:BETA]   generalized Jensen-Shannon (GKD, Agarwal et al. 2024), TRL's convention:
                 m = BETA p + (1 - BETA) q, JSD = BETA KL(p || m) + (1 - BETA) KL(q || m);
                 BETA 0 is forward KL and BETA 1 reverse KL, taken as such (the mixture's value
                 vanishes at both ends; JSD / BETA tends to forward KL as BETA -> 0 and
                 JSD / (1 - BETA) to reverse KL as BETA -> 1). Default BETA 0.5.
    tv           total variation, sum |p - q| / 2 (bounded, no logarithm of p)

Every one is 0 exactly when q = p. Where the teacher gives an outcome probability 0 (a tail that
rounds to nothing, a masked class), forward KL and the mixture count p log p as 0, and reverse
KL takes log p at float32's smallest normal (FLOOR), not -inf: a finite, steep penalty rather
than an infinite loss and NaN gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.errors import InputError
from stages.lazy import lazy_module

torch = lazy_module("torch")

DEFAULT = "forward-kl"
# log of float32's smallest normal number: where reverse KL takes a teacher log-probability of -inf.
FLOOR = math.log(2.0**-126)


class Divergence:
    """A divergence D(p || q) per row from log-probabilities over the same outcomes (..., S)."""

    name: str

    def __call__(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """How `--divergence` spells this one."""
        return self.name

    @classmethod
    def from_argument(cls, argument: str | None, spec: str) -> Divergence:
        """The divergence for `NAME:ARGUMENT` (`spec`), or `NAME` when `argument` is None."""
        if argument is not None:
            raise InputError(f"`divergence` {cls.name} takes no parameter, got {spec!r}")
        return cls()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; terms with p == 0 count zero. A log-probability of -inf (an empty tail
    bucket) is clamped to the lowest finite float, so that its term is 0 * finite = 0 rather than
    0 * inf = NaN; cheaper than xlogy, which would take the log a second time."""
    return (log_p.exp() * (log_p.clamp(min=torch.finfo(log_p.dtype).min) - log_q)).sum(-1)


class ForwardKL(Divergence):
    """KL(p || q), Hinton et al. (2015), the default"""

    name = "forward-kl"

    def __call__(self, log_p, log_q):
        return _kl(log_p, log_q)


class ReverseKL(Divergence):
    """KL(q || p), mode-seeking"""

    name = "reverse-kl"

    def __call__(self, log_p, log_q):
        return _kl(log_q, log_p.clamp(min=FLOOR))


@dataclass(frozen=True)
class GeneralizedJSD(Divergence):
    """generalized Jensen-Shannon as jsd[:BETA] (TRL's convention: BETA 0 is forward KL, 1 reverse KL; default 0.5)"""

    beta: float = 0.5
    name = "jsd"

    @property
    def spec(self) -> str:
        return f"jsd:{self.beta:g}"

    @classmethod
    def from_argument(cls, argument, spec):
        if argument is None:
            return cls()
        try:
            beta = float(argument)
        except ValueError:
            beta = math.nan
        if not 0.0 <= beta <= 1.0:
            raise InputError(f"`divergence` jsd:BETA takes a BETA between 0 and 1, got {spec!r}")
        return cls(beta)

    def __call__(self, log_p, log_q):
        if self.beta == 0.0:
            return _kl(log_p, log_q)
        if self.beta == 1.0:
            return ReverseKL()(log_p, log_q)
        log_m = torch.logaddexp(log_p + math.log(self.beta), log_q + math.log1p(-self.beta))
        return self.beta * _kl(log_p, log_m) + (1.0 - self.beta) * _kl(log_q, log_m)


class TotalVariation(Divergence):
    """total variation, sum |p - q| / 2"""

    name = "tv"

    def __call__(self, log_p, log_q):
        return (log_p.exp() - log_q.exp()).abs().sum(-1) / 2


# The divergences train-student offers, by the name `--divergence` takes.
DIVERGENCES: dict[str, type[Divergence]] = {
    "forward-kl": ForwardKL, "reverse-kl": ReverseKL, "jsd": GeneralizedJSD, "tv": TotalVariation,
}


def parse(spec: str) -> Divergence:
    """The divergence `NAME` or `NAME:PARAMETER` names, or an InputError listing the names."""
    name, _, argument = spec.partition(":")
    if name not in DIVERGENCES:
        raise InputError(f"`divergence` must be one of {', '.join(DIVERGENCES)} (jsd:BETA for another beta), got {spec!r}")
    return DIVERGENCES[name].from_argument(argument if ":" in spec else None, spec)
