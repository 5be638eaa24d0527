"""`vggdist report`'s outputs: the tables of `vggdist.report_tables` as Markdown and CSV, and the error-vs-depth plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vggdist import paper
from vggdist.report_tables import row_order
from vggdist.runmeta import DENSE

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
    tables: dict[str, list[dict]], sweep: dict[str, Any], experiment: str, plan: str, runs: list[dict]
) -> str:
    """All four tables, a header naming the sweep, and the list of child runs, as one Markdown string."""
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
        "**Plan `mini`:** trained and evaluated on Fashion-MNIST-scale data (32-pixel crops, scales shrunk "
        "by 32/224 and labelled with their paper equivalents); ours and the paper's numbers are comparable "
        "in layout and trends only, not in value."
    )
    if plan == "mini":
        lines += [mini_note, ""]
    for number in ("3", "4", "5", "6"):
        n = int(number)
        lines += [f"## {TABLE_TITLES[n]}", "", TABLE_NOTES[n]]
        if plan == "mini":
            lines[-1] += " Mini plan: Fashion-MNIST-scale data, not comparable in value."
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


def plot_error_vs_depth(tables: dict[str, list[dict]], path: str | os.PathLike, mini: bool = False) -> None:
    """Top-1 and top-5 error against depth (Table 1 weight layers), one colour per protocol / train scale;
    ours solid, the paper dashed. x is the configuration, ordered by depth, labelled with its layer count
    (C and D both have 16 layers; A-LRN is A plus LRN)."""
    # (table, train scale order, label) -> {"ours_top1": {config: err}, "paper_top5": {...}, ...}
    series: dict[tuple, dict[str, dict[str, float]]] = {}
    for number in ("3", "4", "5"):
        for r in tables[number]:
            if number == "5" and r["protocol"] == DENSE:
                continue  # the same numbers as Table 4's multi-scale dense rows
            if r["config"] not in paper.WEIGHT_LAYERS:
                continue
            what = {"3": "single Q, dense", "4": "multi Q, dense"}.get(number)
            what = what or f"multi Q, {paper.PROTOCOL_LABELS.get(r['protocol'], r['protocol'])}"
            key = (number, row_order(("", r["train_scale"], r["protocol"], ()))[2:5], what, r["train_scale"])
            points = series.setdefault(key, {})
            for who in ("ours", "paper"):
                for k in ("top1", "top5"):
                    if r[f"{who}_{k}"] is not None:
                        points.setdefault(f"{who}_{k}", {})[r["config"]] = r[f"{who}_{k}"]

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(1, 2)
    xs = {c: i for i, c in enumerate(paper.CONFIG_ORDER)}
    handles = []
    for color, ((_, _, what, train_scale), points) in enumerate(sorted(series.items())):
        label = f"S={_scale_label(train_scale)}, {what}"
        for ax, k in zip(axes, ("top1", "top5"), strict=True):
            for who, style in (("ours", "-o"), ("paper", "--x")):
                pts = points.get(f"{who}_{k}", {})
                configs = sorted(pts, key=xs.__getitem__)
                ax.plot(
                    [xs[c] for c in configs],
                    [pts[c] for c in configs],
                    style,
                    color=f"C{color % 10}",
                    alpha=1.0 if who == "ours" else 0.6,
                )
        handles.append(Line2D([], [], color=f"C{color % 10}", linewidth=4, label=label))
    for ax, k in zip(axes, ("top-1", "top-5"), strict=True):
        ax.set_xticks(range(len(xs)), [f"{c}\n{paper.WEIGHT_LAYERS[c]}" for c in xs])
        ax.set_xlabel("ConvNet configuration / weight layers")
        ax.set_ylabel(f"{k} error (%)")
        ax.set_title(f"{k} validation error vs depth" + (" (mini plan: Fashion-MNIST scale)" if mini else ""))
        ax.grid(alpha=0.3)
    style_keys = [
        Line2D([], [], color="black", linestyle="-", marker="o", label="ours (solid)"),
        Line2D([], [], color="black", linestyle="--", marker="x", alpha=0.6, label="paper (dashed)"),
    ]
    fig.legend(handles=handles + style_keys, loc="outside lower center", ncols=3, fontsize="small")
    fig.savefig(path, dpi=100)
