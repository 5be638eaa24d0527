"""Evaluation results as data: what was scored (`EvalKey`), per image (`Outcomes`), summed (`Counts`), as a table.

An evaluation scores every validation image under several settings: a protocol (§3.2: single, dense,
multi-crop, combined) at one test scale Q, or with its posteriors averaged over several Q (Table 4). For each
setting and each image it records whether the label is the top-1 and among the top-5 classes. Keeping the
per-image outcome, keyed by the sample's key, rather than only the counts lets two runs scored on the same
images be compared image by image (`vggdist.significance.mcnemar`); the error rates are counts of it.

Outcomes of disjoint slices of the validation set (one per Ray task) are concatenated in the driver;
no torch here, so results can be read and compared without the training stack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vggdist.runmeta import PROTOCOLS
from vggdist.significance import ErrorRate


@dataclass(frozen=True)
class EvalKey:
    """One evaluation setting: `protocol` at test scale Q = scales[0], or averaged over `scales` (Table 4)."""

    protocol: str
    scales: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"unknown evaluation protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}"
            )
        if not self.scales or any(int(q) <= 0 for q in self.scales):
            raise ValueError(f"test scales must be positive integers, got {self.scales!r}")

    @property
    def multiscale(self) -> bool:
        return len(self.scales) > 1


def eval_keys(protocols: Sequence[str], scales: Sequence[int]) -> list[EvalKey]:
    """The settings an evaluation of `protocols` at `scales` scores: for each protocol, every single Q and,
    with several Q, their multi-scale average."""
    if not protocols:
        raise ValueError(f"no evaluation protocol given; choose from {', '.join(PROTOCOLS)}")
    if not scales:
        raise ValueError("an evaluation needs at least one test scale Q")
    qs = tuple(int(q) for q in scales)
    multi = [qs] if len(qs) > 1 else []
    return [EvalKey(p, s) for p in protocols for s in [(q,) for q in qs] + multi]


@dataclass(frozen=True)
class Counts:
    """Images scored and top-1 / top-5 hits among them; error rates in %."""

    n: int
    top1: int
    top5: int

    def _err(self, hits: int) -> float:
        if self.n <= 0:
            raise ValueError("no images were counted; cannot compute error rates")
        return 100.0 * (self.n - hits) / self.n

    @property
    def top1_err(self) -> float:
        return self._err(self.top1)

    @property
    def top5_err(self) -> float:
        return self._err(self.top5)


def in_subset(key: str, fraction: float) -> bool:
    """Whether sample `key` belongs to the stated `fraction` of the images that an expensive protocol scores.

    A hash of the key, not a random draw: every run, worker and process picks the same images, so two runs
    scored on the subset are paired image by image, and the subset does not depend on how the images were split.
    """
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def subset_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """`in_subset` of every key, as a bool array."""
    return np.fromiter((in_subset(k, fraction) for k in keys), dtype=bool, count=len(keys))


@dataclass
class Outcomes:
    """Per-image results: image i has sample key `keys[i]`; `top1[k][i]` / `top5[k][i]` (bool) say whether it was a
    top-1 / top-5 hit under setting k. Every array has one entry per key. A setting scored on a subset of the
    images (`EvalConfig.multicrop_fraction`) has `scored[k]`, True where image i was scored (its hits are False
    elsewhere); a setting without an entry in `scored` scored every image."""

    keys: list[str]
    top1: dict[EvalKey, np.ndarray]
    top5: dict[EvalKey, np.ndarray]
    scored: dict[EvalKey, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # keys of images that did not decode: not scored, not in keys

    def __post_init__(self) -> None:
        if self.top1.keys() != self.top5.keys() or not self.scored.keys() <= self.top1.keys():
            raise RuntimeError(
                "top-1, top-5 and scored outcomes cover different settings"
            )  # internal invariant
        for k in self.top1:
            if not len(self.top1[k]) == len(self.top5[k]) == len(self.keys):
                raise RuntimeError(
                    f"internal error: {k} has outcomes for {len(self.top1[k])} of {len(self.keys)} images"
                )
            if k in self.scored and len(self.scored[k]) != len(self.keys):
                raise RuntimeError(f"internal error: {k} has a scored mask for {len(self.scored[k])} images")

    def scored_mask(self, k: EvalKey) -> np.ndarray:
        """Which images setting `k` scored (all of them unless it ran on a subset)."""
        return self.scored[k] if k in self.scored else np.ones(len(self.keys), dtype=bool)

    @classmethod
    def empty(cls, settings: Iterable[EvalKey]) -> Outcomes:
        settings = list(settings)
        none = np.zeros(0, dtype=bool)
        return cls([], dict.fromkeys(settings, none), dict.fromkeys(settings, none))

    @classmethod
    def concat(cls, parts: Sequence[Outcomes]) -> Outcomes:
        """The outcomes of disjoint sets of images (batches, evaluation slots), in the order given."""
        if not parts:
            raise ValueError("no outcomes to concatenate")
        settings = list(parts[0].top1)
        if any(p.top1.keys() != parts[0].top1.keys() for p in parts):
            raise ValueError("outcomes to concatenate must score the same settings")
        subsets = {k for p in parts for k in p.scored}
        return cls(
            [key for p in parts for key in p.keys],
            {k: np.concatenate([p.top1[k] for p in parts]) for k in settings},
            {k: np.concatenate([p.top5[k] for p in parts]) for k in settings},
            {k: np.concatenate([p.scored_mask(k) for p in parts]) for k in subsets},
            [key for p in parts for key in p.skipped],
        )

    def counts(self) -> dict[EvalKey, Counts]:
        """Images scored and hits of every setting."""
        out = {}
        for k in self.top1:
            mask = self.scored_mask(k)
            out[k] = Counts(int(mask.sum()), int(self.top1[k][mask].sum()), int(self.top5[k][mask].sum()))
        return out


def results_rows(
    counts: Mapping[EvalKey, Counts], scales: Sequence[int], paper_scales: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The results table (`eval_results.json`): one row per setting, protocols in the paper's order, single
    scales before the multi-scale row; errors in % (4 decimals) with their 95 % Wilson interval
    (`top1_lo`/`top1_hi`, `top5_lo`/`top5_hi`) and n, the images counted; the paper-unit scales alongside."""
    to_paper = dict(zip(scales, list(paper_scales) if paper_scales else list(scales), strict=True))

    def order(k: EvalKey) -> tuple:
        return PROTOCOLS.index(k.protocol), k.multiscale, list(k.scales)

    rows = []
    for k in sorted(counts, key=order):
        c = counts[k]
        row: dict[str, Any] = {
            "protocol": k.protocol,
            "scales": list(k.scales),
            "paper_scales": [to_paper[q] for q in k.scales],
        }
        for name, hits in (("top1", c.top1), ("top5", c.top5)):
            row[f"{name}_err"] = round(getattr(c, f"{name}_err"), 4)  # raises when no image was counted
            lo, hi = ErrorRate(c.n - hits, c.n).ci
            row[f"{name}_lo"], row[f"{name}_hi"] = round(lo, 4), round(hi, 4)
        row["n"] = c.n
        rows.append(row)
    return rows


def results_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results table as a person reads it: error % [95 % Wilson interval] on n images, per setting."""

    def err(r: Mapping[str, Any], name: str) -> str:
        lo, hi = r.get(f"{name}_lo"), r.get(f"{name}_hi")
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
        return f"{r[f'{name}_err']:.2f}{ci}"

    def qs(values: Sequence[int]) -> str:
        return ",".join(str(q) for q in values)

    lines = [
        "| protocol | Q | paper Q | top-1 err % [95% CI] | top-5 err % [95% CI] | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = str(r["n"]) + (f" (+{r['skipped']} skipped)" if r.get("skipped") else "")
        paper_q = qs(r.get("paper_scales") or r["scales"])
        lines.append(
            f"| {r['protocol']} | {qs(r['scales'])} | {paper_q} | {err(r, 'top1')} | {err(r, 'top5')} | {n} |"
        )
    return "\n".join(lines) + "\n"
