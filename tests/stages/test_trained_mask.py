"""Soft labels only where the student learns: a split that marks its trained positions (chat data:
the assistant's tokens) gets a token cache with soft labels there alone, and the mask reaches both
terms of the loss, in train-student and in kd_loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import zarr

from pipeline.models import resolve_model
from stages import cache_teacher, train_student
from stages.cache.layout import Layout
from stages.inspection import describe_cache
from stages.kinds import KINDS
from stages.loop import soft_label_loss
from stages.losses import HiddenAndHead
from stages.teacher_rows import stored_rows
from stages.verify import verify

pytest.importorskip("transformers")

VOCAB, SEQ, ROWS = 2000, 48, 96
TEACHER = "gpt2:layers=1,dim=16,heads=2"


@dataclass(frozen=True)
class ChatLikeSplit:
    """Token rows whose first `prompt` positions (a prompt) are not trained, as a chat set's are."""

    name: str
    x: torch.Tensor
    y: np.ndarray
    lengths: np.ndarray
    prompt: np.ndarray
    num_classes: int = VOCAB

    def __len__(self) -> int:
        return len(self.x)

    def inputs(self, index):
        return self.x[torch.from_numpy(np.asarray(index, dtype=np.int64))]

    @property
    def labels(self):
        return self.y

    def trained_positions(self, index):
        index = np.asarray(index, dtype=np.int64)
        positions = np.arange(SEQ)[None, :]
        return (positions >= self.prompt[index, None]) & (positions < self.lengths[index, None])


def _split(name: str, seed: int) -> ChatLikeSplit:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (ROWS, SEQ + 1))
    lengths = rng.integers(SEQ // 2, SEQ + 1, ROWS)
    return ChatLikeSplit(name, torch.from_numpy(tokens[:, :-1]), tokens[:, 1:].copy(), lengths,
                         (lengths * rng.uniform(0.3, 0.7, ROWS)).astype(np.int64))


class Unmasked:
    """The same split without its mask: every valid position trained."""

    def __init__(self, split):
        self._split = split

    def __getattr__(self, name):
        if name == "trained_positions":
            raise AttributeError(name)
        return getattr(self._split, name)

    def __len__(self):
        return len(self._split)


def _cache(tmp_path, split, name: str, kind: str, options: dict | None = None):
    torch.manual_seed(0)
    teacher = resolve_model(TEACHER, num_classes=VOCAB, input_shape=(SEQ,)).eval()
    config = cache_teacher.CacheTeacherConfig(teacher=TEACHER, dataset="chat-like", out=tmp_path / f"{name}.zarr", temperature=1.0,
                                              format=kind, kind_options=options or {}, codec="zstd", chunk_rows=32, device="cpu")
    return cache_teacher.run(config, teacher, split).cache, teacher


@pytest.mark.parametrize("kind, options", [("dense", {}), ("topk", {"top_k": 8}), ("qtopk", {"top_k": 8, "value_bits": 4}),
                                           ("sampled", {"samples": 6})])
def test_a_masked_cache_stores_soft_labels_only_where_the_student_learns(tmp_path, kind, options):
    split = _split("train", 0)
    masked, teacher = _cache(tmp_path, split, "masked", kind, options)
    unmasked, _ = _cache(tmp_path, Unmasked(split), "unmasked", kind, options)
    group, whole = zarr.open_group(str(masked), mode="r"), zarr.open_group(str(unmasked), mode="r")
    trained = split.trained_positions(np.arange(ROWS))
    assert group.attrs["trained_mask"] and not whole.attrs["trained_mask"]
    np.testing.assert_array_equal(group["trained"][:], trained.astype(np.uint8))
    for name in KINDS[kind].soft_arrays:  # the trained positions as the unmasked cache has them, zeros elsewhere
        stored, reference = group[name][:], whole[name][:]
        np.testing.assert_array_equal(stored[trained], reference[trained])
        assert not stored[~trained].any()
    # its soft-label bytes in proportion to the trained positions
    described, described_whole = describe_cache(masked), describe_cache(unmasked)
    share = trained.sum() / split.lengths.sum()
    ratio = described["soft_label_bytes_per_token"] / described_whole["soft_label_bytes_per_token"]
    # Within 5% where a token's values hardly compress (dense, topk: float16 values, class numbers);
    # qtopk's and sampled's entropy-coded integers compress by what repeats across positions, and a
    # cache of half the positions finds less to repeat: a little more per trained token there.
    tolerance = 0.05 if kind in ("dense", "topk") else 0.15
    assert share <= ratio <= share * (1 + tolerance), (ratio, share)
    assert described["trained_positions"] == trained.sum()
    report = verify(masked, teacher=teacher, split=split, samples=16)
    assert report.ok, report


def test_a_student_trains_from_a_masked_cache_and_the_mask_reaches_both_terms_of_its_loss(tmp_path):
    split, test = _split("train", 0), _split("test", 1)
    masked, _ = _cache(tmp_path, split, "masked", "topk", {"top_k": 8})
    torch.manual_seed(1)
    student = resolve_model("gpt2:layers=1,dim=8,heads=2", num_classes=VOCAB, input_shape=(SEQ,))
    result = train_student.run(train_student.TrainConfig(model="gpt2:layers=1,dim=8,heads=2", dataset="chat-like", out=tmp_path / "run",
                                                         cache=masked, alpha=0.5, epochs=1, batch_size=16, device="cpu"),
                               student, split, test)
    assert result.mode == "distilled" and result.test_tokens == test.trained_positions(np.arange(ROWS)).sum()


@pytest.mark.parametrize("kind, options", [("dense", None), ("topk", {"top_k": 8}), ("qtopk", {"top_k": 8, "value_bits": 4}),
                                           ("sampled", {"samples": 6}), (None, None)])
@pytest.mark.parametrize("pieces", [False, True], ids=["whole", "pieces"])
def test_an_untrained_positions_teacher_row_and_label_change_neither_the_loss_nor_its_gradient(kind, options, pieces):
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([10, 7])
    trained = (torch.arange(10)[None, :] >= torch.tensor([[4], [2]])) & (torch.arange(10)[None, :] < lengths[:, None])
    labels = torch.randint(0, 50, (2, 10), generator=generator)
    teacher = torch.randn(2, 10, 50, generator=generator) * 3
    head, hidden = torch.nn.Linear(6, 50), torch.randn(2, 10, 6, generator=generator, requires_grad=True)

    def loss_and_grad(teacher, labels):
        batch = {"lengths": lengths, "trained": trained.to(torch.uint8), "labels": labels}
        if kind is not None:
            layout = Layout(kind=kind, num_samples=2, num_classes=50, chunk_rows=2, dtype="float32", tokens=10, options=options)
            batch.update({k: v for k, v in stored_rows(teacher, layout, lengths, row_index=torch.arange(2)).items()
                          if k in KINDS[kind].soft_arrays})
        student = HiddenAndHead(hidden, head) if pieces else head(hidden)
        loss, _ = soft_label_loss(student, batch, KINDS[kind] if kind else None, alpha=0.5, temperature=2.0 if kind else None,
                                  cache_temperature=2.0 if kind else None)
        return loss, torch.autograd.grad(loss, hidden)[0]

    loss, grad = loss_and_grad(teacher, labels)
    changed_teacher, changed_labels = teacher.clone(), labels.clone()
    changed_teacher[~trained] = torch.randn(int((~trained).sum()), 50, generator=generator) * 10
    changed_labels[~trained] = (labels[~trained] + 7) % 50
    other_loss, other_grad = loss_and_grad(changed_teacher, changed_labels)
    assert float(other_loss) == float(loss)
    torch.testing.assert_close(other_grad, grad, rtol=0, atol=0)
    assert (grad[~trained] == 0).all() and (grad[trained] != 0).any()
    changed_labels[0, 5] = (labels[0, 5] + 1) % 50  # a trained position's label does count
    assert float(loss_and_grad(changed_teacher, changed_labels)[0]) != float(loss)
