"""He et al. 2016's degradation study in `vggdist report`: Table 2 / Table 6 beside ours, paired tests, findings.

A degradation sweep (`vggdist sweep --plan degradation` / `degradation-mini`) trains plain and residual nets at
two depths on the same shards and evaluates each on the same validation images. From its child runs (as
`vggdist.report` reads them: config, per-image `outcomes`, per-epoch `history`, eval `rows`) this module builds:

- **Table 2** (ImageNet nets, plain-/resnet-18/34): top-1 error %, the paper's 10-crop test at Q = 256;
- **Table 6** (CIFAR nets, plain-/resnet-20/56): error % of one centre view at Q = 256 (paper units; the paper
  tests CIFAR-10's 32×32 images as they are). The paper states numbers only for the residual nets (ResNet-20
  8.75, ResNet-56 6.97); its plain nets appear only as Fig. 6's curves, so their paper column is empty;
- beside each: ours with its 95 % Wilson interval and n, and the final *training* error, the error the
  degradation problem is about. It is the running training error of the last epoch (`train/top1_err`: every
  training image of that epoch, under augmentation, in train-mode BN, while the weights move), so it is a
  description, not a test-set measurement: it has no per-image record and gets no interval or test;
- paired comparisons (McNemar, exact, on the images both runs scored; `vggdist.significance`): plain shallow vs
  deep, residual shallow vs deep, plain vs residual at each depth;
- three findings with the verdict rule of `vggdist.significance` (reproduced / not reproduced / within noise):
  plain nets degrade with depth, residual nets improve with depth, residual beats plain at the same depth.

Pure data, no MLflow: `vggdist.report` reads the runs, `vggdist.report_resnet_plots` draws Figure 4 and the depth
picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vggdist import paper, report_compare, resnet_paper
from vggdist.report_compare import NOT_PAIRED, run_side
from vggdist.runmeta import SINGLE, TENCROP, TRAIN_TOP1_ERR, VAL_TOP1_ERR
from vggdist.significance import ErrorRate

Q = 256  # paper units: Table 2's 10-crop scale; the CIFAR nets' (resnet-mini) centre view at 37 of crop 32
TABLES = {"imagenet": 2, "cifar": 6}
HEADLINE = {2: TENCROP, 6: SINGLE}  # the protocol each table's published numbers were measured with
TITLES = {
    2: "Table 2 (He et al. 2016): top-1 error (%), 10-crop testing, plain vs residual (option A shortcuts)",
    6: "Table 6 (He et al. 2016): classification error (%), one centre view, plain vs residual",
}
NOT_MEASURED = "not measured in this sweep"
CLAIMS = (
    "plain nets degrade with depth (training error!)",
    "residual nets improve with depth",
    "residual beats plain at the same depth",
)


def is_resnet(run: dict[str, Any]) -> bool:
    """A run of one of He et al.'s plain or residual networks."""
    return run.get("config") in resnet_paper.CONFIGS


def final(run: dict[str, Any] | None, key: str) -> tuple[int, float] | None:
    """(epoch, value) of metric `key` at the last logged epoch of `run`, or None."""
    points = (run or {}).get("history", {}).get(key) or []
    return (int(points[-1][0]), float(points[-1][1])) if points else None


def _hits(run: dict[str, Any] | None, protocol: str) -> dict[str, bool] | None:
    """Per-image top-1 hits (sample key -> correct) of `run` under `protocol` at Q, or None."""
    f = (run or {}).get("outcomes")
    row = f.find(protocol, (Q,)) if f is not None else None
    if row is None:
        return None
    return dict(zip(row.keys.tolist(), row.top1.tolist(), strict=True))


def _rate(run: dict[str, Any] | None, protocol: str) -> ErrorRate | None:
    """Our top-1 error of `run` under `protocol` at Q: from its per-image outcomes, else its eval rows."""
    hits = _hits(run, protocol)
    if hits:
        return ErrorRate(sum(not h for h in hits.values()), len(hits))
    for row in (run or {}).get("rows") or []:
        qs = sorted(int(q) for q in (row.get("paper_scales") or row.get("scales") or []))
        if row.get("protocol") == protocol and qs == [Q] and row.get("n"):
            return ErrorRate.from_percent(float(row["top1_err"]), int(row["n"]))
    return None


def by_config(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run of each He et al. network (the last started, where a config ran twice)."""
    return {r["config"]: r for r in runs if is_resnet(r)}


def tables(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{"2": rows, "6": rows} for the layouts this sweep trained: every network of the layout (the paper's rows
    stay, ours empty where a net is missing), in the paper's order."""
    nets = by_config(runs)
    out: dict[str, list[dict[str, Any]]] = {}
    for layout, number in TABLES.items():
        names = resnet_paper.names_of_layout(layout)
        if not any(n in nets for n in names):
            continue
        out[str(number)] = [_table_row(number, name, nets.get(name)) for name in names]
    return out


def _table_row(number: int, config: str, run: dict[str, Any] | None) -> dict[str, Any]:
    protocol = HEADLINE[number]
    rate = _rate(run, protocol)
    ref = resnet_paper.published(config)
    train, val = final(run, TRAIN_TOP1_ERR), final(run, VAL_TOP1_ERR)
    lo, hi = rate.ci if rate else (None, None)
    return {
        "table": number,
        "config": config,
        "weight_layers": resnet_paper.CONFIGS[config].depth,
        "residual": resnet_paper.CONFIGS[config].residual,
        "protocol": protocol,
        "test_scales": [Q],
        "ours_top1": rate.percent if rate else None,
        "ours_top1_lo": lo,
        "ours_top1_hi": hi,
        "ours_n": rate.n if rate else None,
        "train_top1_final": train[1] if train else None,
        "val_top1_final": val[1] if val else None,
        "epochs": train[0] if train else None,
        "run_id": run["run_id"] if run else None,
        "paper_top1": ref.top1_err if ref and ref.table == number else None,
        "paper_top5": ref.top5_err if ref and ref.table == number else None,
    }


# ------------------------------------------------------------------------------------------ paired tests


def compare(
    family: str, a: dict[str, Any], b: dict[str, Any], protocol: str, b_better: bool
) -> dict[str, Any]:
    """Run `b` against run `a` (Δ = b − a, pt of top-1 error) under `protocol` at Q, paired by image as every
    comparison of the report (`vggdist.report_compare.compare`); `b_better` is the paper's direction. Runs without
    outcomes for this setting get verdict `NOT_PAIRED`, their rates from the eval rows and the reason in `note`."""
    sa, sb = (run_side({"label": r["config"], **r}, protocol, (Q,)) for r in (a, b))
    if sa is not None and sb is not None:
        row = report_compare.compare(family, sa, sb, b_better=b_better)
    else:
        row = {"family": family, "n": None, "delta": None, "delta_lo": None, "delta_hi": None, "p_value": None,
               "label": NOT_PAIRED, "verdict": NOT_PAIRED, "test_set": None,
               "note": f"no per-image outcomes for {protocol} at Q={Q} on both runs"}  # fmt: skip
        for who, run in (("a", a), ("b", b)):
            rate = _rate(run, protocol)
            row.update({f"{who}_err": rate.percent if rate else None, f"{who}_n": rate.n if rate else None})
    row.update(a=a["config"], b=b["config"], protocol=protocol, test_scales=[Q])
    for who, run in (("a", a), ("b", b)):
        t = final(run, TRAIN_TOP1_ERR)
        row[f"{who}_train_final"] = t[1] if t else None
    return row


def _pairs(layout: str) -> list[tuple[str, str, str, bool]]:
    """(family, a, b, b should be better) for one layout: depth within each family, then plain vs residual."""
    names = resnet_paper.names_of_layout(layout)
    plain = sorted((n for n in names if not resnet_paper.CONFIGS[n].residual), key=_depth)
    res = sorted((n for n in names if resnet_paper.CONFIGS[n].residual), key=_depth)
    out = [("plain: depth", a, b, False) for a, b in zip(plain, plain[1:], strict=False)]
    out += [("residual: depth", a, b, True) for a, b in zip(res, res[1:], strict=False)]
    out += [("plain vs residual, same depth", p, r, True) for p, r in zip(plain, res, strict=False)]
    return out


def _depth(config: str) -> int:
    return resnet_paper.CONFIGS[config].depth


def comparisons(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every paired comparison of the degradation study this sweep allows, at each table's protocol."""
    nets = by_config(runs)
    rows = []
    for layout, number in TABLES.items():
        for family, a, b, b_better in _pairs(layout):
            if a in nets and b in nets:
                rows.append(compare(family, nets[a], nets[b], HEADLINE[number], b_better))
    return rows


# ----------------------------------------------------------------------------------------------- findings


def findings(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per claim in `CLAIMS`: the paper's numbers, ours with CIs (and the final training errors), the
    paired test, Δ with its interval, p and the verdict. The verdict is the test-set McNemar test's; the plain
    nets' training errors are shown beside it (the paper's point) but are descriptive (see the module doc)."""
    compared = comparisons(runs)
    layout = next(
        (lay for lay, n in TABLES.items() if any(c["protocol"] == HEADLINE[n] for c in compared)), None
    )
    deeper = [c for c in compared if c["family"] == "plain vs residual, same depth"]

    def pick(family: str) -> dict[str, Any] | None:
        return next((c for c in compared if c["family"] == family), None)

    rows = [
        _finding(CLAIMS[0], pick("plain: depth"), train=True),
        _finding(CLAIMS[1], pick("residual: depth")),
        _finding(CLAIMS[2], deeper[-1] if deeper else None, others=deeper[:-1]),
    ]
    for row in rows:
        row["layout"] = layout
    return rows


def _paper_text(a: str, b: str) -> str:
    def one(c: str) -> str:
        p = resnet_paper.published(c)
        return f"{c} {p.top1_err:.2f}" if p else f"{c} — (Fig. 6 curve only)"

    return f"{one(a)} → {one(b)}"


def _fmt_err(c: dict[str, Any], who: str) -> str:
    if c.get(f"{who}_lo") is None:
        return "—" if c[f"{who}_err"] is None else f"{c[f'{who}_err']:.2f}"
    return f"{c[f'{who}_err']:.2f} [{c[f'{who}_lo']:.2f}, {c[f'{who}_hi']:.2f}]"


def _finding(
    claim: str, c: dict[str, Any] | None, *, train: bool = False, others: Sequence[dict] = ()
) -> dict:
    row: dict[str, Any] = {"claim": claim, "paper": "—", "ours": "—", "test": "—", "test_set": None,
                           "delta": None, "delta_lo": None, "delta_hi": None, "p_value": None,
                           "verdict": NOT_MEASURED, "note": ""}  # fmt: skip
    if c is None:
        return {**row, "note": "needs both networks of the pair in the sweep, evaluated"}
    ours = f"{c['a']}: {_fmt_err(c, 'a')} → {c['b']}: {_fmt_err(c, 'b')}"
    ta, tb = c["a_train_final"], c["b_train_final"]
    if ta is not None and tb is not None:
        ours += f"; final training error {ta:.2f} → {tb:.2f}"
    for o in others:
        ours += f"; {o['a']} {_fmt_err(o, 'a')} vs {o['b']} {_fmt_err(o, 'b')} ({o['verdict']}, p = {_p(o)})"
    notes = [c["note"]] if c["note"] else []
    if train:
        notes.append(
            "training error: the running error of the last epoch, under augmentation (descriptive, no test)"
        )
    return {
        **row,
        "paper": _paper_text(c["a"], c["b"]),
        "ours": ours,
        "test": f"McNemar (exact), top-1, paired by image, {paper.PROTOCOL_LABELS.get(c['protocol'])} Q={Q}",
        "test_set": c.get("test_set"),
        "delta": c["delta"],
        "delta_lo": c["delta_lo"],
        "delta_hi": c["delta_hi"],
        "p_value": c["p_value"],
        "verdict": c["verdict"],
        "note": "; ".join(notes),
    }


def _p(c: dict[str, Any]) -> str:
    return "—" if c["p_value"] is None else f"{c['p_value']:.3g}"


# ------------------------------------------------------------------------------------------------ Markdown


def render(tabs: dict[str, list[dict]], compared: list[dict], found: list[dict]) -> str:
    """The degradation section of report.md: the tables, the paired comparisons and the findings."""
    lines = ["## Plain vs residual (He et al. 2016)", ""]
    for number, rows in tabs.items():
        lines += [f"### {TITLES[int(number)]}", ""]
        lines += ["| network | layers | paper | ours [95 % CI] | n | final train err | final val err | epochs |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            ours = (
                "—"
                if r["ours_top1"] is None
                else f"{r['ours_top1']:.2f} [{r['ours_top1_lo']:.2f}, {r['ours_top1_hi']:.2f}]"
            )
            lines.append(
                f"| {r['config']} | {r['weight_layers']} | {_f(r['paper_top1'])} | {ours} | {r['ours_n'] or '—'} "
                f"| {_f(r['train_top1_final'])} | {_f(r['val_top1_final'])} | {r['epochs'] or '—'} |"
            )
        lines += ["", _table_note(int(number)), ""]
    if compared:
        lines += ["### Paired comparisons (McNemar, exact; Δ = second − first, pt)", "",
                  "| comparison | first | second | n | Δ [95 % CI] | p | verdict |", "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
        for c in compared:
            delta = (
                "—"
                if c["delta"] is None
                else f"{c['delta']:+.2f} [{c['delta_lo']:+.2f}, {c['delta_hi']:+.2f}]"
            )
            lines.append(
                f"| {c['family']} | {c['a']} {_fmt_err(c, 'a')} | {c['b']} {_fmt_err(c, 'b')} | {c['n'] or '—'} "
                f"| {delta} | {_p(c)} | {c['verdict']} |"
            )
        lines.append("")
    lines += ["### Findings (He et al. 2016)", "", "| claim | paper | ours | test | Δ [95 % CI] | p | verdict | note |",
              "|---|---|---|---|---:|---:|---|---|"]  # fmt: skip
    for f in found:
        delta = (
            "—" if f["delta"] is None else f"{f['delta']:+.2f} [{f['delta_lo']:+.2f}, {f['delta_hi']:+.2f}]"
        )
        lines.append(
            f"| {f['claim']} | {f['paper']} | {f['ours']} | {f['test']}{', ' + f['test_set'] if f['test_set'] else ''} "
            f"| {delta} | {_p(f)} | {f['verdict']} | {f['note']} |"
        )
    return "\n".join(lines) + "\n"


def _table_note(number: int) -> str:
    if number == 2:
        return ("Ours: 10-crop at Q=256 on the validation shards. Final train err: running top-1 error of the last "
                "epoch (augmented, train-mode BN); final val err: the per-epoch centre-crop validation.")  # fmt: skip
    return ("Paper: CIFAR-10 test set; the plain nets are only plotted (Fig. 6), so they have no number. Ours: "
            "one centre crop at Q=256 (paper units) of *our* data set (e.g. Fashion-MNIST for the mini plan), so "
            "only the trends compare. Final train err: running top-1 error of the last epoch (augmented).")  # fmt: skip


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"
