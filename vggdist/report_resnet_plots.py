"""`vggdist report`'s plots of He et al. 2016's study: Figure 4's curves and one error-against-depth picture.

- `plot_degradation_curves`: like the paper's Fig. 4 (and Fig. 6 for the CIFAR nets), training error (thin,
  dashed) and validation error (bold) against epochs, plain nets on the left, residual nets on the right, one
  colour per depth, from each run's MLflow metric history.
- `plot_depth`: top-1 error against weight layers for every family the report holds: VGG A–E (Table 3 rows,
  dense at Table 3's single Q; one line per training scale), the plain and the residual nets (their table's protocol, 10-crop
  or one centre view, at Q = 256); ours solid with 95 % intervals, the paper's numbers dashed. `vggdist report
  --sweep VGG_ID --sweep DEGRADATION_ID` puts a VGG sweep and a degradation sweep on one picture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from vggdist import paper, resnet_paper
from vggdist.runmeta import DENSE, TRAIN_TOP1_ERR, VAL_TOP1_ERR


def plot_degradation_curves(runs: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Fig. 4: top-1 training (thin, dashed) and validation (bold) error per epoch; plain | residual."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    nets = {r["config"]: r for r in runs if r.get("config") in resnet_paper.CONFIGS}
    for ax, residual in zip(axes, (False, True), strict=True):
        names = sorted((n for n in nets if resnet_paper.CONFIGS[n].residual == residual),
                       key=lambda n: (resnet_paper.CONFIGS[n].layout, resnet_paper.CONFIGS[n].depth))  # fmt: skip
        for i, name in enumerate(names):
            history = nets[name].get("history", {})
            for key, width, style, what in (
                (TRAIN_TOP1_ERR, 1.0, "--", "train"),
                (VAL_TOP1_ERR, 2.5, "-", "val"),
            ):
                points = history.get(key) or []
                if points:
                    ax.plot([e for e, _ in points], [v for _, v in points], style, linewidth=width,
                            color=f"C{i % 10}", label=f"{name} {what}")  # fmt: skip
        ax.set_title(f"{'residual' if residual else 'plain'} nets")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no per-epoch metrics", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("top-1 error (%)")
    fig.suptitle("training (thin, dashed) and validation (bold) error, as He et al. 2016 Fig. 4")
    fig.savefig(path, dpi=100)


def depth_series(
    vgg_tables: dict[str, list[dict]], resnet_tables: dict[str, list[dict]]
) -> list[dict[str, Any]]:
    """The lines of `plot_depth`: {label, who (ours|paper), points [(layers, err, lo, hi)]}; empty lines left out."""
    series: list[dict[str, Any]] = []
    by_scale: dict[str, list[dict]] = {}
    for r in vgg_tables.get("3", []):
        if r["protocol"] == DENSE and r["config"] in paper.WEIGHT_LAYERS and r["config"] != "A-LRN":
            by_scale.setdefault(r["train_scale"], []).append(r)
    for scale, rows in by_scale.items():
        layers = lambda r: paper.WEIGHT_LAYERS[r["config"]]  # noqa: E731
        # C and D share 16 layers: D (3×3 throughout) is the paper's line
        rows = [r for r in rows if r["config"] != "C" or not any(o["config"] == "D" for o in rows)]
        for who in ("ours", "paper"):
            pts = [(layers(r), r[f"{who}_top1"], r.get(f"{who}_top1_lo"), r.get(f"{who}_top1_hi"))
                   for r in rows if r[f"{who}_top1"] is not None]  # fmt: skip
            label = f"VGG A–E, S={scale.replace('-', ';')}, Table 3 dense"
            series.append({"label": label, "who": who, "points": sorted(pts)})
    for number, rows in resnet_tables.items():
        for residual in (False, True):
            fam = [r for r in rows if r["residual"] == residual]
            what = f"{'residual' if residual else 'plain'} (Table {number}, {rows[0]['protocol']} Q=256)"
            for who in ("ours", "paper"):
                pts = [(r["weight_layers"], r[f"{who}_top1"], r.get(f"{who}_top1_lo"), r.get(f"{who}_top1_hi"))
                       for r in fam if r[f"{who}_top1"] is not None]  # fmt: skip
                series.append({"label": what, "who": who, "points": sorted(pts)})
    return [s for s in series if s["points"]]


def plot_depth(series: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Top-1 error against weight layers, one colour per family line; ours solid with 95 % CI bars, paper dashed."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(s["label"] for s in series))}
    for s in series:
        x = [p[0] for p in s["points"]]
        y = [p[1] for p in s["points"]]
        label = f"{s['label']} — {s['who']}"
        if s["who"] == "ours" and all(p[2] is not None for p in s["points"]):
            yerr = [[p[1] - p[2] for p in s["points"]], [p[3] - p[1] for p in s["points"]]]
            ax.errorbar(x, y, yerr=yerr, fmt="-o", color=colours[s["label"]], capsize=3, label=label)
        else:
            style = "-o" if s["who"] == "ours" else "--x"
            ax.plot(
                x, y, style, color=colours[s["label"]], alpha=1.0 if s["who"] == "ours" else 0.6, label=label
            )
    ax.set_xlabel("weight layers")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title("error against depth: VGG, plain and residual nets")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no evaluated runs", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=100)
