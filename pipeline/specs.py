"""Reading specs: the whole-number parameters of a parametric built-in (`name:key=value,...`),
loading the user's own code named by a `module:factory` or `path/to/file.py:factory` spec, and
the default names of what the commands write (teachers, caches, runs, plots), made from specs.

This is the one place where user code is imported, and only code the user named.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stages import storage
from stages.errors import InputError
from stages.storage import CacheLocation

if TYPE_CHECKING:  # stages.augment loads torch, which the CLI must not pay for at start-up (pipeline.cli)
    from stages.augment import Augmentation


def whole_number_parameters(what: str, name: str, args: str, defaults: dict[str, int]) -> dict[str, int]:
    """The `key=value,...` parameters of the built-in `name`, over its defaults; each value a
    whole number. Range checks are the caller's."""
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
    return params


# Specs that name a file or folder after their kind: their slug is that file's or folder's name.
PATH_SPECS = ("hf", "torchscript", "export", "text")


def slug(spec: str) -> str:
    """A file-name-safe short name for a spec: a file's stem, or the spec with its parameters."""
    kind, _, rest = spec.partition(":")
    target = spec.rpartition(":")[0] if ":" in spec else spec
    if kind in PATH_SPECS:
        spec = f"{kind}-{Path(rest.split(',')[0]).stem}"
    elif target.endswith(".py") or spec.endswith(".npz"):
        spec = Path(target if target.endswith(".py") else spec).stem
    return "".join(c if c.isalnum() or c in "._" else "-" for c in spec).strip("-")


# Default output names: everything a command writes when no path is given is named here, from
# what makes it differ, so that two different outputs never share a name.
def teacher_file_name(model: str, dataset: str) -> str:
    return f"{slug(model)}-{slug(dataset)}.safetensors"


def cache_file_name(teacher: str, dataset: str, split: str, temperature: float, top_k: int | None) -> str:
    kept = f"-top{top_k}" if top_k is not None else ""
    return f"{slug(teacher)}-{slug(dataset)}-{split}-T{temperature:g}{kept}.zarr"


def cache_stem(cache: CacheLocation) -> str:
    """A cache's name without .zarr, for what is named after it (runs, plots)."""
    return storage.name(cache).removesuffix(".zarr")


def run_folder_name(student: str, seed: int, *, cache: CacheLocation | None = None, alpha: float | None = None,
                    temperature: float | None = None, dataset: str | None = None) -> str:
    """STUDENT-kd-CACHE-aALPHA-TT-sSEED for a run distilled from `cache` (at `temperature`, the
    cache's own T unless another was asked for), STUDENT-scratch-DATASET-sSEED for one on hard
    labels: runs from other caches, alphas, temperatures or datasets never collide."""
    if cache is None:
        return f"{slug(student)}-scratch-{slug(dataset)}-s{seed}"
    return f"{slug(student)}-kd-{slug(cache_stem(cache))}-a{alpha:g}-T{temperature:g}-s{seed}"


def resolve_augment(spec: str) -> Augmentation | None:
    """The augmentation named by `spec`: built-ins (stages.augment), and parts naming the user's
    own transform as `package.module:factory` or `path/to/file.py:factory`, joined by `+`. A
    factory is called without arguments and returns `transform(sample, rng) -> sample`, which must
    draw its randomness from `rng` only (so that a view replays exactly)."""
    from stages.augment import parse_augment

    user = {}
    for part in spec.split("+"):
        if is_factory_spec(part):
            try:
                transform = load_factory(part, "augment")()
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"augment factory {part!r} failed: {type(exc).__name__}: {exc}") from exc
            if not callable(transform):
                raise InputError(f"augment factory {part!r} returned {type(transform).__name__}, not a callable transform")
            user[part] = transform
    return parse_augment(spec, user)


def is_factory_spec(spec: str) -> bool:
    target, sep, name = spec.rpartition(":")
    return bool(sep and target and name.isidentifier())


def load_factory(spec: str, what: str) -> Callable:
    """The callable named by `package.module:factory` or `path/to/file.py:factory`."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
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
