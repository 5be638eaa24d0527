"""The paper's published numbers, as data: Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015, arXiv:1409.1556v6.

Table 1 gives each ConvNet configuration's depth (weight layers). Tables 3-6 give ILSVRC-2012 *validation*
top-1 / top-5 error in %; Table 6 also gives one test-set top-5 error per row where the paper lists one.
Dense evaluation (§3.2) is the paper's default test protocol for Tables 3 and 4.

Scales are written in the paper's pixels (crop 224): a fixed training scale S is "256" or "384", the
jittered S in [256;512] is "256-512"; test scales Q are tuples of ints. `vggdist report` puts these next
to an experiment's own numbers, which its runs label with the same paper-equivalent scales.
"""

from __future__ import annotations

from dataclasses import dataclass

# Table 1: weight layers (conv + FC) of each configuration.
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
CONFIG_ORDER = tuple(WEIGHT_LAYERS)
TRAIN_SCALE_ORDER = ("256", "384", "256-512")

# The test protocols of §3.2 / §4.3 under the names used in metrics and eval_results.json.
PROTOCOL_LABELS = {
    "single": "single crop",
    "dense": "dense",
    "multicrop": "multi-crop",
    "combined": "multi-crop & dense",
}

MULTISCALE_Q = (256, 384, 512)  # Q for S in [256;512] in Tables 4-6


@dataclass(frozen=True)
class PaperResult:
    """One published row: `config` is a Table 1 column, or "D+E" for the Table 6 fusion."""

    table: int
    config: str
    train_scale: str  # "256", "384", "256-512"
    test_scales: tuple[int, ...]
    protocol: str  # dense | multicrop | combined
    top1_err: float
    top5_err: float
    test_top5_err: float | None = None  # ILSVRC-2012 test set, Table 6 only


def _t3(config: str, train_scale: str, q: int, top1: float, top5: float) -> PaperResult:
    return PaperResult(3, config, train_scale, (q,), "dense", top1, top5)


def _t4(config: str, train_scale: str, qs: tuple[int, ...], top1: float, top5: float) -> PaperResult:
    return PaperResult(4, config, train_scale, qs, "dense", top1, top5)


_Q256 = (224, 256, 288)  # Table 4: S=256 -> Q in {S-32, S, S+32}
_Q384 = (352, 384, 416)

RESULTS: tuple[PaperResult, ...] = (
    # Table 3: single test scale; Q = S for fixed S, Q = 384 for S in [256;512].
    _t3("A", "256", 256, 29.6, 10.4),
    _t3("A-LRN", "256", 256, 29.7, 10.5),
    _t3("B", "256", 256, 28.7, 9.9),
    _t3("C", "256", 256, 28.1, 9.4),
    _t3("C", "384", 384, 28.1, 9.3),
    _t3("C", "256-512", 384, 27.3, 8.8),
    _t3("D", "256", 256, 27.0, 8.8),
    _t3("D", "384", 384, 26.8, 8.7),
    _t3("D", "256-512", 384, 25.6, 8.1),
    _t3("E", "256", 256, 27.3, 9.0),
    _t3("E", "384", 384, 26.9, 8.7),
    _t3("E", "256-512", 384, 25.5, 8.0),
    # Table 4: multiple test scales, dense.
    _t4("B", "256", _Q256, 28.2, 9.6),
    _t4("C", "256", _Q256, 27.7, 9.2),
    _t4("C", "384", _Q384, 27.8, 9.2),
    _t4("C", "256-512", MULTISCALE_Q, 26.3, 8.2),
    _t4("D", "256", _Q256, 26.6, 8.6),
    _t4("D", "384", _Q384, 26.5, 8.6),
    _t4("D", "256-512", MULTISCALE_Q, 24.8, 7.5),
    _t4("E", "256", _Q256, 26.9, 8.7),
    _t4("E", "384", _Q384, 26.7, 8.6),
    _t4("E", "256-512", MULTISCALE_Q, 24.8, 7.5),
    # Table 5: dense vs multi-crop vs both, S in [256;512], Q in {256, 384, 512}.
    PaperResult(5, "D", "256-512", MULTISCALE_Q, "dense", 24.8, 7.5),
    PaperResult(5, "D", "256-512", MULTISCALE_Q, "multicrop", 24.6, 7.5),
    PaperResult(5, "D", "256-512", MULTISCALE_Q, "combined", 24.4, 7.2),
    PaperResult(5, "E", "256-512", MULTISCALE_Q, "dense", 24.8, 7.5),
    PaperResult(5, "E", "256-512", MULTISCALE_Q, "multicrop", 24.6, 7.4),
    PaperResult(5, "E", "256-512", MULTISCALE_Q, "combined", 24.4, 7.1),
    # Table 6: the post-submission fusion of D/[256;512] and E/[256;512].
    PaperResult(6, "D+E", "256-512", MULTISCALE_Q, "dense", 24.0, 7.1, test_top5_err=7.0),
    PaperResult(6, "D+E", "256-512", MULTISCALE_Q, "multicrop", 23.9, 7.2),
    PaperResult(6, "D+E", "256-512", MULTISCALE_Q, "combined", 23.7, 6.8, test_top5_err=6.8),
)

FUSION_MODELS = ("D/256-512", "E/256-512")  # the models behind Table 6's "D+E" rows


def table(number: int) -> list[PaperResult]:
    """The published rows of Table `number` (3, 4, 5 or 6), in the paper's order."""
    rows = [r for r in RESULTS if r.table == number]
    if not rows:
        raise ValueError(f"the paper has no results table {number}; use 3, 4, 5 or 6")
    return rows


def single_test_scale(train_scale: str) -> int:
    """Table 3's Q for a training scale: Q = S for fixed S, the middle of [S_min;S_max] when jittered."""
    lo, hi = _bounds(train_scale)
    return (lo + hi) // 2


def multi_test_scales(train_scale: str) -> tuple[int, ...]:
    """Table 4's Q set: {S-32, S, S+32} for fixed S, {S_min, (S_min+S_max)/2, S_max} when jittered."""
    lo, hi = _bounds(train_scale)
    if lo == hi:
        return (lo - 32, lo, lo + 32)
    return (lo, (lo + hi) // 2, hi)


def _bounds(train_scale: str) -> tuple[int, int]:
    parts = train_scale.split("-")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"training scale {train_scale!r} must look like '256' or '256-512'")
    lo, hi = int(parts[0]), int(parts[-1])
    return lo, hi
