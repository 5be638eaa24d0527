"""`vggdist report`'s plots: error against depth with 95 % intervals, and the training curves of every stage."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vggdist import paper
from vggdist.report_tables import row_order
from vggdist.runmeta import DENSE, TRAIN_TOP1_ERR, VAL_TOP1_ERR


def _scale_label(train_scale: str) -> str:
    return f"[{train_scale.replace('-', ';')}]" if "-" in train_scale else train_scale


def plot_error_vs_depth(tables: dict[str, list[dict]], path: str | os.PathLike, mini: bool = False) -> None:
    """Top-1 and top-5 error against depth (Table 1 weight layers), one colour per protocol / train scale;
    ours solid with its 95 % Wilson intervals as error bars, the paper dashed. x is the configuration, ordered by depth, labelled with its layer count
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
                        lo, hi = r.get(f"{who}_{k}_lo"), r.get(f"{who}_{k}_hi")
                        if who == "ours" and lo is not None and hi is not None:
                            points.setdefault(f"ci_{k}", {})[r["config"]] = (lo, hi)

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
                x, y = [xs[c] for c in configs], [pts[c] for c in configs]
                ci = points.get(f"ci_{k}", {})
                if who == "ours" and all(c in ci for c in configs):  # 95 % Wilson intervals as error bars
                    yerr = [[pts[c] - ci[c][0] for c in configs], [ci[c][1] - pts[c] for c in configs]]
                    ax.errorbar(x, y, yerr=yerr, fmt=style, color=f"C{color % 10}", capsize=3)
                else:
                    ax.plot(x, y, style, color=f"C{color % 10}", alpha=1.0 if who == "ours" else 0.6)
        handles.append(Line2D([], [], color=f"C{color % 10}", linewidth=4, label=label))
    for ax, k in zip(axes, ("top-1", "top-5"), strict=True):
        ax.set_xticks(range(len(xs)), [f"{c}\n{paper.WEIGHT_LAYERS[c]}" for c in xs])
        ax.set_xlabel("ConvNet configuration / weight layers")
        ax.set_ylabel(f"{k} error (%)")
        ax.set_title(f"{k} validation error vs depth" + (" (mini plan: Fashion-MNIST scale)" if mini else ""))
        ax.grid(alpha=0.3)
    style_keys = [
        Line2D([], [], color="black", linestyle="-", marker="o", label="ours (solid, 95% CI bars)"),
        Line2D([], [], color="black", linestyle="--", marker="x", alpha=0.6, label="paper (dashed)"),
    ]
    fig.legend(handles=handles + style_keys, loc="outside lower center", ncols=3, fontsize="small")
    fig.savefig(path, dpi=100)


def plot_training_curves(runs: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Train and validation top-1 error per epoch, one line per stage (its colour in both panels), from each run's
    MLflow metric history (`history`: metric -> [(epoch, value)]). Shows whether each net was compared at
    convergence or still falling."""
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    drawn = 0
    for i, run in enumerate(runs):
        label = run.get("label") or run.get("stage") or run["run_id"][:8]
        for ax, key in zip(axes, (TRAIN_TOP1_ERR, VAL_TOP1_ERR), strict=True):
            points = run.get("history", {}).get(key) or []
            if points:
                ax.plot(
                    [e for e, _ in points],
                    [v for _, v in points],
                    "-o",
                    ms=3,
                    color=f"C{i % 10}",
                    label=label,
                )
                drawn += 1
    for ax, what in zip(axes, ("training", "validation"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(f"{what} top-1 error per epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 error (%)")
    if drawn:
        axes[1].legend(fontsize="small")
    else:
        axes[0].text(0.5, 0.5, "no per-epoch metrics logged", ha="center", transform=axes[0].transAxes)
    fig.savefig(path, dpi=100)
