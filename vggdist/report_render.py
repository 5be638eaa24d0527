"""`vggdist report`'s text outputs: the tables of `vggdist.report_tables`, the paired comparisons and the findings as
Markdown, and the tables as CSV (the plots are `vggdist.report_plots`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from vggdist import paper
from vggdist.significance import ALPHA

CSV_COLUMNS = (
    "table",
    "config",
    "train_scale",
    "test_scales",
    "protocol",
    "ours_top1",
    "ours_top1_lo",
    "ours_top1_hi",
    "ours_top5",
    "ours_top5_lo",
    "ours_top5_hi",
    "ours_n",
    "paper_top1",
    "paper_top5",
)
TABLE_TITLES = {
    3: "Table 3: ConvNet performance at a single test scale (dense evaluation)",
    4: "Table 4: ConvNet performance at multiple test scales (dense evaluation)",
    5: "Table 5: ConvNet evaluation techniques comparison (multiple test scales)",
    6: "Table 6: fusion of multiple ConvNets (posteriors averaged)",
}
TABLE_NOTES = {
    3: "Test scale Q = S for fixed S, Q = 384 for S in [256;512].",
    4: "Q in {S-32, S, S+32} for fixed S, Q in {256, 384, 512} for S in [256;512].",
    5: "Q in {256, 384, 512} for S in [256;512] (the paper's rows); other training scales use Table 4's Q.",
    6: "Paper: the post-submission fusion of D/[256;512] and E/[256;512]; "
    "its last column is the ILSVRC-2012 test-set top-5 error.",
}


def _scale_label(train_scale: str) -> str:
    return f"[{train_scale.replace('-', ';')}]" if "-" in train_scale else train_scale


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_ci(r: dict[str, Any], k: str) -> str:
    """'27.40 [25.51, 29.37]': our error % with its 95 % Wilson interval (just the rate when n is unknown)."""
    err, lo, hi = r[f"ours_{k}"], r.get(f"ours_{k}_lo"), r.get(f"ours_{k}_hi")
    if err is None or lo is None or hi is None:
        return _fmt(err, 2)
    return f"{err:.2f} [{lo:.2f}, {hi:.2f}]"


def render_markdown(
    tables: dict[str, list[dict]],
    sweep: dict[str, Any],
    experiment: str,
    plan: str,
    runs: list[dict],
    compared: list[dict] | None = None,
    *,
    mini: bool = False,
) -> str:
    """All four tables, a header naming the sweep, the paired comparisons and the list of child runs, as one
    Markdown string (the findings, `render_findings`, follow it in report.md). `mini`: the runs trained below
    the paper's scale, so a note says the numbers compare in layout and trends only."""
    lines = [
        f"# vggdist report: sweep `{sweep['name']}` ({sweep['run_id']})",
        "",
        f"Experiment `{experiment}`, plan `{plan or '?'}`, sweep status {sweep['status']}. "
        "Top-1 / top-5 classification error (%) on the validation set; *ours* beside the *paper* "
        "(Simonyan & Zisserman, arXiv:1409.1556v6). Ours: error % [95 % Wilson interval] on *images* "
        "(n) held-out images. — : no result.",
        "",
    ]
    mini_note = (
        f"**Plan `{plan}`, reduced scale:** trained and evaluated on Fashion-MNIST-scale data (32-pixel crops, scales shrunk "
        "by 32/224 and labelled with their paper equivalents); ours and the paper's numbers are comparable "
        "in layout and trends only, not in value."
    )
    if mini:
        lines += [mini_note, ""]
    for number in ("3", "4", "5", "6"):
        n = int(number)
        lines += [f"## {TABLE_TITLES[n]}", "", TABLE_NOTES[n]]
        if mini:
            lines[-1] += " Reduced scale: not comparable in value."
        lines.append("")
        if n == 6:
            head = ["models", "train S", "test Q", "protocol"]
        else:
            head = ["ConvNet config.", "train S", "test Q"] + (["protocol"] if n == 5 else [])
        head += ["ours top-1 [95% CI]", "ours top-5 [95% CI]", "paper top-1", "paper top-5"]
        head += ["paper test top-5"] if n == 6 else []
        head += ["images"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in tables[number]:
            cells = [
                " + ".join(r["models"]) if n == 6 else r["config"],
                _scale_label(r["train_scale"]) if "+" not in r["train_scale"] else r["train_scale"],
                ",".join(str(q) for q in r["test_scales"]),
            ]
            if n in (5, 6):
                cells.append(paper.PROTOCOL_LABELS.get(r["protocol"], r["protocol"]))
            cells += [_fmt_ci(r, "top1"), _fmt_ci(r, "top5")]
            cells += [_fmt(r["paper_top1"], 1), _fmt(r["paper_top5"], 1)]
            if n == 6:
                cells.append(_fmt(r["paper_test_top5"], 1))
            cells.append("—" if r["ours_n"] is None else str(r["ours_n"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += render_comparisons(compared or [])
    lines += [
        "## Runs of this sweep",
        "",
        "| stage | config | train S | status | evaluated | run id |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['stage'] or '—'} | {run['config'] or '—'} | {_scale_label(run['train_scale']) or '—'} | "
            f"{run['status']} | {'yes' if run['rows'] else 'no'} | {run['run_id']} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(tables: dict[str, list[dict]], path: Path) -> None:
    """Every table's rows in one CSV (`CSV_COLUMNS`), empty cells where there is no value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for rows in tables.values():
            for r in rows:
                w.writerow(
                    [
                        r["table"],
                        r["config"],
                        r["train_scale"],
                        "-".join(str(q) for q in r["test_scales"]),
                        r["protocol"],
                        *("" if r[c] is None else r[c] for c in CSV_COLUMNS[5:]),
                    ]
                )


def _ci(err: float | None, lo: float | None, hi: float | None) -> str:
    return "—" if err is None else f"{err:.2f} [{lo:.2f}, {hi:.2f}]"


def _delta(r: dict[str, Any]) -> str:
    return (
        "—" if r.get("delta") is None else f"{r['delta']:+.2f} [{r['delta_lo']:+.2f}, {r['delta_hi']:+.2f}]"
    )


def _pvalue(p: float | None) -> str:
    return "—" if p is None else (f"{p:.3g}" if p >= 1e-4 else "< 0.0001")


def render_comparisons(compared: list[dict]) -> list[str]:
    """The paired comparisons section: b against a on the images both scored (McNemar, exact)."""
    lines = [
        "## Paired comparisons (McNemar, exact)",
        "",
        "Top-1 error % [95 % Wilson interval] of each side on the *n* images both scored; Δ = second − first in "
        "percentage points [95 % interval for paired proportions] (negative: the second is better); p: McNemar's "
        f"exact two-sided test. *significant*: p < {ALPHA}; *within noise*: not. Pairs not scored on the same "
        "images are refused (*not paired*).",
        "",
    ]
    if not compared:
        return lines + [
            "No pair of evaluations to compare (a comparison needs the runs' eval_outcomes.npz).",
            "",
        ]
    lines += [
        "| comparison | first | second | first err % | second err % | n | Δ pt [95% CI] | p | label |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in compared:
        n = "—" if r["n"] is None else str(r["n"])
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(
            f"| {r['family']} | {r['a']} | {r['b']} | {_ci(r['a_err'], r['a_lo'], r['a_hi'])} | "
            f"{_ci(r['b_err'], r['b_lo'], r['b_hi'])} | {n} | {_delta(r)} | {_pvalue(r['p_value'])} | {label} |"
        )
    return lines + [""]


def render_findings(found: list[dict]) -> str:
    """The Findings section, the end of report.md and of the demo's output: one row per paper claim."""
    lines = [
        "## Findings",
        "",
        "One row per claim of the paper. *Ours*: top-1 error % [95 % Wilson interval], the first side → the "
        "second; Δ in pt (second − first). Verdict: *reproduced* = the paper's direction and significant "
        f"(McNemar, p < {ALPHA}); *not reproduced* = significantly the other way; *within noise* = not "
        "significant; *not measured in this plan* = the sweep did not train what the claim needs.",
        "",
        "| claim | paper (top-1 err %) | ours | Δ pt [95% CI] | p | test set | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in found:
        ours = f["ours"] + (f" ({f['note']})" if f.get("note") else "")
        lines.append(
            f"| {f['claim']} | {f['paper']} | {ours} | {_delta(f)} | {_pvalue(f['p_value'])} | "
            f"{f['test_set'] or '—'} | **{f['verdict']}** |"
        )
    return "\n".join(lines) + "\n"
