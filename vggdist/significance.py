"""Honest error rates: 95 % confidence intervals and paired tests between runs evaluated on the same images.

An error rate measured on n images is a binomial proportion, so every rate we print carries its n and a Wilson
score interval (Wilson 1927): unlike the textbook p ± 1.96·SE it stays inside [0, 100] and keeps close to its
nominal coverage for small n and rates near 0 or 100 %.

Two runs evaluated on the *same* images are compared with McNemar's test (McNemar 1947), exact form: only the
images on which the two disagree carry information. With b = images A gets right and B wrong, and c = the
reverse, under "no difference" b ~ Binomial(b + c, 1/2); the two-sided p-value is
min(1, 2 · P[X ≤ min(b, c)]), computed here in exact integer arithmetic. The difference of the two error rates
is (b − c)/n for "B minus A" with a Wald interval for paired proportions (Fleiss et al. 2003, §13.1).

A comparison is labelled "significant" when p < `ALPHA` (0.05), otherwise "within noise". A paper finding is
"reproduced" when ours moves in the paper's direction and significantly, "not reproduced" when it moves
significantly the other way, and "within noise" otherwise. No correction for multiple comparisons is applied;
each row of a report is its own question.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
WITHIN_NOISE = "within noise"
SIGNIFICANT = "significant"


def wilson_interval(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `errors / n`, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError(f"an interval needs n > 0 images, got n={n}")
    if not 0 <= errors <= n:
        raise ValueError(f"errors={errors} must lie in 0..n={n}")
    p = errors / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at the ends the interval touches 0 or 1 exactly; rounding must not push it past
    lo = 0.0 if errors == 0 else max(0.0, centre - half)
    hi = 1.0 if errors == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class ErrorRate:
    """An error rate in % with its n and 95 % Wilson interval."""

    errors: int
    n: int

    def __post_init__(self) -> None:
        wilson_interval(self.errors, self.n)  # validates

    @classmethod
    def from_percent(cls, err_percent: float, n: int) -> ErrorRate:
        """From a rate in % measured on n images (the error count is recovered by rounding)."""
        return cls(round(err_percent * n / 100.0), n)

    @property
    def percent(self) -> float:
        return 100.0 * self.errors / self.n

    @property
    def ci(self) -> tuple[float, float]:
        lo, hi = wilson_interval(self.errors, self.n)
        return 100.0 * lo, 100.0 * hi

    def format(self, digits: int = 1) -> str:
        """'27.4 [25.5, 29.4]' (percent, 95 % CI)."""
        lo, hi = self.ci
        return f"{self.percent:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def to_dict(self) -> dict[str, float | int]:
        lo, hi = self.ci
        return {"err": self.percent, "ci_low": lo, "ci_high": hi, "n": self.n}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: min(1, 2·P[X ≤ min(k, n−k)])."""
    if n == 0:
        return 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in 0..n={n}")
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: exact up to the final rounding, no overflow


@dataclass(frozen=True)
class PairedComparison:
    """Run B against run A on the same n images (McNemar, exact)."""

    n: int
    a_errors: int
    b_errors: int
    a_only_right: int  # images A classifies correctly and B does not
    b_only_right: int  # images B classifies correctly and A does not

    @property
    def discordant(self) -> int:
        return self.a_only_right + self.b_only_right

    @property
    def p_value(self) -> float:
        return binomial_two_sided_p(self.a_only_right, self.discordant)

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def delta(self) -> float:
        """B's error minus A's, in percentage points (negative: B is better)."""
        return 100.0 * (self.a_only_right - self.b_only_right) / self.n

    @property
    def delta_ci(self) -> tuple[float, float]:
        """Wald 95 % interval of `delta` for paired proportions, in percentage points."""
        b, c, n = self.a_only_right, self.b_only_right, self.n
        d = (b - c) / n
        se = math.sqrt(max(0.0, (b + c) / n - d * d) / n)
        return 100.0 * (d - Z95 * se), 100.0 * (d + Z95 * se)

    @property
    def label(self) -> str:
        return SIGNIFICANT if self.significant else WITHIN_NOISE

    def verdict(self, b_should_be_better: bool = True) -> str:
        """`reproduced` / `not reproduced` / `within noise` for a claim that B beats A (or the reverse)."""
        if not self.significant:
            return WITHIN_NOISE
        return REPRODUCED if (self.delta < 0) == b_should_be_better else NOT_REPRODUCED

    def to_dict(self) -> dict[str, float | int | str]:
        lo, hi = self.delta_ci
        return {
            "n": self.n,
            "a_err": 100.0 * self.a_errors / self.n,
            "b_err": 100.0 * self.b_errors / self.n,
            "a_only_right": self.a_only_right,
            "b_only_right": self.b_only_right,
            "delta": self.delta,
            "delta_ci_low": lo,
            "delta_ci_high": hi,
            "p_value": self.p_value,
            "label": self.label,
        }


class UnpairedError(ValueError):
    """Two evaluations did not score the same images, so no paired test applies."""


def mcnemar(a_correct: Mapping[str, bool], b_correct: Mapping[str, bool]) -> PairedComparison:
    """Compare two evaluations keyed by image (sample key → correct?); they must cover the same images."""
    if a_correct.keys() != b_correct.keys():
        only_a, only_b = len(a_correct.keys() - b_correct.keys()), len(b_correct.keys() - a_correct.keys())
        raise UnpairedError(
            f"the two evaluations did not score the same images ({only_a} only in the first, {only_b} only "
            "in the second); evaluate both on the same validation shards"
        )
    if not a_correct:
        raise UnpairedError("no images to compare")
    return mcnemar_arrays([a_correct[k] for k in a_correct], [b_correct[k] for k in a_correct])


def mcnemar_arrays(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedComparison:
    """`mcnemar` for two aligned sequences (the same image at the same position)."""
    if len(a_correct) != len(b_correct) or not a_correct:
        raise UnpairedError(
            f"need two aligned, non-empty outcome lists, got {len(a_correct)} and {len(b_correct)}"
        )
    a_only = b_only = a_err = b_err = 0
    for a, b in zip(a_correct, b_correct, strict=True):
        a, b = bool(a), bool(b)
        a_err += not a
        b_err += not b
        a_only += a and not b
        b_only += b and not a
    return PairedComparison(len(a_correct), a_err, b_err, a_only, b_only)
