"""The paper's published numbers, as data: Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015, arXiv:1409.1556v6.

Table 1 gives each ConvNet configuration's depth (weight layers). Tables 3-6 give ILSVRC-2012 *validation*
top-1 / top-5 error in %; Table 6 also gives one test-set top-5 error per row where the paper lists one.
Dense evaluation (§3.2) is the paper's default test protocol for Tables 3 and 4.

Scales are written in the paper's pixels (crop 224): a fixed training scale S is "256" or "384" (or the
tuple (256,)), the jittered S in [256;512] is "256-512" (or (256, 512)); test scales Q are tuples of ints.
`to_crop` maps them to another crop size, e.g. the mini scale's 32. `vggdist report` puts the published
numbers next to an experiment's own, which its runs label with the same paper-equivalent scales.

The two network scales of the same protocol live here too (`SCALES`): the paper's (Table 1 widths, FC 4096,
224 crops) and `mini`, the protocol shrunk so it trains on 2 CPU cores in minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Table 1: weight layers (conv + FC) of each configuration, and its conv widths per block (§2.1).
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
CONFIG_ORDER = tuple(WEIGHT_LAYERS)
WIDTHS = (64, 128, 256, 512, 512)
FC_WIDTH = 4096
CROP = 224  # the training crop, and the unit of every scale in this module
TRAIN_SCALE_ORDER = ("256", "384", "256-512")

# The same protocol at two scales. Five 2x2 max-pools divide the crop by 32, so a crop must be a multiple of
# 32: at crop 32 the last feature map is 1x1 and fc6 a plain (C -> fc_width) layer, a 1x1 conv in dense mode.
# Each entry is `vggdist.models.build_vgg`'s keyword arguments.
SCALES: dict[str, dict] = {
    "paper": {"widths": WIDTHS, "fc_width": FC_WIDTH, "crop_size": CROP},
    "mini": {"widths": (16, 32, 64, 128, 128), "fc_width": 256, "crop_size": 32},
}

# The test protocols of §3.2 / §4.3 (and He et al.'s 10-crop) under the names used in metrics and
# eval_results.json.
PROTOCOL_LABELS = {
    "single": "single crop",
    "tencrop": "10-crop",
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


def to_crop(scale: int, crop_size: int) -> int:
    """A paper scale (S or Q, pixels at crop 224) at another crop, in the same ratio: 256 -> 37 at crop 32."""
    return round(scale * crop_size / CROP)


def scale_label(train_scale: Sequence[int]) -> str:
    """(256,) -> "256", (256, 512) -> "256-512": the label of a training scale in tags and tables."""
    return "-".join(str(int(s)) for s in train_scale)


def single_test_scale(train_scale: str | Sequence[int]) -> int:
    """Table 3's Q for a training scale: Q = S for fixed S, the middle of [S_min;S_max] when jittered."""
    lo, hi = _bounds(train_scale)
    return (lo + hi) // 2


def multi_test_scales(train_scale: str | Sequence[int]) -> tuple[int, ...]:
    """Table 4's Q set: {S-32, S, S+32} for fixed S, {S_min, (S_min+S_max)/2, S_max} when jittered."""
    lo, hi = _bounds(train_scale)
    if lo == hi:
        return (lo - 32, lo, lo + 32)
    return (lo, (lo + hi) // 2, hi)


def _bounds(train_scale: str | Sequence[int]) -> tuple[int, int]:
    if not isinstance(train_scale, str):
        train_scale = scale_label(train_scale)
    parts = train_scale.split("-")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"training scale {train_scale!r} must look like '256' or '256-512'")
    lo, hi = int(parts[0]), int(parts[-1])
    return lo, hi
