"""Paired differences over seeds and their t intervals, against values computed by hand and printed tables."""

import math

import pytest

from pipeline.paired import interval_text, paired, resolved, t_cdf, t_quantile, verdict

# Two-sided 95% (p = 0.975) and one 90% (p = 0.95) quantiles of Student's t, as printed in every table.
TABLE = {(0.975, 1): 12.7062047, (0.975, 2): 4.30265273, (0.975, 3): 3.18244631, (0.975, 4): 2.77644511,
         (0.975, 9): 2.26215716, (0.975, 29): 2.04522964, (0.95, 10): 1.81246112, (0.995, 5): 4.03214298}


@pytest.mark.parametrize("p, df", sorted(TABLE))
def test_t_quantile_matches_the_tables(p, df):
    assert t_quantile(p, df) == pytest.approx(TABLE[p, df], abs=1e-7)
    assert t_quantile(1 - p, df) == pytest.approx(-TABLE[p, df], abs=1e-7)
    assert t_cdf(TABLE[p, df], df) == pytest.approx(p, abs=1e-8)


def test_t_cdf_of_one_and_two_degrees_has_its_closed_form():
    # df 1 is Cauchy: 1/2 + atan(t)/pi; df 2: 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-7.0, -1.0, 0.0, 0.3, 2.0, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)


def test_the_interval_over_paired_differences_is_the_hand_computed_one():
    """Errors by seed: the arm 10, 12, 9, 13 and the reference 12, 15, 10, 16 -> differences -2, -3,
    -1, -3: mean -2.25, sd sqrt(2.75 / 3) = 0.957427, half-width 3.182446 * 0.957427 / 2 = 1.523481."""
    comparison = paired("distilled", {0: 10, 1: 12, 2: 9, 3: 13}, "scratch", {0: 12, 1: 15, 2: 10, 3: 16, 4: 11})
    assert comparison.seeds == (0, 1, 2, 3) and comparison.differences == (-2, -3, -1, -3)  # seed 4: the reference's alone
    assert comparison.mean == -2.25 and comparison.sd == pytest.approx(0.957427, abs=1e-6)
    assert (comparison.low, comparison.high) == (pytest.approx(-3.773481, abs=1e-6), pytest.approx(-0.726519, abs=1e-6))
    assert verdict(comparison, below="fewer errors", above="more errors") == "fewer errors"
    assert verdict(comparison, below="fewer", above="more", margin=-4.0) == "more"  # the whole interval lies above -4
    assert verdict(comparison, below="fewer", above="more", margin=-1.0) == "not resolved at 4 seeds"
    assert interval_text(comparison.as_dict(), digits=1) == "-2.2 [-3.8, -0.7]"


def test_relative_differences_and_what_one_seed_cannot_resolve():
    comparison = paired("top-8", {0: 6.3, 1: 6.6}, "dense", {0: 6.0, 1: 6.0}, relative=True)
    assert comparison.differences == (pytest.approx(0.05), pytest.approx(0.10))
    half = 12.7062047 * math.sqrt(0.05**2 / 2) / math.sqrt(2)
    assert (comparison.low, comparison.high) == (pytest.approx(0.075 - half), pytest.approx(0.075 + half))
    assert interval_text(comparison.as_dict(), scale=100, unit="%") == f"+7.50% [{100 * (0.075 - half):+.2f}%, {100 * (0.075 + half):+.2f}%]"
    one = paired("top-8", {3: 6.3}, "dense", {3: 6.0, 4: 6.1}, relative=True)
    assert one.low is one.high is None and one.sd is None
    assert verdict(one, below="met", above="missed", margin=0.01) == "not resolved at 1 seed"
    assert not resolved(verdict(one, below="met", above="missed")) and resolved("met")
    with pytest.raises(ValueError, match="share no seed"):
        paired("a", {0: 1.0}, "b", {1: 1.0})
