"""`vggdist report`: the paper's Tables 3-6 (§4.1-§4.4) with a sweep's numbers next to the published ones.

A sweep is an MLflow parent run (tag `vggdist.sweep` = "parent") whose child runs each train one
configuration at one training scale; `vggdist sweep` evaluates them and stores `eval_results.json` on each
child and the Table 6 model fusion as `fusion_results.json` on the parent. Every row there carries the
*paper-equivalent* scales (`paper_scales`, and the `vggdist.train_scale` tag), so a `mini` sweep trained
at 32-pixel crops lines up with the paper's tables. The paper's numbers live in `vggdist.paper`.

This module reads the runs from MLflow; `vggdist.report_tables` builds the tables and `vggdist.report_render`
writes them. Outputs (in `out_dir`, and logged under `report/` on the sweep's parent run): report.md,
tables.csv, tables.json, and for VGG runs error_vs_depth.png and training_curves.png.

Runs of He et al. 2016's plain and residual nets (a `degradation` sweep) get their own section
(`vggdist.report_resnet`: Tables 2 and 6, paired tests, findings) and two plots (`vggdist.report_resnet_plots`):
degradation_curves.png (Fig. 4) and depth.png (error against depth of every family in the report). Several
sweeps (`sweep_run_id` a list: `vggdist report --sweep VGG_ID --sweep DEGRADATION_ID`) are reported together,
logged on the first, so one depth picture holds VGG A–E, plain and residual nets.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from vggdist import paper, report_resnet, runmeta, tracking
from vggdist.outcome_file import OutcomeFile, read_outcomes
from vggdist.report_compare import comparisons
from vggdist.report_findings import findings
from vggdist.report_plots import plot_error_vs_depth, plot_training_curves
from vggdist.report_render import render_findings, render_markdown, write_csv
from vggdist.report_resnet_plots import depth_series, plot_degradation_curves, plot_depth
from vggdist.report_tables import EVAL_ARTIFACT, build_tables, normalize_scale

log = logging.getLogger(__name__)


def make_report(
    experiment: str = runmeta.DEFAULT_EXPERIMENT,
    out_dir: str | os.PathLike = "report",
    sweep_run_id: str | list[str] | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """Build Tables 3-6 for one sweep (default: the latest in `experiment`), write them and log them; with
    several sweep ids, the union of their runs (logged on the first sweep).

    Returns {"markdown": str, "tables": {"3": [row, ...], ..., "6": [...]}, "files": [paths written],
    "sweep_run_id": str}, and "resnet" ({"tables", "comparisons", "findings"}) when He et al.'s nets ran.
    A row holds table, config, train_scale, test_scales, protocol, ours_top1, ours_top5, ours_n, run_id,
    paper_top1, paper_top5, paper_test_top5 (None where there is no value).
    """
    uri = uri or tracking.tracking_uri()
    ids = [sweep_run_id] if isinstance(sweep_run_id, str) or sweep_run_id is None else list(sweep_run_id)
    sweeps = [_find_sweep(experiment, i, uri) for i in ids]
    sweep = sweeps[0]
    experiment_name = tracking.experiment_name(sweep["experiment_id"], uri=uri)
    # Children carry mlflow.parentRunId (nesting in the UI) and vggdist.sweep = <parent id>: accept either.
    children_by_id = {
        run["run_id"]: run
        for s in sweeps
        for tag in (runmeta.TAG_PARENT_RUN_ID, runmeta.TAG_SWEEP)
        for run in tracking.find_runs(
            tracking.experiment_name(s["experiment_id"], uri=uri),
            filter_string=f"tags.`{tag}` = '{s['run_id']}'",
            uri=uri,
        )
    }
    children = sorted(children_by_id.values(), key=lambda r: r["start_time"] or 0)
    with tempfile.TemporaryDirectory(prefix="vggdist-report-") as tmp:
        runs = [_run_results(run, Path(tmp), uri) for run in children]
        fusion, fusion_files = [], []
        for s in sweeps:
            rows = _load_rows(s["run_id"], runmeta.FUSION_RESULTS, Path(tmp) / s["run_id"], uri) or []
            fusion += rows
            fusion_files += _fusion_outcomes(s["run_id"], rows, Path(tmp) / f"{s['run_id']}-outcomes", uri)
    mark_variants(runs)
    # He et al.'s nets have their own tables; the VGG tables, comparisons and findings take the VGG runs
    resnet_runs = [r for r in runs if report_resnet.is_resnet(r)]
    vgg_runs = [r for r in runs if not report_resnet.is_resnet(r)]

    tables = build_tables(vgg_runs, fusion)
    fused = list(zip(fusion, fusion_files, strict=True))
    compared = comparisons(vgg_runs, fused)
    found = findings(vgg_runs, fused)
    plan = " + ".join(s["tags"].get(runmeta.TAG_PLAN, "") for s in sweeps)
    markdown = findings_md = ""
    if vgg_runs or not resnet_runs:
        findings_md = render_findings(found)
        markdown = (
            render_markdown(
                tables, sweep, experiment_name, plan, runs, compared, mini=_reduced_scale(runs, plan)
            )
            + "\n"
            + findings_md
        )
    resnet: dict[str, Any] = {}
    if resnet_runs:
        resnet = {
            "tables": report_resnet.tables(resnet_runs),
            "comparisons": report_resnet.comparisons(resnet_runs),
            "findings": report_resnet.findings(resnet_runs),
        }
        section = report_resnet.render(resnet["tables"], resnet["comparisons"], resnet["findings"])
        markdown = (
            markdown + "\n" + section
            if markdown
            else _resnet_header(sweep, experiment_name, plan, runs, section)
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the VGG plots where the report has VGG runs, He et al.'s where it has theirs
    names = ["report.md", "tables.csv", "tables.json"]
    names += ["error_vs_depth.png", "training_curves.png"] if vgg_runs or not resnet else []
    names += ["degradation_curves.png", "depth.png"] if resnet else []
    path = {name: out / name for name in names}
    files = list(path.values())
    path["report.md"].write_text(markdown)
    write_csv(tables, path["tables.csv"])
    meta = {"sweep_run_id": sweep["run_id"], "experiment": experiment_name, "plan": plan}
    meta["sweep_run_ids"] = [s["run_id"] for s in sweeps]
    doc = {**meta, "tables": tables, "comparisons": compared, "findings": found}
    doc.update({"resnet": resnet} if resnet else {})
    path["tables.json"].write_text(json.dumps(doc, indent=2) + "\n")
    if "error_vs_depth.png" in path:
        plot_error_vs_depth(tables, path["error_vs_depth.png"], mini=_reduced_scale(runs, plan))
        plot_training_curves(runs, path["training_curves.png"])
    if resnet:
        plot_degradation_curves(resnet_runs, path["degradation_curves.png"])
        plot_depth(depth_series(tables if vgg_runs else {}, resnet["tables"]), path["depth.png"])
    tracking.upload_artifacts(sweep["run_id"], files, runmeta.REPORT_DIR, uri=uri)
    log.info("report for sweep %s written to %s and logged on the sweep run", sweep["run_id"], out)
    return {
        "markdown": markdown,
        "tables": tables,
        "comparisons": compared,
        "findings": found,
        "findings_markdown": findings_md,
        **({"resnet": resnet} if resnet else {}),
        "files": [str(f) for f in files],
        "sweep_run_id": sweep["run_id"],
    }


def _resnet_header(sweep: dict[str, Any], experiment: str, plan: str, runs: list[dict], section: str) -> str:
    """report.md of a report that holds only He et al.'s nets: header, their section, the runs."""
    lines = [
        f"# vggdist report: sweep `{sweep['name']}` ({sweep['run_id']})",
        "",
        f"Experiment `{experiment}`, plan `{plan or '?'}`, sweep status {sweep['status']}. Top-1 error (%) on the "
        'validation set; *ours* [95 % Wilson interval] beside the *paper* (He et al., "Deep Residual Learning for '
        'Image Recognition", CVPR 2016). — : no result.',
        "",
        section,
        "## Runs",
        "",
        "| stage | config | status | evaluated | run id |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['stage'] or '—'} | {r['config'] or '—'} | {r['status']} | {'yes' if r['rows'] else 'no'} "
              f"| {r['run_id']} |" for r in runs]  # fmt: skip
    return "\n".join(lines) + "\n"


def mark_variants(runs: list[dict[str, Any]]) -> None:
    """Label each run; where several runs share a configuration and training scale (a random-init ablation, a
    fixed-S fine-tune twin), the staged-init one (else the first) is the *canonical* run that the paper's rows
    and the depth comparisons use, and the others are labelled with their stage."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["config"], r["train_scale"]), []).append(r)
    for (config, scale), group in groups.items():
        main = next((r for r in group if r["init"] == "from-shallower"), group[0])
        for r in group:
            r["canonical"] = r is main
            variant = "" if r is main else f" ({r['stage'] or r['run_id'][:8]})"
            r["label"] = f"{config}/{scale}{variant}"
            r["table_config"] = f"{config}{variant}"  # its rows in Tables 3-5: the paper's only if canonical


# ----------------------------------------------------------------------------------------- reading


def _find_sweep(experiment: str, sweep_run_id: str | None, uri: str) -> dict[str, Any]:
    if sweep_run_id:
        tracking.require_store(uri, f"--sweep {sweep_run_id}")
        run = tracking.get_run(sweep_run_id, uri=uri)
        if run["tags"].get(runmeta.TAG_SWEEP) != runmeta.SWEEP_PARENT:
            log.warning(
                "run %s has no %s=%s tag; reporting its child runs anyway",
                sweep_run_id,
                runmeta.TAG_SWEEP,
                runmeta.SWEEP_PARENT,
            )
        return run
    parent = f"{runmeta.TAG_SWEEP}={runmeta.SWEEP_PARENT}"
    sweeps = tracking.find_runs(
        experiment, filter_string=f"tags.`{runmeta.TAG_SWEEP}` = '{runmeta.SWEEP_PARENT}'", uri=uri
    )
    if not sweeps:
        raise ValueError(
            f"no sweep (a run tagged {parent}) in MLflow experiment {experiment!r} at {uri}; "
            "run `vggdist sweep` first, or pass --experiment / --sweep RUN_ID"
        )
    return max(sweeps, key=lambda r: r["start_time"] or 0)


def _load_rows(run_id: str, name: str, dst: Path, uri: str) -> list[dict[str, Any]] | None:
    """The "rows" of JSON artifact `name` of a run, or None when the run has no such artifact."""
    if name not in tracking.list_artifacts(run_id, uri=uri):
        return None
    path = tracking.download_artifact(run_id, name, dst, uri=uri)
    with open(path) as f:
        return list(json.load(f).get("rows", []))


def _outcomes(run_id: str, path: str, dst: Path, uri: str) -> OutcomeFile | None:
    """A run's per-image outcomes artifact `path`, or None (with a warning when it is there but unreadable)."""
    parent = os.path.dirname(path) or None
    if path not in tracking.list_artifacts(run_id, parent, uri=uri):
        return None
    try:
        return read_outcomes(tracking.download_artifact(run_id, path, dst, uri=uri))
    except ValueError as e:
        log.warning("run %s: %s; its paired comparisons are left out", run_id, e)
        return None


def _fusion_outcomes(
    parent_id: str, fusion: list[dict[str, Any]], dst: Path, uri: str
) -> list[OutcomeFile | None]:
    """The outcomes file of every fusion row (`outcomes` names it on the sweep's run), read once per file."""
    cache: dict[str, OutcomeFile | None] = {}
    for row in fusion:
        path = row.get("outcomes")
        if path and path not in cache:
            cache[path] = _outcomes(parent_id, path, dst, uri)
    return [cache.get(row.get("outcomes") or "") for row in fusion]


def _reduced_scale(runs: list[dict[str, Any]], plan: str) -> bool:
    """Whether the sweep trained below the paper's 224 crop: a built-in plan on the mini preset (`mini`, `study`),
    or runs that every one logged a smaller `data.crop_size`. Its numbers then compare with the paper's in layout and
    trends only."""
    from vggdist.plan import BUILTIN_PLANS, builtin_plan

    if any(p in BUILTIN_PLANS and builtin_plan(p).preset == "mini" for p in plan.split(" + ")):
        return True
    crops = [r.get("crop_size") for r in runs]
    return bool(crops) and None not in crops and all(c < paper.SCALES["paper"]["crop_size"] for c in crops)


def _run_results(run: dict[str, Any], tmp: Path, uri: str) -> dict[str, Any]:
    """One child run as {run_id, config, train_scale, stage, status, rows}; rows is None if not evaluated."""
    tags = run["tags"]
    rows = _load_rows(run["run_id"], EVAL_ARTIFACT, tmp / run["run_id"], uri)
    if rows is None:
        rows = _rows_from_metrics(run) or None
    out = {
        "run_id": run["run_id"],
        "config": tags.get(runmeta.TAG_CONFIG, ""),
        "train_scale": normalize_scale(tags.get(runmeta.TAG_TRAIN_SCALE, "")),
        "stage": tags.get(runmeta.TAG_STAGE, ""),
        "status": run["status"],
        "rows": rows,
        "init": run["params"].get("run.init", ""),
        "crop_size": int(run["params"]["data.crop_size"]) if "data.crop_size" in run["params"] else None,
        "init_from": tags.get(runmeta.TAG_INIT_FROM),
        "outcomes": _outcomes(run["run_id"], runmeta.EVAL_OUTCOMES, tmp / run["run_id"], uri),
        "history": {
            key: tracking.metric_history(run["run_id"], key, uri=uri)
            for key in (runmeta.TRAIN_TOP1_ERR, runmeta.VAL_TOP1_ERR)
        },
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
    (`vggdist.paper.to_crop`). Rows whose scales do not map are dropped.
    """
    crop = int(run["params"].get("data.crop_size", 224))
    paper_qs = {q for r in paper.RESULTS for q in r.test_scales}
    paper_qs |= {q for s in paper.TRAIN_SCALE_ORDER for q in paper.multi_test_scales(s)}
    to_paper = {paper.to_crop(q, crop): q for q in paper_qs}
    found: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for name, value in run["metrics"].items():
        parsed = runmeta.parse_eval_metric_name(name)
        if parsed is None or parsed[2] not in runmeta.ERROR_KINDS:
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
    return [r for r in found.values() if all(k in r for k in runmeta.ERROR_KINDS)]
