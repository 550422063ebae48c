"""Augmentations replay exactly from a seed, and do what their names say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.augment import parse_augment, view_seeds
from stages.errors import InputError


def _images(n=6, seed=0):
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ["shift:2", "rotate:15", "flip", "shift:2+rotate:10+flip"])
def test_the_same_seed_gives_the_same_pixels_bit_for_bit(spec):
    augment = parse_augment(spec)
    x, seeds = _images(), np.arange(6, dtype=np.uint64) * 7919
    first, again = augment(x, seeds), augment(x.clone(), seeds)
    assert torch.equal(first, again) and first.shape == x.shape
    # one sample alone, in another batch, gets the same pixels as in this one
    assert torch.equal(augment(x[3:4], seeds[3:4])[0], first[3])
    other = augment(x, seeds + np.uint64(1))
    assert not torch.equal(first, other)


def test_shift_moves_the_image_by_whole_pixels():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    for seed in range(20):
        moved = parse_augment("shift:2")(x, np.array([seed], dtype=np.uint64))[0, 0]
        (row, col), = torch.nonzero(moved).tolist()
        assert abs(row - 4) <= 2 and abs(col - 4) <= 2 and moved.sum() == 1.0


def test_rotate_keeps_the_centre_and_turns_the_rest():
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    x[0, 0, 10, 18] = 1.0  # a point 8 pixels right of the centre
    turned = [parse_augment("rotate:30")(x, np.array([seed], dtype=np.uint64))[0, 0] for seed in range(6)]
    assert all(abs(float(t[10, 10]) - 1.0) < 1e-5 for t in turned)
    assert any(float(t[10, 18]) < 0.5 for t in turned)  # the far point moved for some angle


def test_flip_mirrors_about_half_the_samples():
    x = _images(200)
    flipped = parse_augment("flip")(x, np.arange(200, dtype=np.uint64))
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(flipped[i], x[i]) for i in range(200)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 70 < sum(mirrored) < 130


def test_user_transforms_join_the_built_ins():
    def darker(sample, rng):
        return sample * float(rng.uniform(0.5, 1.0))

    augment = parse_augment("shift:1+mine:darker", {"mine:darker": darker})
    x, seeds = _images(), np.arange(6, dtype=np.uint64)
    assert torch.equal(augment(x, seeds), augment(x, seeds)) and augment(x, seeds).max() <= x.max()


@pytest.mark.parametrize(("spec", "words"), [("shift:0", "whole number > 0"), ("rotate:x", "number > 0"),
                                            ("blur:3", "unknown augment spec"), ("shift:2+", "unknown augment spec")])
def test_bad_specs_are_refused(spec, words):
    with pytest.raises(InputError, match=words):
        parse_augment(spec)


def test_augmenting_tokens_is_refused():
    with pytest.raises(InputError, match="float images"):
        parse_augment("shift:1")(torch.zeros(2, 16, dtype=torch.int64), np.arange(2, dtype=np.uint64))


def test_view_seeds_are_a_function_of_base_seed_sample_and_view():
    seeds = view_seeds(3, np.arange(100), 8)
    assert seeds.shape == (100, 8) and seeds.dtype == np.uint64 and len(np.unique(seeds)) == 800
    np.testing.assert_array_equal(view_seeds(3, np.array([41, 7]), 8), seeds[[41, 7]])
    assert not np.array_equal(view_seeds(4, np.arange(100), 8), seeds)
