"""The report's Findings: one row per claim of the paper, with the paper's numbers, ours with their 95 % intervals
and n, the paired test used, and a verdict.

Verdicts (`vggdist.significance`): *reproduced* — ours moves in the paper's direction and McNemar's exact test
says the difference is significant (p < 0.05); *not reproduced* — significantly the other way; *within noise* —
not significant either way (this test set cannot tell the two apart); *not measured in this plan* — the sweep did
not train or evaluate what the claim needs; *not paired* — the two sides were not scored on the same images, so
no paired test applies. Each row names the test set (and the stated subset, where multi-crop scored one); nothing
here re-evaluates or picks among evaluations to make a verdict come out.

The claims (Simonyan & Zisserman 2015): depth helps (A → B → D, → E; Table 3); the staged init from A reaches a
given error in fewer epochs than a random init (§3.1); scale jittering beats a fixed S (Table 3); multi-scale
test beats single scale (Table 4 vs 3); multi-crop & dense combined beats either alone (Table 5); the fusion beats
the best single net (Table 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vggdist import paper, runmeta
from vggdist.outcome_file import OutcomeFile
from vggdist.report_compare import (
    NOT_PAIRED,
    best,
    compare,
    depth_key,
    fusion_sides,
    is_jittered,
    jitter_twins,
    multi_q,
    run_side,
    single_q,
    staged_pairs,
)
from vggdist.runmeta import COMBINED, DENSE, MULTICROP, VAL_TOP1_ERR
from vggdist.significance import NOT_REPRODUCED, REPRODUCED, WITHIN_NOISE

NOT_MEASURED = "not measured in this plan"
CLAIMS = (
    "depth helps",
    "staged init from A reaches a given error in fewer epochs than random init",
    "scale jittering beats a fixed S",
    "multi-scale test beats single scale",
    "multi-crop & dense combined beats either alone",
    "fusion beats the best single net",
)
FIELDS = (
    "claim",
    "paper",
    "ours",
    "test",
    "test_set",
    "delta",
    "delta_lo",
    "delta_hi",
    "p_value",
    "verdict",
    "note",
)


def _paper(table: int, config: str, train_scale: str, protocol: str = DENSE) -> float | None:
    for r in paper.table(table):
        if (r.config, r.train_scale, r.protocol) == (config, train_scale, protocol):
            return r.top1_err
    return None


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _err(c: dict[str, Any], who: str) -> str:
    return f"{c[f'{who}_err']:.2f} [{c[f'{who}_lo']:.2f}, {c[f'{who}_hi']:.2f}]"


def _row(claim: str, paper_text: str, c: dict[str, Any] | None, *, ours: str = "", note: str = "",
         verdict: str | None = None) -> dict[str, Any]:  # fmt: skip
    """A findings row from comparison `c` (b against a); `NOT_MEASURED` without one."""
    row = dict.fromkeys(FIELDS)
    row.update(claim=claim, paper=paper_text, note=note)
    if c is None:
        return {**row, "ours": ours or "—", "test": "—", "verdict": NOT_MEASURED}
    both = f"{c['a']}: {_err(c, 'a')} → {c['b']}: {_err(c, 'b')}"
    row.update(
        ours=f"{both}{'; ' + ours if ours else ''}",
        test="McNemar (exact), top-1, paired by image",
        test_set=c["test_set"],
        delta=c["delta"],
        delta_lo=c["delta_lo"],
        delta_hi=c["delta_hi"],
        p_value=c["p_value"],
        verdict=verdict or c["verdict"],
        note="; ".join(x for x in (note, c["note"]) if x),
    )
    return row


def findings(
    runs: Sequence[dict[str, Any]], fusion: Sequence[tuple[dict[str, Any], OutcomeFile | None]]
) -> list[dict[str, Any]]:
    """One row per claim in `CLAIMS` (inputs as `vggdist.report_compare.comparisons` takes them); each row has
    the keys of `FIELDS` (delta in pt of top-1 error, the second side minus the first)."""
    without = [r for r in runs if r.get("outcomes") is None]
    runs = [r for r in runs if r.get("outcomes") is not None]
    # deepest first; at equal depth the jittered run (the paper's Tables 4-6 use the jittered nets)
    by_depth = sorted(
        runs, key=lambda r: (depth_key(r["config"]), is_jittered(r["train_scale"])), reverse=True
    )
    rows = [
        _depth([r for r in runs if r.get("canonical", True)]),
        _staged(runs),
        _jitter(runs, by_depth),
        _multiscale(by_depth),
        _combined(by_depth),
        _fusion(runs, fusion),
    ]
    if without:  # e.g. evaluated by a vggdist that did not record per-image outcomes yet
        hint = "no per-image outcomes ({}) for {}: rerun `vggdist evaluate --run RUN_ID` on them".format(
            runmeta.EVAL_OUTCOMES, ", ".join(f"{r.get('label', '?')} ({r.get('run_id', '?')})" for r in without)
        )
        for row in rows:
            if row["verdict"] == NOT_MEASURED:
                row["note"] = "; ".join(x for x in (row["note"], hint) if x)
    return rows


def _depth(canonical: list[dict[str, Any]]) -> dict[str, Any]:
    claim = CLAIMS[0]
    scales = [s for s in dict.fromkeys(r["train_scale"] for r in canonical) if any(
        r["config"] == "A" and r["train_scale"] == s for r in canonical)]  # fmt: skip
    for s in scales:
        nets = sorted((r for r in canonical if r["train_scale"] == s and r["config"] != "A-LRN"),
                      key=lambda r: depth_key(r["config"]))  # fmt: skip
        if len(nets) < 2:
            continue
        a, b = nets[0], nets[-1]
        chain = [(r["config"], run_side(r, DENSE, single_q(r))) for r in nets]
        ours = "chain " + ", ".join(f"{c} {sd.row.error_rate().format(2)}" for c, sd in chain if sd)
        paper_text = ", ".join(f"{r['config']} {_p(_paper(3, r['config'], s))}" for r in nets)
        paper_text = f"Table 3, S={s}, dense: {paper_text}"
        sa, sb = run_side(a, DENSE, single_q(a)), run_side(b, DENSE, single_q(b))
        if sa and sb:
            return _row(
                f"{claim} ({a['config']} → {b['config']})", paper_text, compare("depth", sa, sb), ours=ours
            )
    return _row(claim, "Table 3: A 29.6 → B 28.7 → D 27.0 → E 27.3 (S=256)", None,
                note="needs A and a deeper net at the same training scale")  # fmt: skip


def _epochs_to(run: dict[str, Any], target: float) -> int | None:
    for epoch, err in run.get("history", {}).get(VAL_TOP1_ERR, []):
        if err <= target:
            return int(epoch)
    return None


def _staged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    claim = CLAIMS[1]
    paper_text = "§3.1: deeper nets initialised from A (no number published)"
    pairs = sorted(staged_pairs(runs), key=lambda p: depth_key(p[1]["config"]), reverse=True)
    by_id = {r["run_id"]: r for r in runs}
    for rnd, staged in pairs:
        sa, sb = run_side(rnd, DENSE, single_q(rnd)), run_side(staged, DENSE, single_q(staged))
        if not (sa and sb):
            continue
        c = compare("staged init", sa, sb)
        val = [v for _, v in rnd.get("history", {}).get(VAL_TOP1_ERR, [])]
        if not val:
            return _row(claim, paper_text, c, note="no validation history: epochs to reach not measured")
        target = min(val)
        e_rnd, e_staged = _epochs_to(rnd, target), _epochs_to(staged, target)
        src = by_id.get(staged.get("init_from") or "")
        pre = len(src.get("history", {}).get(VAL_TOP1_ERR, [])) if src else None
        ours = (
            f"epochs to reach the random-init run's best validation error ({target:.2f} %): staged "
            f"{e_staged if e_staged is not None else 'never'}"
            + (f" (+ {pre} epochs of {src['config']})" if pre else "")
            + f", random {e_rnd}"
        )
        return _row(
            claim, paper_text, c, ours=ours, note="verdict from the final test errors at the same budget"
        )
    return _row(
        claim, paper_text, None, note="needs a staged-init and a random-init run of one configuration"
    )


def _jitter(runs: list[dict[str, Any]], by_depth: list[dict[str, Any]]) -> dict[str, Any]:
    claim = CLAIMS[2]
    for j in (r for r in by_depth if is_jittered(r["train_scale"])):
        for fixed in jitter_twins(runs, j):
            sa, sb = run_side(fixed, DENSE, single_q(fixed)), run_side(j, DENSE, single_q(j))
            if sa and sb:
                cfg = j["config"]
                paper_text = (f"Table 3, {cfg} dense: S={fixed['train_scale']} {_p(_paper(3, cfg, fixed['train_scale']))}"
                              f" → S=[{j['train_scale'].replace('-', ';')}] {_p(_paper(3, cfg, j['train_scale']))}")  # fmt: skip
                note = (
                    "the jittered net was fine-tuned from this fixed-S run, so it also trained longer"
                    if fixed["run_id"] == j.get("init_from")
                    else ""
                )
                return _row(claim, paper_text, compare("jitter", sa, sb), note=note)
    return _row(claim, "Table 3, D dense: S=256 27.0 → S=[256;512] 25.6", None,
                note="needs a jittered and a fixed-S run of one configuration")  # fmt: skip


def _multiscale(by_depth: list[dict[str, Any]]) -> dict[str, Any]:
    claim = CLAIMS[3]
    for r in sorted(
        by_depth, key=lambda r: not is_jittered(r["train_scale"])
    ):  # jittered first, deepest first
        sa, sb = run_side(r, DENSE, single_q(r)), run_side(r, DENSE, multi_q(r))
        if sa and sb:
            cfg, s = r["config"], r["train_scale"]
            paper_text = (
                f"{cfg}/S={s} dense: Table 3 {_p(_paper(3, cfg, s))} → Table 4 {_p(_paper(4, cfg, s))}"
            )
            return _row(claim, paper_text, compare("multi-scale", sa, sb))
    return _row(claim, "D/S=[256;512] dense: Table 3 25.6 → Table 4 24.8", None,
                note="needs a run evaluated at one and at several test scales")  # fmt: skip


def _combined(by_depth: list[dict[str, Any]]) -> dict[str, Any]:
    claim = CLAIMS[4]
    for r in by_depth:
        qs = multi_q(r)
        both = run_side(r, COMBINED, qs)
        alone = [(p, run_side(r, p, qs)) for p in (DENSE, MULTICROP)]
        if both is None or any(s is None for _, s in alone):
            continue
        cs = [compare("combined", s, both) for _, s in alone]
        verdicts = {c["verdict"] for c in cs}
        if NOT_PAIRED in verdicts:
            verdict = NOT_PAIRED
        elif NOT_REPRODUCED in verdicts:
            verdict = NOT_REPRODUCED
        else:
            verdict = REPRODUCED if verdicts == {REPRODUCED} else WITHIN_NOISE
        cfg, s = r["config"], r["train_scale"]
        paper_text = "Table 5, {}/S={}: dense {}, multi-crop {}, combined {}".format(
            cfg, s, *(_p(_paper(5, cfg, s, p)) for p in (DENSE, MULTICROP, COMBINED))
        )
        # the Δ and p columns show the comparison that decides the verdict (the larger p); "ours" the other one
        d = max((0, 1), key=lambda i: -1.0 if cs[i]["p_value"] is None else cs[i]["p_value"])
        other, other_name = cs[1 - d], ("dense", "multi-crop")[1 - d]
        row = _row(claim, paper_text, cs[d], verdict=verdict,
                   ours=f"vs {other_name}: {_err(other, 'a')} → {_err(other, 'b')}, Δ {_delta(other)}, "
                        f"p = {_pval(other)}, on {other['test_set'] or '—'}",
                   note="reproduced only if combined beats both significantly")  # fmt: skip
        if verdict == NOT_PAIRED:
            row["p_value"] = None
        return row
    return _row(claim, "Table 5, D/S=[256;512]: dense 24.8, multi-crop 24.6, combined 24.4", None,
                note="needs a run scored with dense, multi-crop and combined")  # fmt: skip


def _delta(c: dict[str, Any]) -> str:
    return "—" if c["delta"] is None else f"{c['delta']:+.2f} [{c['delta_lo']:+.2f}, {c['delta_hi']:+.2f}] pt"


def _pval(c: dict[str, Any]) -> str:
    return "—" if c["p_value"] is None else f"{c['p_value']:.3g}"


def _fusion(
    runs: list[dict[str, Any]], fusion: Sequence[tuple[dict[str, Any], OutcomeFile | None]]
) -> dict[str, Any]:
    claim = CLAIMS[5]
    order = {COMBINED: 0, DENSE: 1, MULTICROP: 2}
    by_id = {r["run_id"]: r for r in runs}
    for frow, ffile in sorted(fusion, key=lambda f: order.get(f[0]["protocol"], 9)):
        fused, members, missing = fusion_sides(frow, ffile, by_id)
        if fused is None or not members:
            continue
        p = frow["protocol"]
        single = [v for m in paper.FUSION_MODELS if (v := _paper(5, *m.split("/"), p)) is not None]
        paper_text = (f"Table 6 D+E {paper.PROTOCOL_LABELS.get(p, p)}: {_p(_paper(6, 'D+E', '256-512', p))} vs best "
                      f"single (Table 5) {_p(min(single) if single else None)}")  # fmt: skip
        note = f"members without this setting: {', '.join(missing)}" if missing else ""
        return _row(claim, paper_text, compare("fusion", best(members), fused), note=note)
    return _row(claim, "Table 6 D+E combined 23.7 vs best single (Table 5) 24.4", None,
                note="needs a fusion and a member evaluated at the same setting")  # fmt: skip
