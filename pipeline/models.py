"""Built-in architectures and resolving a model spec into an `nn.Module`.

A model spec is a built-in name (see BUILTIN_MODELS), `mlp:width=W,depth=D`, `package.module:factory` or
`path/to/file.py:factory`. A factory is called with `num_classes` (and `input_shape`, the
shape of one input without the batch axis, when its signature accepts it) and returns an
`nn.Module` whose output is (batch, num_classes) logits.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path

from torch import nn

from pipeline.specs import is_factory_spec, load_factory
from stages.errors import InputError
from stages.weights import load_weights


def build_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A two-conv CNN teacher for small images (C, H, W): conv32-pool-conv64-pool-fc128."""
    if len(input_shape) != 3:
        raise InputError(f"model 'cnn' needs image inputs (channels, height, width), got shape {tuple(input_shape)}")
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, num_classes),
    )


def build_mlp(num_classes: int, input_shape: tuple[int, ...], width: int, depth: int = 2) -> nn.Module:
    """A fully connected student: `depth` hidden ReLU layers of `width` units over flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


BUILTIN_MODELS = {
    "cnn": build_cnn,
    "mlp-64": partial(build_mlp, width=64),
    "mlp-128": partial(build_mlp, width=128),
    "mlp-400": partial(build_mlp, width=400),
    "mlp-800": partial(build_mlp, width=800),
    "linear": partial(build_mlp, width=0, depth=0),
}
MLP_PARAMETERS = ("width", "depth")


def _mlp_from_args(args: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """`mlp:width=W,depth=D`: any width and number of hidden layers (for sweeps and benchmarks)."""
    params = {"width": 256, "depth": 2}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        if key not in MLP_PARAMETERS or not value.isdigit() or int(value) < 1:
            raise InputError(f"model spec mlp:{args}: parameters are width and depth, whole numbers >= 1, as in mlp:width=256,depth=2")
        params[key] = int(value)
    return build_mlp(num_classes, input_shape, **params)


def resolve_model(spec: str, *, num_classes: int, input_shape: tuple[int, ...], weights: Path | None = None) -> nn.Module:
    """Build the model named by `spec` for `num_classes` classes, loading `weights` if given."""
    if spec in BUILTIN_MODELS:
        model = BUILTIN_MODELS[spec](num_classes, tuple(input_shape))
    elif spec.startswith("mlp:"):
        model = _mlp_from_args(spec[len("mlp:"):], num_classes, tuple(input_shape))
    elif is_factory_spec(spec):
        factory = load_factory(spec, "model")
        kwargs = {"num_classes": num_classes}
        if "input_shape" in _parameters(factory):
            kwargs["input_shape"] = tuple(input_shape)
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise InputError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise InputError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise InputError(
            f"unknown model spec {spec!r}; use a built-in ({', '.join(BUILTIN_MODELS)}, mlp:width=W,depth=D), "
            "package.module:factory or path/to/file.py:factory"
        )
    if weights is not None:
        load_weights(model, weights)
    return model


def _parameters(factory) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
