"""Saving, loading and identifying model weights, safely.

Weights are written as safetensors. They are read from safetensors or from a plain PyTorch
state dict loaded with `weights_only=True`: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import pickle  # only for its exception type: nothing here unpickles
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from stages.errors import InputError, PipelineError
from stages.storage import write_atomically


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the model's state dict, atomically (a crash leaves no half file): safetensors for a
    .safetensors path, otherwise a plain PyTorch state dict (readable with weights_only=True)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory (tied input and output embeddings, as in
    # GPT-2): each name gets its own copy, and loading ties them again through the model.
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            state[name] = tensor.clone()
        seen.add(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save(state) if path.suffix == ".safetensors" else serialised(state))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise PipelineError(f"cannot write weights {path}: {_first_line(exc)}") from exc


def serialised(state: dict) -> bytes:
    """`torch.save` of `state` (tensors and plain values only, so weights_only=True reads it back), as bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


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
    except Exception as exc:  # a file of another format fails in many ways inside the readers
        raise InputError(f"cannot read weights file {path}: not safetensors or a PyTorch state dict ({_first_line(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    problems = _fit_problems(model.state_dict(), state)
    if problems:
        raise InputError(f"weights file {path} does not fit the model: {problems}")
    model.load_state_dict(state)


def _fit_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What stops `state` from loading into a model with state dict `expected`, in one line."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
    return "; ".join(parts)


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
