"""Confidence intervals and McNemar's test against values worked out by hand (formulas in the comments)."""

import math

import pytest

from vggdist.significance import (
    NOT_REPRODUCED,
    REPRODUCED,
    WITHIN_NOISE,
    ErrorRate,
    UnpairedError,
    binomial_two_sided_p,
    mcnemar,
    mcnemar_arrays,
    wilson_interval,
)


def test_wilson_matches_hand_computation():
    # 10 errors in 50: p = 0.2, z² = 3.841459
    # centre = (0.2 + z²/100) / (1 + z²/50) = 0.2384146 / 1.0768292 = 0.2214040
    # half   = z / 1.0768292 · sqrt(0.16/50 + z²/10000) = 1.8201169 · 0.0598677 = 0.1089661
    lo, hi = wilson_interval(10, 50)
    assert lo == pytest.approx(0.1124379, abs=1e-6)
    assert hi == pytest.approx(0.3303701, abs=1e-6)


def test_wilson_at_the_ends():
    # 0 of 10: [0, z²/(n + z²)] = [0, 3.841459/13.841459]
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775328, abs=1e-6))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775328, abs=1e-6)


def test_wilson_narrows_with_n_and_contains_the_estimate():
    widths = []
    for n in (100, 1000, 10000):
        lo, hi = wilson_interval(n // 4, n)
        assert lo < 0.25 < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # the 1/sqrt(n) law: 100x the images, ~1/10 the width
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.02)


@pytest.mark.parametrize("errors,n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_refuses_impossible_counts(errors, n):
    with pytest.raises(ValueError):
        wilson_interval(errors, n)


def test_error_rate_formats_percent_with_ci():
    e = ErrorRate(10, 50)
    assert e.percent == 20.0
    assert e.format() == "20.0 [11.2, 33.0]"
    assert e.to_dict()["n"] == 50
    assert ErrorRate.from_percent(27.4, 500).errors == 137


def test_binomial_p_by_hand():
    # 1 of 10 discordant pairs: 2 · (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert binomial_two_sided_p(1, 10) == 22 / 1024
    assert binomial_two_sided_p(9, 10) == 22 / 1024  # symmetric
    # 0 of 5: 2 · 1/32
    assert binomial_two_sided_p(0, 5) == 2 / 32
    assert binomial_two_sided_p(5, 10) == 1.0  # capped at 1
    assert binomial_two_sided_p(0, 0) == 1.0


def test_binomial_p_exact_for_large_counts():
    # 400 vs 600 of 1000 discordant images: far beyond float factorials, still exact and tiny
    p = binomial_two_sided_p(400, 1000)
    assert 0 < p < 1e-9
    # normal approximation with continuity correction as a sanity bound: z = (|400-500| - 0.5)/sqrt(250)
    z = (100 - 0.5) / math.sqrt(250)
    approx = math.erfc(z / math.sqrt(2))
    assert p == pytest.approx(approx, rel=0.2)


def test_mcnemar_counts_and_delta_by_hand():
    # 100 images: 80 both right, 10 both wrong, A alone right on 1, B alone right on 9
    a = [True] * 80 + [False] * 10 + [True] * 1 + [False] * 9
    b = [True] * 80 + [False] * 10 + [False] * 1 + [True] * 9
    c = mcnemar_arrays(a, b)
    assert (c.n, c.a_only_right, c.b_only_right) == (100, 1, 9)
    assert (c.a_errors, c.b_errors) == (19, 11)
    assert c.p_value == 22 / 1024 and c.significant
    assert c.delta == pytest.approx(-8.0)
    # Wald for paired proportions: d = -0.08, se = sqrt((0.10 - 0.0064)/100) = 0.0305941
    lo, hi = c.delta_ci
    assert lo == pytest.approx(-13.9964, abs=1e-3) and hi == pytest.approx(-2.0036, abs=1e-3)
    assert c.verdict(b_should_be_better=True) == REPRODUCED
    assert c.verdict(b_should_be_better=False) == NOT_REPRODUCED


def test_mcnemar_within_noise():
    a = [True] * 50 + [True, False, True, False]
    b = [True] * 50 + [False, True, False, True]
    c = mcnemar_arrays(a, b)
    assert c.p_value == 1.0 and not c.significant
    assert c.label == WITHIN_NOISE and c.verdict() == WITHIN_NOISE


def test_mcnemar_by_key_aligns_and_refuses_different_images():
    a = {"x": True, "y": False, "z": True}
    b = {"z": False, "x": True, "y": True}  # another order, same images
    c = mcnemar(a, b)
    assert (c.a_only_right, c.b_only_right) == (1, 1)
    with pytest.raises(UnpairedError, match="same images"):
        mcnemar(a, {"x": True, "y": True})
