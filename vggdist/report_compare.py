"""Paired comparisons between evaluated runs of a sweep, recomputed from their per-image outcomes.

Two settings (a run, or a fusion, under one protocol at one set of test scales) are compared only when they scored
the same images: the per-image top-1 hits stored by every evaluation (`vggdist.outcome_file`) are matched by sample
key, and McNemar's exact test (`vggdist.significance`) says whether the difference is larger than the noise of
those images. A setting scored on a stated subset (multi-crop on `eval.multicrop_fraction` of the images) is
compared on that subset, both sides restricted to it. Settings scored on different test sets (different data
manifests, or image sets neither of which contains the other) are refused with a note, never compared.

The families of comparisons follow the paper (generic over configurations, so other model families reuse them):
depth (deeper vs the next shallower at the same training scale, Table 3), multi-scale vs single-scale test
(Table 4 vs 3), scale jittering vs a fixed S (same configuration, Table 3), multi-crop & dense vs each alone
(Table 5), the fusion vs its best single member (Table 6), and the staged init (from a shallower net vs a random
init of the same configuration and scale, §3.1). Pure data: `vggdist.report` reads the runs from MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vggdist import paper, runmeta
from vggdist.outcome_file import OutcomeFile, RowOutcome
from vggdist.runmeta import COMBINED, DENSE, MULTICROP
from vggdist.significance import ErrorRate, PairedComparison, mcnemar_arrays

METRIC = "top1"  # the paper's headline error; top-5 is in the tables
NOT_PAIRED = "not paired"
RANDOM_INITS = ("normal", "glorot")  # `run.init` values that start from scratch (no staged init)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a setting's per-image outcomes, labelled for people."""

    label: str
    row: RowOutcome
    manifest: str | None = None  # the test set's manifest hash, where the evaluation recorded it
    split: str = "val"
    total: int | None = None  # images in its evaluation (its largest row): more than row.n on a stated subset


def qs_label(qs: Iterable[int]) -> str:
    return ",".join(str(q) for q in qs)


def run_side(run: dict[str, Any], protocol: str, paper_qs: Sequence[int]) -> Side | None:
    """`run`'s outcomes under `protocol` at paper-unit test scales `paper_qs`, or None if it has none."""
    f: OutcomeFile | None = run.get("outcomes")
    row = f.find(protocol, paper_qs) if f else None
    if row is None:
        return None
    label = f"{run['label']} {paper.PROTOCOL_LABELS.get(protocol, protocol)} Q={qs_label(paper_qs)}"
    total = max(r.n for r in f.rows.values())
    return Side(label, row, f.meta.get(runmeta.TAG_MANIFEST), f.meta.get("split", "val"), total)


def pair(a: Side, b: Side) -> tuple[PairedComparison | None, str]:
    """McNemar of b against a on the images both scored, or (None, why they are not paired)."""
    if a.manifest and b.manifest and a.manifest != b.manifest:
        return None, "scored on different test sets (their data manifests differ)"
    ka, kb = a.row.keys.tolist(), b.row.keys.tolist()
    sa, sb = set(ka), set(kb)
    if sa <= sb:
        common = ka
    elif sb <= sa:
        common = kb
    else:
        return None, (
            f"not scored on the same images ({len(sa - sb)} only in {a.label}, {len(sb - sa)} only in {b.label})"
        )
    ha = dict(zip(ka, a.row.hits(METRIC).tolist(), strict=True))
    hb = dict(zip(kb, b.row.hits(METRIC).tolist(), strict=True))
    result = mcnemar_arrays([ha[k] for k in common], [hb[k] for k in common])
    note = "" if sa == sb else f"on the {len(common)} images both scored (a stated subset of the test set)"
    return result, note


def compare(family: str, a: Side, b: Side, *, b_better: bool = True) -> dict[str, Any]:
    """One row of the comparisons table: b against a (Δ = b − a, pt of top-1 error; the paper expects b better
    when `b_better`). Unpaired sides get label and verdict `NOT_PAIRED` and the reason in `note`."""
    result, note = pair(a, b)
    row: dict[str, Any] = {
        "family": family,
        "a": a.label,
        "b": b.label,
        "metric": "top-1 error %",
        "note": note,
    }
    if result is None:
        for who, side in (("a", a), ("b", b)):
            row.update(_rate(who, ErrorRate(int(side.row.n - side.row.hits(METRIC).sum()), side.row.n)))
        return {**row, "n": None, "delta": None, "delta_lo": None, "delta_hi": None, "p_value": None,
                "label": NOT_PAIRED, "verdict": NOT_PAIRED, "test_set": None}  # fmt: skip
    lo, hi = result.delta_ci
    subset = bool(note) or any(side.total is not None and result.n < side.total for side in (a, b))
    row.update(_rate("a", ErrorRate(result.a_errors, result.n)))
    row.update(_rate("b", ErrorRate(result.b_errors, result.n)))
    row.update(
        n=result.n,
        a_only_right=result.a_only_right,
        b_only_right=result.b_only_right,
        delta=result.delta,
        delta_lo=lo,
        delta_hi=hi,
        p_value=result.p_value,
        label=result.label,
        verdict=result.verdict(b_better),
        test_set=f"{a.split}: {result.n} images" + (" (stated subset)" if subset else ""),
    )
    return row


def _rate(who: str, e: ErrorRate) -> dict[str, Any]:
    lo, hi = e.ci
    return {f"{who}_err": e.percent, f"{who}_lo": lo, f"{who}_hi": hi, f"{who}_n": e.n}


# ------------------------------------------------------------------------------------------- the families


def depth_key(config: str) -> tuple:
    """Order of configurations by depth (Table 1), the paper's column order among equals."""
    order = paper.CONFIG_ORDER.index(config) if config in paper.CONFIG_ORDER else len(paper.CONFIG_ORDER)
    return paper.WEIGHT_LAYERS.get(config, 999), order, config


def is_jittered(train_scale: str) -> bool:
    return "-" in train_scale


def single_q(run: dict[str, Any]) -> tuple[int, ...]:
    return (paper.single_test_scale(run["train_scale"]),)


def multi_q(run: dict[str, Any]) -> tuple[int, ...]:
    return paper.multi_test_scales(run["train_scale"])


def depth_pairs(canonical: Sequence[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(shallower, next deeper) canonical runs at each training scale; A-LRN (an LRN ablation) left out."""
    out = []
    for scale in dict.fromkeys(r["train_scale"] for r in canonical):
        nets = sorted(
            (r for r in canonical if r["train_scale"] == scale and r["config"] != "A-LRN"),
            key=lambda r: depth_key(r["config"]),
        )
        out += list(zip(nets, nets[1:], strict=False))
    return out


def jitter_twins(runs: Sequence[dict[str, Any]], jittered: dict[str, Any]) -> list[dict[str, Any]]:
    """The fixed-S runs to compare a jittered run with: those started from the same weights (the controlled
    twin), else the fixed-S run it was fine-tuned from, else every fixed-S run of its configuration."""
    fixed = [r for r in runs if r["config"] == jittered["config"] and not is_jittered(r["train_scale"])]
    src = jittered.get("init_from")
    twins = [r for r in fixed if src and r.get("init_from") == src]
    return twins or [r for r in fixed if r["run_id"] == src] or [r for r in fixed if r.get("canonical", True)]


def staged_pairs(runs: Sequence[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(random init, staged init from a shallower net) runs of the same configuration and training scale."""
    out = []
    for staged in runs:
        if staged.get("init") != "from-shallower":
            continue
        for rnd in runs:
            same = (rnd["config"], rnd["train_scale"]) == (staged["config"], staged["train_scale"])
            if same and rnd.get("init") in RANDOM_INITS:
                out.append((rnd, staged))
    return out


def fusion_sides(
    fusion_row: dict[str, Any], fusion_file: OutcomeFile | None, runs_by_id: dict[str, dict]
) -> tuple[Side | None, list[Side], list[str]]:
    """A fusion row's side, its members' sides at the same setting, and members without one."""
    qs = fusion_row.get("paper_scales") or fusion_row["scales"]
    protocol = fusion_row["protocol"]
    fused = None
    if fusion_file is not None and (row := fusion_file.find(protocol, qs)) is not None:
        label = f"fusion {' + '.join(fusion_row['models'])} {paper.PROTOCOL_LABELS.get(protocol, protocol)} Q={qs_label(qs)}"
        fused = Side(
            label, row, fusion_file.meta.get(runmeta.TAG_MANIFEST), fusion_file.meta.get("split", "val")
        )
    members, missing = [], []
    for rid, model in zip(fusion_row.get("run_ids", []), fusion_row["models"], strict=False):
        s = run_side(runs_by_id[rid], protocol, qs) if rid in runs_by_id else None
        (members.append(s) if s else missing.append(model))
    return fused, members, missing


def best(sides: Sequence[Side]) -> Side:
    return min(sides, key=lambda s: (s.row.n - s.row.hits(METRIC).sum()) / s.row.n)


def comparisons(
    runs: Sequence[dict[str, Any]], fusion: Sequence[tuple[dict[str, Any], OutcomeFile | None]]
) -> list[dict[str, Any]]:
    """Every paired comparison this sweep allows, family by family (see the module docstring).

    `runs`: evaluated runs with "label", "config", "train_scale", "run_id", "outcomes" (an `OutcomeFile`),
    "canonical" (False for a second run of the same configuration and scale, e.g. a random-init ablation),
    "init" and "init_from"; `fusion`: (fusion result row, its outcomes file) pairs."""
    rows: list[dict[str, Any]] = []
    runs = [r for r in runs if r.get("outcomes") is not None]
    canonical = [r for r in runs if r.get("canonical", True)]

    def add(family: str, a: Side | None, b: Side | None, b_better: bool = True) -> None:
        if a is not None and b is not None:
            rows.append(compare(family, a, b, b_better=b_better))

    at: Callable[[dict, str, Sequence[int]], Side | None] = run_side
    for shallow, deep in depth_pairs(canonical):
        add("depth (Table 3)", at(shallow, DENSE, single_q(shallow)), at(deep, DENSE, single_q(deep)))
    for r in runs:
        add(
            "multi-scale vs single-scale test (Tables 3-4)",
            at(r, DENSE, single_q(r)),
            at(r, DENSE, multi_q(r)),
        )
    for r in runs:
        if is_jittered(r["train_scale"]):
            for fixed in jitter_twins(runs, r):
                add(
                    "scale jittering vs fixed S (Table 3)",
                    at(fixed, DENSE, single_q(fixed)),
                    at(r, DENSE, single_q(r)),
                )
    for r in runs:
        for other in (DENSE, MULTICROP):
            add(f"multi-crop & dense vs {paper.PROTOCOL_LABELS[other]} (Table 5)",
                at(r, other, multi_q(r)), at(r, COMBINED, multi_q(r)))  # fmt: skip
    by_id = {r["run_id"]: r for r in runs}
    for frow, ffile in fusion:
        fused, members, _ = fusion_sides(frow, ffile, by_id)
        if fused is not None and members:
            add("fusion vs best single member (Table 6)", best(members), fused)
    for rnd, staged in staged_pairs(runs):
        add(
            "staged init vs random init (§3.1)",
            at(rnd, DENSE, single_q(rnd)),
            at(staged, DENSE, single_q(staged)),
        )
    return rows
