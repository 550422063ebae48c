"""Small helpers both stages share: choosing the device and seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import random
import resource
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from threadpoolctl import ThreadpoolController

from stages.config import AMP_MODES
from stages.data import Split, inputs_at
from stages.errors import InputError, PipelineError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# Set by torchrun (torch.distributed.run) in every process it starts.
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"
T = TypeVar("T")

# progress(done, total): called as a stage advances (rows for cache-teacher, optimizer steps for
# train-student), so that a front end can draw a progress bar.
Progress = Callable[[int, int], None]


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
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def output_shape(model: torch.nn.Module, split: Split, device: torch.device, role: str) -> tuple[int, ...]:
    """What `model` (in eval mode) outputs per sample for the split's first input: (classes,),
    or (positions, classes) for a model of sequences that outputs logits per token."""
    model.eval()
    first = inputs_at(split, np.zeros(1, dtype=np.int64))
    with torch.inference_mode():
        try:
            out = model(first.to(device))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            # Almost always a model that does not fit the data (a shape, a dtype, a vocabulary).
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"the {role} fails on the dataset's inputs ({tuple(first.shape[1:])} {str(first.dtype).removeprefix('torch.')}): {message}"
            ) from exc
    if out.ndim not in (2, 3):
        raise InputError(
            f"the {role} must return logits of shape (batch, classes) or (batch, tokens, classes), got {tuple(out.shape)}"
        )
    return tuple(out.shape[1:])


def check_labels_fit(split: Split, shape: tuple[int, ...], role: str) -> None:
    """The split's labels are one per sample, or one per token for a per-token model, and
    each names one of the model's classes."""
    labels = split.labels
    if labels is None:
        return
    if labels.shape[1:] != tuple(shape[:-1]):
        per = "one label per sample" if len(shape) == 1 else f"{shape[0]} labels per sample (one per token)"
        raise InputError(f"the {role} needs {per}, but the split's labels have shape {labels.shape}")
    if len(labels) and int(labels.max()) >= shape[-1]:
        raise InputError(f"the {role} outputs {shape[-1]} classes but the dataset has label {int(labels.max())}")


@contextlib.contextmanager
def one_blas_thread_beside_torch() -> Iterator[None]:
    """Limit BLAS libraries other than torch's (numpy's OpenBLAS, typically) to one thread.

    Data is prepared on background threads while torch computes on all cores. A dataset that
    calls numpy BLAS there would start its own thread team beside torch's OpenMP one and
    oversubscribe the cores: measured on 2 cores, that made the teacher pass 2x slower.
    Torch's own libraries are left as they are."""
    controller = ThreadpoolController()
    others = [lib.filepath for lib in controller.lib_controllers if lib.user_api == "blas" and "torch" not in lib.filepath]
    if not others:
        yield
        return
    with controller.select(filepath=others).limit(limits=1):
        yield


AMP_DTYPES = {name: getattr(torch, dtype) for name, dtype in AMP_MODES.items()}


def autocast(amp: str, device: torch.device):
    """The autocast context for a teacher forward: `none`, `bf16` or `fp16`."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"{purpose} needs the optional package {module!r} ({exc.name or module} is not installed): "
            f"pip install 'kd-pipeline[{extra}]'"
        ) from exc


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one model together (torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone evaluates and writes the run folder."""
        return self.rank == 0


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[tuple[Ranks, torch.device]]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL with one GPU per process (cuda:LOCAL_RANK), or
    gloo on CPUs. A group the caller made already is used as it is. Under torchrun a single
    process joins its group of one too, so that a one-GPU run sets up NCCL as a run of many
    does (`pipeline gpu-check` relies on it). Without torchrun (WORLD_SIZE unset or 1) and
    without a group: a group of one, and no group made."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1 and TORCHRUN_VARIABLE not in os.environ:
        yield Ranks(), device
        return
    if world > 1 and device.type == "cuda" and device.index is not None:
        raise InputError(f"`device` {device_name} would put every process on one GPU: give cuda or auto (process N takes cuda:LOCAL_RANK)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log.info("process %d of %d in a %s process group", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size()), device
        dist.barrier()  # no process leaves (and tears the group down) while another still works
    finally:
        if joined:
            dist.destroy_process_group()


def main_only(ranks: Ranks, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 alone; the others wait for it and fail with it if it fails (else
    they would wait forever at the next collective call)."""
    error, result = None, None
    if ranks.main:
        try:
            result = action()
        except BaseException as exc:  # any failure: the others must hear of it before it propagates
            error = exc
    if ranks.world > 1:
        ok = torch.tensor([0 if error else 1], device=_collective_device())
        dist.broadcast(ok, src=0)
        if not ok.item() and not ranks.main:
            raise PipelineError("rank 0 stopped with an error (see its message)")
    if error is not None:
        raise error
    return result


def agree(ranks: Ranks, value: int, what: str) -> None:
    """Raise on every process unless all of them hold the same `value`."""
    if ranks.world == 1:
        return
    low_high = torch.tensor([value, -value], device=_collective_device())
    dist.all_reduce(low_high, op=dist.ReduceOp.MIN)
    if int(low_high[0]) != -int(low_high[1]):
        raise PipelineError(f"the processes disagree on {what} (from {int(low_high[0])} to {-int(low_high[1])})")


def _collective_device() -> torch.device:
    """Where a tensor for a collective call must live: NCCL carries only CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_over_ranks(ranks: Ranks, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value's mean over the processes (every process passes the same names)."""
    if ranks.world == 1:
        return values
    averaged = {}
    for name in values:
        total = values[name].detach().clone()
        dist.all_reduce(total)
        averaged[name] = total / ranks.world
    return averaged


def training_threads(device: torch.device) -> int | None:
    """torch's CPU thread count for a training loop: every core this process may use but one,
    which the batch-preparing thread needs, and no more than torch was given (a sweep worker's
    share); None: leave it, on a GPU or where OMP_NUM_THREADS says.

    An OpenMP team spread over every core waits at each operation for its slowest thread; beside
    the prefetch thread, or on a machine other processes load, some thread is always descheduled,
    and small operations (a student's) then ran several times slower than on one thread
    (`pipeline bench` measures both, under load)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1))


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with torch's intra-op thread count set to `count` (None: as it is), restored after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
