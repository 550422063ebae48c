"""Cache kinds: what a cache stores per row of soft labels, and everything that depends on it.

A kind is one module here and one line in `KINDS` (stages.kinds.base says what it owns). The
format, the writer, the reader, the stages and the CLI ask the kind and never branch on which
one it is.

    dense    every class's logit / T: exact at any temperature
    topk     the K largest logits / T, their classes and the whole row's log-sum-exp: exact
             probabilities of the kept classes and the tail's total mass at the cache's T
    qtopk    the same K classes delta-coded, their probabilities in value_bits-bit codes and the
             tail's mass: a fraction of topk's bytes, the quantisation's error measured as written
    sampled  S classes drawn from softmax(logits / T), kept as the distinct ids and their
             counts, and the row's entropy: an unbiased estimate of the dense loss, at the cache's T only
    headtail the K most probable classes as qtopk keeps them, S classes drawn from the rest (the
             tail renormalised) as sampled keeps its draws, and the tail's entropy: the head's
             loss exact, the tail's estimated, an unbiased estimate of the dense loss at the cache's T only
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import NamedTuple

from stages.errors import InputError
from stages.kinds.base import ArraySpec, Kind, KindOptions, Rows, index_dtype
from stages.kinds.dense import Dense
from stages.kinds.headtail import HeadTail
from stages.kinds.qtopk import QuantisedTopK
from stages.kinds.sampled import Sampled
from stages.kinds.topk import TopK

__all__ = ["KINDS", "ArraySpec", "Kind", "KindOptions", "Rows", "index_dtype", "kind_options", "option_fields"]

# The kinds this tool writes and reads, by the name caches record in their `kind` attribute.
KINDS: dict[str, Kind] = {"dense": Dense(), "topk": TopK(), "qtopk": QuantisedTopK(), "sampled": Sampled(),
                          "headtail": HeadTail()}


class OptionField(NamedTuple):
    """One option of one or more kinds, as a command-line flag shows it."""

    type: type  # of a value given (int, for every option so far)
    default: object  # None: the option must be given with its kinds
    help: str
    kinds: tuple[str, ...]  # the kinds that take it


def option_fields() -> dict[str, OptionField]:
    """Every kind's options by name, each with its type, default and help (as its first kind
    declares it) and the kinds that take it: what cache-teacher's flags are generated from."""
    found: dict[str, OptionField] = {}
    for name, kind in KINDS.items():
        types = typing.get_type_hints(kind.Options)
        for field in dataclasses.fields(kind.Options):
            given = next(t for t in typing.get_args(types[field.name]) or (types[field.name],) if t is not type(None))
            declared = found.get(field.name, OptionField(given, field.default, field.metadata["help"], ()))
            found[field.name] = declared._replace(kinds=(*declared.kinds, name))
    return found


def kind_options(kind: str, given: Mapping[str, object] | KindOptions | None = None) -> KindOptions:
    """The options of `kind` from the values `given` for some of them (the rest at their
    defaults), checked: an option of another kind, a missing one or one out of range is an
    InputError naming it."""
    if kind not in KINDS:
        raise InputError(f"`format` must be one of {', '.join(KINDS)}, got {kind!r}")
    options_type = KINDS[kind].Options
    if isinstance(given, KindOptions):
        if not isinstance(given, options_type):
            raise InputError(f"`format` {kind} takes {options_type.__name__}, got {type(given).__name__}")
        options = given
    else:
        given = {name: value for name, value in (given or {}).items() if value is not None}
        own = {field.name for field in dataclasses.fields(options_type)}
        for name in sorted(set(given) - own):
            takers = option_fields()[name].kinds if name in option_fields() else ()
            if not takers:
                raise InputError(f"`format` {kind} has no option `{name}`")
            raise InputError(f"`{name}` goes with `format` {' or '.join(takers)}, not {kind}")
        options = options_type(**given)
    options.check(kind)
    return options
