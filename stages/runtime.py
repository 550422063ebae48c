"""Small helpers both stages share: choosing the device and seeding."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from stages.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when there is a GPU; asking for 'cuda' without one is an input error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA GPU is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_dict(config) -> dict:
    """A config dataclass as plain JSON values (paths as strings), for run folders and caches."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
