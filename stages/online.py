"""Online distillation: the teacher computes each batch's soft labels as training goes.

`OnlineTeacher` is a soft-label source for `train_student.run` (its SoftLabels protocol), as a
cache is, for what a cache cannot hold or when there is nothing to reuse: the reference arm of
`pipeline demo-llm` when a dense cache over the rows would not fit, and the online-KD arm of
`pipeline bench`. Its rows are what a dense float32 cache of the teacher would store for them
(stages.teacher_rows: logits / T, zeros past a sequence's end), so it trains the
student as that cache would, at the price of a teacher forward in every step of every run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stages.cache.layout import Layout
from stages.cache.reader import CacheReader, batch_bounds
from stages.data import Split, sequence_lengths
from stages.errors import InputError
from stages.kinds import Rows
from stages.runtime import output_shape
from stages.teacher_rows import teacher_rows


class OnlineTeacher:
    """Dense soft labels of `teacher` at `temperature` for the rows of `split`, computed per
    batch on `device` (under `amp` autocast). One process only: it has no chunks to share out.
    With `order` (a cache of the same split), the batches hold the rows that cache's batches hold,
    in its order, so a student trained online and one trained from that cache at the same seed see
    the same batches: a paired comparison of the two."""

    soft_arrays = ("logits",)

    def __init__(self, teacher: torch.nn.Module, split: Split, temperature: float, device: torch.device, amp: str = "none",
                 order: CacheReader | None = None):
        self._teacher = teacher.to(device).eval()
        self._split, self._device, self._amp, self._order = split, device, amp, order
        if order is not None and order.layout.num_samples != len(split):
            raise InputError(f"online KD in the order of a cache of {order.layout.num_samples} rows cannot cover a split of {len(split)}")
        shape = output_shape(self._teacher, split, device, "teacher")
        self.temperature, self.num_classes, self.labelled = temperature, shape[-1], split.labels is not None
        self.layout = Layout(kind="dense", num_samples=len(split), num_classes=self.num_classes, chunk_rows=len(split),
                             dtype="float32", codec="none", tokens=shape[0] if len(shape) == 2 else None,
                             labelled=self.labelled)
        self.grid = self.layout.grid
        self._lengths = None if self.layout.tokens is None else torch.from_numpy(sequence_lengths(split, self.layout.tokens))
        self.attrs = {"online": True, "temperature": temperature, "num_classes": self.num_classes}

    def check_split(self, split: Split, dataset_spec: str) -> None:
        """The student trains on the split the teacher runs on: there is nothing to mismatch."""

    def batches(self, batch_size: int, *, seed: int, epoch: int, buffer_chunks: int = 8, **_) -> Iterator[Rows]:
        for index in self._indices(batch_size, seed, epoch, buffer_chunks):
            inputs = self._split.inputs(index)
            lengths = None if self._lengths is None else self._lengths[index]
            with torch.inference_mode():
                rows = teacher_rows(self._teacher, inputs.to(self._device), self.layout, self.temperature, self._amp, lengths)
            yield {"index": index, "logits": rows["logits"].cpu().numpy(), "inputs": inputs}

    def _indices(self, batch_size: int, seed: int, epoch: int, buffer_chunks: int) -> Iterator[np.ndarray]:
        if self._order is not None:
            for rows in self._order.batches(batch_size, seed=seed, epoch=epoch, buffer_chunks=buffer_chunks, names=("index",)):
                yield rows["index"]
            return
        order = np.random.default_rng([seed, epoch]).permutation(len(self._split))
        for start, stop in batch_bounds(len(order), batch_size):
            yield order[start:stop]

    def runs(self, seed: int, epoch: int) -> list[tuple[int, int]]:
        raise InputError("online KD runs in one process: it has no chunks to deal out among several")
