"""One grammar for model and dataset specs: a spec string becomes a typed spec (`parse_spec`),
which knows its files (`absolute`), its short name (`slug`) and whether it names the user's
code. Also the whole-number parameters of a parametric built-in (`name:key=value,...`), loading
the user's own code named by a `module:factory` or `path/to/file.py:factory` spec, and the
default names of what the commands write (teachers, caches, runs, plots), made from specs.

This is the one place where user code is imported, and only code the user named. It imports
no torch: the CLI parses specs and builds its help from here when it starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import stages.kinds
from stages import storage
from stages.divergences import DEFAULT as DEFAULT_DIVERGENCE
from stages.errors import InputError
from stages.storage import CacheLocation

if TYPE_CHECKING:  # stages.augment loads torch, which the CLI must not pay for at start-up (pipeline.cli)
    from stages.augment import Augmentation


def path_and_options(kind: str, args: str, defaults: dict[str, str | None]) -> tuple[str, dict[str, str | None]]:
    """A tokenized dataset's `PATH,key=value,...` (what follows `text:` or `corpus:`) -> (PATH,
    its options over `defaults`); PATH and a tokenizer are required."""
    path, *items = args.split(",")
    options = dict(defaults)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in options:
            raise InputError(f"dataset spec {kind}:{args}: bad option {item!r}; options are {', '.join(options)}")
        options[key] = value
    if not path:
        raise InputError(f"dataset spec {kind}:PATH,...: PATH is missing")
    if not options.get("tokenizer"):
        raise InputError(f"dataset spec {kind}:{args}: name its tokenizer, e.g. tokenizer=hf:path/to/tokenizer-folder")
    return path, options


def whole_number_parameters(what: str, name: str, args: str, defaults: dict[str, int], maximum: dict[str, int]) -> dict[str, int]:
    """The `key=value,...` parameters of the built-in `name`, over its defaults; each value a
    whole number no larger than its `maximum` (a size past any real use would be allocated
    before anything else could fail: vocab=4000000000 asked for 256 GB). Lower bounds are the caller's."""
    params = dict(defaults)
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            example = ",".join(f"{k}={v}" for k, v in defaults.items())
            raise InputError(f"{what} spec {name}:{args}: bad parameter {item!r}; parameters are {', '.join(params)}, as in {name}:{example}")
        try:
            params[key] = int(value)
        except ValueError:
            raise InputError(f"{what} spec {name}:{args}: {key} must be a whole number, got {value!r}") from None
        if params[key] > maximum[key]:
            raise InputError(f"{what} spec {name}:{args}: {key} must be at most {maximum[key]:,}, got {params[key]:,}")
    return params


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in by name (`cnn`, `mnist-5k`), with `key=value,...` parameters after a colon for
    a parametric one (`mlp:width=64`, `synthetic:n=100`); `args` is None without a colon."""

    name: str
    args: str | None = None

    def __str__(self) -> str:
        return self.name if self.args is None else f"{self.name}:{self.args}"

    def absolute(self) -> BuiltinSpec:
        return self

    def slug(self) -> str:
        return _safe(str(self))


@dataclass(frozen=True)
class FileSpec:
    """A file or folder: `hf:FOLDER`, `torchscript:FILE`, `export:FILE`, `text:PATH,key=value,...`,
    `corpus:PATH,key=value,...` (a kind, then the path), or a data file named by its suffix
    (`path/to/file.npz`, kind npz)."""

    kind: str
    path: str
    options: tuple[str, ...] = ()  # the key=value options of a kind in OPTION_KINDS

    def __str__(self) -> str:
        if self.kind in FILE_SUFFIXES.values():
            return self.path
        return f"{self.kind}:{','.join((self.path, *self.options))}"

    def absolute(self) -> FileSpec:
        options = tuple(f"tokenizer={parse_spec(o.partition('=')[2]).absolute()}" if o.startswith("tokenizer=") else o
                        for o in self.options)
        return FileSpec(self.kind, str(Path(self.path).absolute()), options)

    def slug(self) -> str:
        stem = Path(self.path).stem
        return _safe(stem if self.kind in FILE_SUFFIXES.values() else f"{self.kind}-{stem}")

    def option(self, key: str) -> str | None:
        return next((o.partition("=")[2] for o in self.options if o.partition("=")[0] == key), None)


@dataclass(frozen=True)
class FactorySpec:
    """The user's code: `package.module:factory` or `path/to/file.py:factory`."""

    target: str
    name: str

    def __str__(self) -> str:
        return f"{self.target}:{self.name}"

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py")

    def absolute(self) -> FactorySpec:
        return FactorySpec(str(Path(self.target).absolute()), self.name) if self.is_file else self

    def slug(self) -> str:
        return _safe(Path(self.target).stem if self.is_file else str(self))


Spec = BuiltinSpec | FileSpec | FactorySpec
# Specs that name a file or folder after their kind (FileSpec); those of OPTION_KINDS have
# key=value options after it, split on commas.
PATH_KINDS = ("hf", "torchscript", "export", "text", "corpus", "chat", "tokens")
OPTION_KINDS = ("text", "corpus", "chat", "tokens")
# Data files named by their suffix alone, and the kind each is.
FILE_SUFFIXES = {".npz": "npz"}
# Each form, as help text and errors name it.
MODEL_FORMS = ("hf:FOLDER", "torchscript:FILE", "export:FILE", "package.module:factory", "path/to/file.py:factory")
DATASET_FORMS = ("a .npz file", "package.module:factory", "path/to/file.py:factory")
# The built-in datasets as the CLI's help shows them: the registry (pipeline.datasets) loads
# torch, which the CLI must not pay for at start-up; a test holds the two the same.
DATASET_BUILTINS_HELP = ("mnist-5k", "digits", "synthetic[:k=v,..]", "stdlib-bytes[:k=v,..]", "text:PATH,tokenizer=hf:FOLDER",
                         "corpus:PATH,tokenizer=hf:FOLDER,seq=N", "chat:PATH,tokenizer=hf:FOLDER,seq=N (via pipeline tokenize)",
                         "tokens:DIR[,rows=A:B]")


def either(forms: Collection[str]) -> str:
    """`a, b or c`, for help and errors."""
    *first, last = forms
    return f"{', '.join(first)} or {last}" if first else last


MODEL_HELP = (f"Model spec: a built-in name or parametric built-in (mlp:width=W, gpt2:layers=N,dim=D,heads=H,vocab=V), "
              f"{either(MODEL_FORMS)} (a causal LM folder gives logits per token).")
DATASET_HELP = f"Dataset spec: {either((*DATASET_BUILTINS_HELP, *DATASET_FORMS))}."


def parse_spec(spec: str, parametric: Collection[str] = ()) -> Spec:
    """The typed form of a model or dataset spec string. `parametric` names the built-ins that
    take `key=value` parameters, for a `name:...` that would otherwise read as `module:factory`.
    Whether a built-in name exists is the resolver's to say (pipeline.models, pipeline.datasets)."""
    kind, colon, rest = spec.partition(":")
    if kind in PATH_KINDS and colon:
        path, *options = rest.split(",") if kind in OPTION_KINDS else (rest,)
        return FileSpec(kind, path, tuple(options))
    # A data file by its suffix, or any file that exists: a colon in its path (data:v2.npz,
    # /runs/a:b/set) must not make it read as module:factory, which would import code.
    suffix = next((s for s in FILE_SUFFIXES if spec.lower().endswith(s)), None)
    if suffix is not None or (colon and Path(spec).is_file()):
        return FileSpec(FILE_SUFFIXES.get(suffix, "npz"), spec)
    if not colon:
        return BuiltinSpec(spec)
    target, _, name = spec.rpartition(":")
    if kind not in parametric and target and name.isidentifier():
        return FactorySpec(target, name)
    return BuiltinSpec(kind, rest)


def runs_user_code(spec: str, parametric: Collection[str] = ()) -> bool:
    """Whether a spec imports and calls the user's code (a factory), rather than building a
    built-in or reading a file; an augmentation spec does when one of its `+` parts does."""
    return any(isinstance(parse_spec(part, parametric), FactorySpec) for part in spec.split("+"))


def slug(spec: str) -> str:
    """A file-name-safe short name for a spec: a file's stem, or the spec with its parameters."""
    return parse_spec(spec).slug()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "-" for c in name).strip("-")


# Default output names: everything a command writes when no path is given is named here, from
# what makes it differ, so that two different outputs never share a name.
def teacher_file_name(model: str, dataset: str) -> str:
    return f"{slug(model)}-{slug(dataset)}.safetensors"


def cache_file_name(teacher: str, dataset: str, split: str, temperature: float, format: str = "dense",
                    kind_options: dict | None = None) -> str:
    """The kind and its options (stages.kinds) name themselves: -top8, -qtop8-4bit, -sampled12-seed0."""
    kept = stages.kinds.kind_options(format, kind_options).suffix(format)
    return f"{slug(teacher)}-{slug(dataset)}-{split}-T{temperature:g}{kept}.zarr"


def cache_stem(cache: CacheLocation) -> str:
    """A cache's name without .zarr, for what is named after it (runs, plots)."""
    return storage.name(cache).removesuffix(".zarr")


def run_folder_name(student: str, seed: int, *, cache: CacheLocation | None = None, alpha: float | None = None,
                    temperature: float | None = None, dataset: str | None = None, divergence: str = DEFAULT_DIVERGENCE) -> str:
    """STUDENT-kd-CACHE-aALPHA-TT[-DIVERGENCE]-sSEED for a run distilled from `cache` (at
    `temperature`, the cache's own T unless another was asked for; the divergence named unless it
    is forward KL), STUDENT-scratch-DATASET-sSEED for one on hard labels: runs from other caches,
    alphas, temperatures, divergences or datasets never collide."""
    if cache is None:
        return f"{slug(student)}-scratch-{slug(dataset)}-s{seed}"
    return f"{slug(student)}-kd-{slug(cache_stem(cache))}-a{alpha:g}-T{temperature:g}{_divergence_part(divergence)}-s{seed}"


def sweep_run_name(student: str, seed: int, alpha: float | None = None, temperature: float | None = None,
                   divergence: str = DEFAULT_DIVERGENCE) -> str:
    """A run's folder inside its sweep's, which names the cache and dataset: STUDENT-aALPHA-TT[-DIVERGENCE]-sSEED,
    or STUDENT-scratch-sSEED on hard labels (alpha None)."""
    if alpha is None:
        return f"{slug(student)}-scratch-s{seed}"
    return f"{slug(student)}-a{alpha:g}-T{temperature:g}{_divergence_part(divergence)}-s{seed}"


def _divergence_part(divergence: str) -> str:
    # Forward KL, the default, adds nothing: the names of runs made before the choice existed stay.
    return "" if divergence == DEFAULT_DIVERGENCE else f"-{_safe(divergence)}"


def resolve_augment(spec: str) -> Augmentation | None:
    """The augmentation named by `spec`: built-ins (stages.augment), and parts naming the user's
    own transform as `package.module:factory` or `path/to/file.py:factory`, joined by `+`. A
    factory is called without arguments and returns `transform(sample, rng) -> sample`, which must
    draw its randomness from `rng` only (so that a view replays exactly)."""
    from stages.augment import parse_augment

    user = {}
    for part in spec.split("+"):
        if isinstance(factory := parse_spec(part), FactorySpec):
            try:
                transform = load_factory(factory, "augment")()
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"augment factory {part!r} failed: {type(exc).__name__}: {exc}") from exc
            if not callable(transform):
                raise InputError(f"augment factory {part!r} returned {type(transform).__name__}, not a callable transform")
            user[part] = transform
    return parse_augment(spec, user)


def load_factory(spec: FactorySpec, what: str) -> Callable:
    """The callable named by `package.module:factory` or `path/to/file.py:factory`."""
    target, name = spec.target, spec.name
    if spec.is_file:
        module = _import_file(Path(target), what)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise InputError(f"{what} spec {spec!r}: module {exc.name!r} not found") from exc
        except Exception as exc:
            raise InputError(f"{what} spec {spec!r}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"{what} spec {spec!r}: {target} has no callable {name!r}")
    return factory


def _import_file(path: Path, what: str):
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    # A name derived from the full path, so two user files with one stem do not collide.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise InputError(f"{what} file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module
