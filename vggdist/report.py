"""`vggdist report`: the paper's Tables 3-6 (§4.1-§4.4) with a sweep's numbers next to the published ones.

A sweep is an MLflow parent run (tag `vggdist.sweep` = "parent") whose child runs each train one
configuration at one training scale; `vggdist sweep` evaluates them and stores `eval_results.json` on each
child and the Table 6 model fusion as `fusion_results.json` on the parent. Every row there carries the
*paper-equivalent* scales (`paper_scales`, and the `vggdist.train_scale` tag), so a `mini` sweep trained
at 32-pixel crops lines up with the paper's tables. The paper's numbers live in `vggdist.paper`.

Outputs (in `out_dir`, and logged under `report/` on the sweep's parent run): report.md, tables.csv,
tables.json and error_vs_depth.png.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vggdist import paper, tracking
from vggdist.config import scaled_scale

log = logging.getLogger(__name__)

# Tags written by `vggdist sweep` (tracking.py may define them too; the strings are the contract).
TAG_SWEEP = getattr(tracking, "TAG_SWEEP", "vggdist.sweep")
TAG_PLAN = getattr(tracking, "TAG_PLAN", "vggdist.plan")
TAG_TRAIN_SCALE = getattr(tracking, "TAG_TRAIN_SCALE", "vggdist.train_scale")
EVAL_ARTIFACT = "eval_results.json"
FUSION_ARTIFACT = "fusion_results.json"
ARTIFACT_DIR = "report"

CSV_COLUMNS = (
    "table",
    "config",
    "train_scale",
    "test_scales",
    "protocol",
    "ours_top1",
    "ours_top5",
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
_PROTOCOL_ORDER = ("single", "dense", "multicrop", "combined")
_PLOT_NAME = "error_vs_depth.png"


def make_report(
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    out_dir: str | os.PathLike = "report",
    sweep_run_id: str | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """Build Tables 3-6 for one sweep (default: the latest in `experiment`), write them and log them.

    Returns {"markdown": str, "tables": {"3": [row, ...], ..., "6": [...]}, "files": [paths written],
    "sweep_run_id": str}. A row holds table, config, train_scale, test_scales, protocol, ours_top1,
    ours_top5, ours_n, run_id, paper_top1, paper_top5, paper_test_top5 (None where there is no value).
    """
    uri = uri or tracking.tracking_uri()
    sweep = _find_sweep(experiment, sweep_run_id, uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_name = client.get_experiment(sweep["experiment_id"]).name
    # Children carry mlflow.parentRunId (nesting in the UI) and vggdist.sweep = <parent id>: accept either.
    children_by_id = {
        run["run_id"]: run
        for tag in (tracking.TAG_PARENT_RUN_ID, TAG_SWEEP)
        for run in tracking.find_runs(
            experiment_name, filter_string=f"tags.`{tag}` = '{sweep['run_id']}'", uri=uri
        )
    }
    children = sorted(children_by_id.values(), key=lambda r: r["start_time"] or 0)
    with tempfile.TemporaryDirectory(prefix="vggdist-report-") as tmp:
        runs = [_run_results(client, run, Path(tmp), uri) for run in children]
        fusion = _load_rows(client, sweep["run_id"], FUSION_ARTIFACT, Path(tmp) / "fusion", uri) or []

    tables = build_tables(runs, fusion)
    plan = sweep["tags"].get(TAG_PLAN, "")
    markdown = render_markdown(tables, sweep, experiment_name, plan, runs)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "tables.csv", out / "tables.json", out / _PLOT_NAME]
    files[0].write_text(markdown)
    _write_csv(tables, files[1])
    meta = {"sweep_run_id": sweep["run_id"], "experiment": experiment_name, "plan": plan}
    files[2].write_text(json.dumps({**meta, "tables": tables}, indent=2) + "\n")
    plot_error_vs_depth(tables, files[3], mini=plan == "mini")
    for f in files:
        client.log_artifact(sweep["run_id"], str(f), ARTIFACT_DIR)
    log.info("report for sweep %s written to %s and logged on the sweep run", sweep["run_id"], out)
    return {
        "markdown": markdown,
        "tables": tables,
        "files": [str(f) for f in files],
        "sweep_run_id": sweep["run_id"],
    }


# ----------------------------------------------------------------------------------------- reading


def _find_sweep(experiment: str, sweep_run_id: str | None, uri: str) -> dict[str, Any]:
    if sweep_run_id:
        run = tracking.get_run(sweep_run_id, uri=uri)
        if run["tags"].get(TAG_SWEEP) != "parent":
            log.warning(
                "run %s has no %s=parent tag; reporting its child runs anyway", sweep_run_id, TAG_SWEEP
            )
        return run
    sweeps = tracking.find_runs(experiment, filter_string=f"tags.`{TAG_SWEEP}` = 'parent'", uri=uri)
    if not sweeps:
        raise ValueError(
            f"no sweep (a run tagged {TAG_SWEEP}=parent) in MLflow experiment {experiment!r} at {uri}; "
            "run `vggdist sweep` first, or pass --experiment / --sweep RUN_ID"
        )
    return max(sweeps, key=lambda r: r["start_time"] or 0)


def _load_rows(
    client: mlflow.MlflowClient, run_id: str, name: str, dst: Path, uri: str
) -> list[dict[str, Any]] | None:
    """The "rows" of JSON artifact `name` of a run, or None when the run has no such artifact."""
    if name not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    path = tracking.download_artifact(run_id, name, dst, uri=uri)
    with open(path) as f:
        return list(json.load(f).get("rows", []))


def _run_results(client: mlflow.MlflowClient, run: dict[str, Any], tmp: Path, uri: str) -> dict[str, Any]:
    """One child run as {run_id, config, train_scale, stage, status, rows}; rows is None if not evaluated."""
    tags = run["tags"]
    rows = _load_rows(client, run["run_id"], EVAL_ARTIFACT, tmp / run["run_id"], uri)
    if rows is None:
        rows = _rows_from_metrics(run) or None
    out = {
        "run_id": run["run_id"],
        "config": tags.get(tracking.TAG_CONFIG, ""),
        "train_scale": _normalize_scale(tags.get(TAG_TRAIN_SCALE, "")),
        "stage": tags.get(tracking.TAG_STAGE, ""),
        "status": run["status"],
        "rows": rows,
    }
    if rows is None:
        log.warning(
            "run %s (%s, S=%s, stage %s) has no evaluation results; its rows show —",
            out["run_id"],
            out["config"],
            out["train_scale"],
            out["stage"],
        )
    return out


def _rows_from_metrics(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Fallback when `eval_results.json` is missing: rows from `eval/<protocol>/Q.../top*_err` metrics.

    Metric names hold the actual Q; they are mapped back to paper scales with the run's `data.crop_size`
    (the mapping `vggdist.config.scaled_scale` uses). Rows whose scales do not map are dropped.
    """
    crop = int(run["params"].get("data.crop_size", 224))
    paper_qs = {q for r in paper.RESULTS for q in r.test_scales}
    paper_qs |= {q for s in paper.TRAIN_SCALE_ORDER for q in paper.multi_test_scales(s)}
    to_paper = {scaled_scale(q, crop): q for q in paper_qs}
    found: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for name, value in run["metrics"].items():
        parsed = tracking.parse_eval_metric_name(name)
        if parsed is None or parsed[2] not in ("top1_err", "top5_err"):
            continue
        protocol, scales, kind = parsed
        if not all(q in to_paper for q in scales):
            continue
        row = found.setdefault(
            (protocol, scales),
            {
                "protocol": protocol,
                "scales": list(scales),
                "paper_scales": sorted(to_paper[q] for q in scales),
                "n": None,
            },
        )
        row[kind] = value
    return [r for r in found.values() if "top1_err" in r and "top5_err" in r]


def _normalize_scale(label: str) -> str:
    """'256', '256-512', '[256;512]' or '256,512' -> '256' / '256-512'."""
    digits = "".join(c if c.isdigit() else " " for c in str(label)).split()
    if len(digits) == 2 and digits[0] == digits[1]:
        digits = digits[:1]
    return "-".join(digits)


# -------------------------------------------------------------------------------------- the tables


def build_tables(runs: list[dict[str, Any]], fusion_rows: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """Tables 3-6 as {"3": [row, ...], ...}: the paper's rows, plus rows only we have, in paper order.

    `runs`: child runs as `_run_results` returns them (later runs win where two report the same row).
    A run without results still gets its Table 3 row, so a missing evaluation is visible.
    """
    ours: dict[tuple, dict[str, Any]] = {}
    trained: list[tuple[str, str]] = []
    for run in runs:
        if not run["config"] or not _valid_scale(run["train_scale"]):
            log.warning(
                "run %s lacks %s / %s tags; left out", run["run_id"], tracking.TAG_CONFIG, TAG_TRAIN_SCALE
            )
            continue
        trained.append((run["config"], run["train_scale"]))
        for row in run["rows"] or []:
            if not {"protocol", "top1_err", "top5_err"} <= set(row) or not row.get(
                "paper_scales", row.get("scales")
            ):
                log.warning("run %s: incomplete %s row %s; left out", run["run_id"], EVAL_ARTIFACT, row)
                continue
            qs = tuple(sorted(int(q) for q in (row.get("paper_scales") or row["scales"])))
            key = (run["config"], run["train_scale"], row["protocol"], qs)
            ours[key] = {**row, "run_id": run["run_id"]}

    def keys_for(number: int, extra: Iterable[tuple]) -> list[tuple]:
        keys = [(r.config, r.train_scale, r.protocol, r.test_scales) for r in paper.table(number)]
        keys += [k for k in extra if k not in keys]
        return sorted(dict.fromkeys(keys), key=_row_order)

    t3 = keys_for(3, [(c, s, "dense", (paper.single_test_scale(s),)) for c, s in trained])
    t4 = keys_for(4, [k for k in ours if k[2] == "dense" and k[3] == paper.multi_test_scales(k[1])])
    with_crops = {
        (k[0], k[1])
        for k in ours
        if k[2] in ("multicrop", "combined") and k[3] == paper.multi_test_scales(k[1])
    }
    t5 = keys_for(
        5,
        [
            (c, s, p, paper.multi_test_scales(s))
            for c, s in with_crops
            for p in ("dense", "multicrop", "combined")
        ],
    )
    tables = {str(n): [_row(n, k, ours.get(k)) for k in keys] for n, keys in ((3, t3), (4, t4), (5, t5))}
    tables["6"] = _fusion_table(fusion_rows)
    return tables


def _valid_scale(label: str) -> bool:
    try:
        paper.single_test_scale(label)
    except ValueError:
        return False
    return True


def _row_order(key: tuple) -> tuple:
    config, train_scale, protocol, qs = key
    c = paper.CONFIG_ORDER.index(config) if config in paper.CONFIG_ORDER else len(paper.CONFIG_ORDER)
    bounds = [int(x) for x in _normalize_scale(train_scale).split("-") if x] or [0]
    lo, hi = bounds[0], bounds[-1]
    s = paper.TRAIN_SCALE_ORDER.index(train_scale) if train_scale in paper.TRAIN_SCALE_ORDER else 99
    p = _PROTOCOL_ORDER.index(protocol) if protocol in _PROTOCOL_ORDER else 99
    return (c, config, s, lo, hi, p, protocol, qs)


def _paper_lookup(number: int) -> dict[tuple, paper.PaperResult]:
    return {(r.config, r.train_scale, r.protocol, r.test_scales): r for r in paper.table(number)}


def _row(number: int, key: tuple, ours: dict[str, Any] | None) -> dict[str, Any]:
    config, train_scale, protocol, qs = key
    ref = _paper_lookup(number).get(key)
    return {
        "table": number,
        "config": config,
        "train_scale": train_scale,
        "test_scales": list(qs),
        "protocol": protocol,
        "ours_top1": ours["top1_err"] if ours else None,
        "ours_top5": ours["top5_err"] if ours else None,
        "ours_n": ours.get("n") if ours else None,
        "run_id": ours["run_id"] if ours else None,
        "paper_top1": ref.top1_err if ref else None,
        "paper_top5": ref.top5_err if ref else None,
        "paper_test_top5": None,
    }


def _fusion_table(fusion_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 6: our fused rows matched to the paper's D/[256;512] + E/[256;512] rows."""

    def split(models: Iterable[str]) -> tuple[str, str]:
        parts = [m.split("/", 1) + [""] for m in sorted(models)]
        configs = "+".join(p[0] for p in parts)
        scales = sorted({_normalize_scale(p[1]) for p in parts})
        return configs, "+".join(scales)

    paper_key = split(paper.FUSION_MODELS)
    rows: dict[tuple, dict[str, Any]] = {}
    for ref in paper.table(6):
        key = (*paper_key, ref.protocol, ref.test_scales)
        rows[key] = {
            **_row(6, (ref.config, ref.train_scale, ref.protocol, ref.test_scales), None),
            "config": paper_key[0],
            "models": list(paper.FUSION_MODELS),
            "paper_test_top5": ref.test_top5_err,
            "run_ids": [],
        }
    for f in fusion_rows:
        qs = tuple(sorted(int(q) for q in (f.get("paper_scales") or f["scales"])))
        config, train_scale = split(f["models"])
        key = (config, train_scale, f["protocol"], qs)
        row = rows.setdefault(
            key,
            {
                **_row(6, key, None),
                "models": sorted(f["models"]),
            },
        )
        row.update(
            ours_top1=f["top1_err"],
            ours_top5=f["top5_err"],
            ours_n=f.get("n"),
            run_ids=list(f.get("run_ids", [])),
        )
    return [rows[k] for k in sorted(rows, key=_row_order)]


# ------------------------------------------------------------------------------------------ output


def _scale_label(train_scale: str) -> str:
    return f"[{train_scale.replace('-', ';')}]" if "-" in train_scale else train_scale


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_markdown(
    tables: dict[str, list[dict]], sweep: dict[str, Any], experiment: str, plan: str, runs: list[dict]
) -> str:
    """All four tables, a header naming the sweep, and the list of child runs, as one Markdown string."""
    lines = [
        f"# vggdist report: sweep `{sweep['name']}` ({sweep['run_id']})",
        "",
        f"Experiment `{experiment}`, plan `{plan or '?'}`, sweep status {sweep['status']}. "
        "Top-1 / top-5 classification error (%) on the validation set; *ours* beside the *paper* "
        "(Simonyan & Zisserman, arXiv:1409.1556v6). — : no result.",
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
        head += ["ours top-1", "ours top-5", "paper top-1", "paper top-5"]
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
            cells += [_fmt(r["ours_top1"], 2), _fmt(r["ours_top5"], 2)]
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


def _write_csv(tables: dict[str, list[dict]], path: Path) -> None:
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
            if number == "5" and r["protocol"] == "dense":
                continue  # the same numbers as Table 4's multi-scale dense rows
            if r["config"] not in paper.WEIGHT_LAYERS:
                continue
            what = {"3": "single Q, dense", "4": "multi Q, dense"}.get(number)
            what = what or f"multi Q, {paper.PROTOCOL_LABELS.get(r['protocol'], r['protocol'])}"
            key = (number, _row_order(("", r["train_scale"], r["protocol"], ()))[2:5], what, r["train_scale"])
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
