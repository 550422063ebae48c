"""Input augmentations for training, named by a spec string.

    none        no augmentation
    shift:N     move each image by a random whole number of pixels in [-N, N] along both
                axes, filling with zeros (inputs shaped (B, C, H, W) or (B, H, W))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from stages.errors import InputError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def parse_augment(spec: str) -> Augment | None:
    """The augmentation named by `spec`, or None for 'none'."""
    name, _, arg = spec.partition(":")
    if name == "none" and not arg:
        return None
    if name == "shift":
        try:
            pixels = int(arg)
        except ValueError:
            pixels = -1
        if pixels < 1:
            raise InputError(f"augment spec {spec!r}: shift needs a whole number of pixels >= 1, as in shift:2")
        return lambda x, generator: random_shift(x, pixels, generator)
    raise InputError(f"unknown augment spec {spec!r}; known: none, shift:N")


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of the batch by its own random offset in [-pixels, pixels]^2."""
    if x.ndim not in (3, 4):
        raise InputError(f"shift augmentation needs image inputs (B, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=generator)
    return torch.stack(
        [padded[i, ..., dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets.tolist())]
    )
