"""Saving, loading and identifying model weights, safely.

Weights are written as safetensors. They are read from safetensors or from a plain PyTorch
state dict loaded with `weights_only=True`: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import pickle  # only for its exception type: nothing here unpickles
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stages.errors import InputError


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the model's state dict as safetensors, atomically (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial))
    partial.replace(path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file or a `weights_only` PyTorch state dict into `model`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"cannot read weights file {path}: it holds objects other than tensors; refusing to unpickle them") from exc
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"cannot read weights file {path}: {_first_line(exc)}") from exc
    if not isinstance(state, dict):
        raise InputError(f"weights file {path} does not hold a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"weights file {path} does not fit the model: {_first_line(exc)}") from exc


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, dtypes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
