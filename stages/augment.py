"""Input augmentations named by a spec, each replayable exactly from one seed per sample.

    none          no augmentation
    shift:N       move the image by a random whole number of pixels in [-N, N] along each axis,
                  filling with zeros (a random crop of the zero-padded image)
    rotate:D      rotate the image by a random angle in [-D, D] degrees about its centre
                  (bilinear, zero fill)
    flip          mirror the image left-right with probability 1/2 (only where that keeps the
                  label: not for digits)
    A+B           A, then B: shift:2+rotate:10
Images are (C, H, W) or (H, W) per sample. Users name their own with `module:factory` (resolved by
the application, which imports only code the user named): the factory returns a `Transform`.

An augmentation is applied as `augment(x, seeds)`: sample i is transformed with parameters drawn
from `np.random.default_rng(seeds[i])` only, so the same seed always gives the same pixels, bit
for bit. That is what lets a cache of augmented views replay, in student training, exactly the
input the teacher saw (stages.cache_teacher, `views`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from stages.data import splitmix64
from stages.errors import InputError

# transform(sample, rng) -> augmented sample: one sample, its parameters drawn from rng only.
Transform = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]
BUILTINS = "none, shift:N, rotate:D, flip, or several joined by + (shift:2+rotate:10)"


class Augmentation:
    """A pipeline of transforms applied to each sample of a batch with its own seed."""

    def __init__(self, spec: str, steps: list[Transform]):
        self.spec = spec
        self.steps = steps

    def __call__(self, x: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        return torch.stack([self.one(x[i], int(seed)) for i, seed in enumerate(seeds)])

    def one(self, sample: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        for step in self.steps:
            sample = step(sample, rng)
        return sample


def parse_augment(spec: str, user_transforms: dict[str, Transform] | None = None) -> Augmentation | None:
    """The augmentation named by `spec`, or None for 'none'. `user_transforms` holds the
    transforms of its `module:factory` parts, already resolved by the caller."""
    if spec == "none":
        return None
    return Augmentation(spec, [_step(part, spec, user_transforms or {}) for part in spec.split("+")])


def resolved(spec: str, given: Augmentation | None) -> Augmentation | None:
    """The augmentation `spec` names: `given` when a caller resolved it (user code is resolved
    where the user named it, pipeline.jobs), which must be that spec's, since the spec is what a
    cache or run folder records of it; else the built-in one."""
    if given is None:
        return parse_augment(spec)
    if given.spec != spec:
        raise InputError(f"the augmentation given is {given.spec!r} but the spec recorded is {spec!r}")
    return given


def _step(part: str, spec: str, user_transforms: dict[str, Transform]) -> Transform:
    if part in user_transforms:
        return user_transforms[part]
    name, _, arg = part.partition(":")
    if name == "flip" and not arg:
        return _flip
    if name in ("shift", "rotate"):
        try:
            amount = float(arg) if name == "rotate" else int(arg)
        except ValueError:
            amount = -1
        if not (amount > 0 and math.isfinite(amount)):
            example = "shift:2" if name == "shift" else "rotate:10"
            raise InputError(f"augment spec {spec!r}: {name} needs a {'whole ' if name == 'shift' else ''}number > 0, as in {example}")
        return (lambda x, rng: _shift(x, amount, rng)) if name == "shift" else (lambda x, rng: _rotate(x, amount, rng))
    raise InputError(f"unknown augment spec {spec!r}; known: {BUILTINS}, or package.module:factory")


def _as_image(x: torch.Tensor) -> torch.Tensor:
    if x.ndim not in (2, 3) or not x.is_floating_point():
        raise InputError(f"image augmentations need float images (C, H, W) or (H, W) per sample, got {str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}")
    return x


def _shift(x: torch.Tensor, pixels: int, rng: np.random.Generator) -> torch.Tensor:
    x = _as_image(x)
    dy, dx = (int(v) for v in rng.integers(-pixels, pixels + 1, size=2))
    height, width = x.shape[-2:]
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    return padded[..., pixels + dy : pixels + dy + height, pixels + dx : pixels + dx + width]


def _rotate(x: torch.Tensor, degrees: float, rng: np.random.Generator) -> torch.Tensor:
    x = _as_image(x)
    angle = math.radians(float(rng.uniform(-degrees, degrees)))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=x.dtype)
    image = x.reshape(1, -1, *x.shape[-2:])
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(x.shape)


def _flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    x = _as_image(x)
    return x.flip(-1) if rng.random() < 0.5 else x


def view_seeds(base_seed: int, index: np.ndarray, views: int) -> np.ndarray:
    """The seed of every view of every sample, (len(index), views) uint64: a hash of
    (base seed, dataset index, view number), so any row's views can be regenerated alone."""
    counters = np.asarray(index, dtype=np.uint64)[:, None] * np.uint64(views) + np.arange(views, dtype=np.uint64)
    return splitmix64(counters ^ splitmix64(np.uint64(base_seed)))
