"""Running the teacher and turning its outputs into the rows a cache stores.

The part of caching that touches the teacher: its forward under autocast, its logits taken in
pieces of positions at a language model's vocabulary, divided by T, rounded to the cache's dtype
and encoded by the cache's kind (stages.kinds). Stage one (stages.cache_teacher), verify and
online distillation (stages.online) call it; the cache's format knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stages.cache.layout import Layout
from stages.errors import PipelineError
from stages.runtime import autocast

# A token-level batch's logits are reduced to the stored arrays piece by piece along the
# positions, each piece (B, l, C) at most this many bytes as float32, when the teacher can give
# its logits by positions (`hidden_and_head`, as pipeline.hf's causal LMs do): so the memory a
# CPU teacher takes on the host, or a GPU one on its device, does not grow with B * L * C
# (16 sequences of 1,024 tokens over a 70,000-token vocabulary are 4.6 GB of float32 logits).
LOGIT_PIECE_BYTES = 64 * 2**20

# Called with each piece: (first position, the teacher's logits / T, the stored rows of it).
PieceHook = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]


def teacher_rows(teacher: torch.nn.Module, inputs: torch.Tensor, layout: Layout, temperature: float, amp: str,
                 lengths: torch.Tensor | None = None, each_piece: PieceHook | None = None,
                 row_index: torch.Tensor | None = None, trained: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The soft-label (and feature) arrays a cache of `layout` stores for a batch of inputs (the
    rows with dataset indices `row_index`; `trained` (B, L) bool: the positions a cache with a mask
    of trained positions keeps), on the teacher's device: its forward under `amp`
    autocast, logits / T rounded and encoded by the kind (stored_rows). Call it under torch.inference_mode. A teacher with
    `hidden_and_head(inputs) -> (hidden states (B, L, H), head)` on a token-level layout gives its
    logits in pieces along the positions (LOGIT_PIECE_BYTES), each reduced before the next."""
    split_forward = getattr(teacher, "hidden_and_head", None)
    device = inputs.device
    if split_forward is None or layout.tokens is None or layout.features is not None or layout.views is not None:
        with autocast(amp, device):
            if layout.features is None:
                logits, features = teacher(inputs), None
            else:
                logits, features = teacher.logits_and_features(inputs)
        if layout.views is not None:  # the views of a sample are adjacent: (B * V, ...) -> (B, V, ...)
            count = len(inputs) // layout.views
            logits = logits.reshape(count, layout.views, *logits.shape[1:])
            features = None if features is None else features.reshape(count, layout.views, -1)
        pieces = [(0, logits, features)]
    else:
        with autocast(amp, device):
            hidden, head = split_forward(inputs)
        step = max(1, LOGIT_PIECE_BYTES // (len(inputs) * layout.num_classes * 4))

        def piece(first: int) -> torch.Tensor:
            with autocast(amp, device):
                return head(hidden[:, first : first + step])

        pieces = ((first, piece(first), None) for first in range(0, hidden.shape[1], step))
    parts = []
    for first, logits, features in pieces:
        over_t = logits.float()
        if temperature != 1:
            over_t.div_(temperature)  # in place: the teacher's logits are not needed as they were
        rows = stored_rows(over_t, layout, lengths, None if features is None else features.float(), first_position=first,
                           overwrite=each_piece is None, row_index=row_index,
                           trained=None if trained is None else trained[:, first : first + over_t.shape[1]])
        if each_piece is not None:
            each_piece(first, over_t, rows)
        parts.append(rows)
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts], dim=1) for name in parts[0]}  # along the positions


def stored_rows(logits_over_t: torch.Tensor, layout: Layout, lengths: torch.Tensor | None = None,
                features: torch.Tensor | None = None, first_position: int = 0, overwrite: bool = False,
                row_index: torch.Tensor | None = None, trained: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The soft-label arrays a cache of `layout` stores for a batch of teacher logits / T
    ((B, C), or (B, L, C) for a token-level cache: positions `first_position` onwards), computed
    on the logits' device, and the teacher's `features` (B, F) as they are (not divided by T),
    for a layout with features.

    Values are rounded to the cache dtype first, and a top-k row's log-sum-exp is taken over the
    whole rounded row: so exp(value - logsumexp) is exactly the probability a dense cache of the
    same teacher gives that class, and a top-k cache with K = C is the dense one, sorted. On
    a token-level cache, positions at or past a sequence's length are zeroed: what a teacher
    says about padding is not part of the cache (and would differ between teachers' masks); so are
    the positions `trained` ((B, l) bool, for these positions) leaves out: the student never learns
    there, and zeros cost (compressed) next to no bytes. With `overwrite`, the kind may use float32 `logits_over_t` as its scratch space. `row_index`
    (B,): the rows' dataset indices, which a sampled cache's draws are a function of."""
    rounded = logits_over_t.to(getattr(torch, layout.dtype))
    padding = None if lengths is None else (
        torch.arange(first_position, first_position + rounded.shape[1], device=rounded.device)
        >= lengths.to(rounded.device).unsqueeze(1))
    if trained is not None:
        padding = ~trained.to(rounded.device) if padding is None else padding | ~trained.to(rounded.device)
    scratch = logits_over_t if overwrite and logits_over_t.dtype == torch.float32 else None
    rows = layout.soft_kind.encode(rounded, layout, padding, scratch, row_index, first_position)
    if layout.features is not None:
        if features is None:
            raise PipelineError("internal: a layout with features, but no features given")
        rows["features"] = features.to(rounded.dtype)
    return rows
