"""The paper's Tables 3-6 (§4.1-§4.4) as rows: a sweep's evaluation results aligned with the published numbers.

Pure data, no MLflow: `vggdist.report` reads the runs and hands their rows here; `vggdist.report_render` turns the
tables into Markdown, CSV and the error-vs-depth plot. Rows are matched by (config, paper-equivalent training
scale, protocol, paper-equivalent test scales), so a mini sweep lines up with the paper's tables too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vggdist import paper, runmeta
from vggdist.runmeta import COMBINED, DENSE, MULTICROP, PROTOCOLS
from vggdist.significance import wilson_interval

log = logging.getLogger(__name__)

EVAL_ARTIFACT = f"{runmeta.EVAL_RESULTS}.json"


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
                "run %s lacks %s / %s tags; left out",
                run["run_id"],
                runmeta.TAG_CONFIG,
                runmeta.TAG_TRAIN_SCALE,
            )
            continue
        config = run.get("table_config") or run["config"]
        trained.append((config, run["train_scale"]))
        for row in run["rows"] or []:
            if not {"protocol", "top1_err", "top5_err"} <= set(row) or not row.get(
                "paper_scales", row.get("scales")
            ):
                log.warning("run %s: incomplete %s row %s; left out", run["run_id"], EVAL_ARTIFACT, row)
                continue
            qs = tuple(sorted(int(q) for q in (row.get("paper_scales") or row["scales"])))
            key = (config, run["train_scale"], row["protocol"], qs)
            ours[key] = {**row, "run_id": run["run_id"]}

    def keys_for(number: int, extra: Iterable[tuple]) -> list[tuple]:
        keys = [(r.config, r.train_scale, r.protocol, r.test_scales) for r in paper.table(number)]
        keys += [k for k in extra if k not in keys]
        return sorted(dict.fromkeys(keys), key=row_order)

    t3 = keys_for(3, [(c, s, DENSE, (paper.single_test_scale(s),)) for c, s in trained])
    t4 = keys_for(4, [k for k in ours if k[2] == DENSE and k[3] == paper.multi_test_scales(k[1])])
    with_crops = {
        (k[0], k[1]) for k in ours if k[2] in (MULTICROP, COMBINED) and k[3] == paper.multi_test_scales(k[1])
    }
    t5 = keys_for(
        5,
        [(c, s, p, paper.multi_test_scales(s)) for c, s in with_crops for p in (DENSE, MULTICROP, COMBINED)],
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


def row_order(key: tuple) -> tuple:
    """Sort key of a table row (config, train scale, protocol, test scales): the paper's order."""
    config, train_scale, protocol, qs = key
    c = paper.CONFIG_ORDER.index(config) if config in paper.CONFIG_ORDER else len(paper.CONFIG_ORDER)
    bounds = [int(x) for x in normalize_scale(train_scale).split("-") if x] or [0]
    lo, hi = bounds[0], bounds[-1]
    s = paper.TRAIN_SCALE_ORDER.index(train_scale) if train_scale in paper.TRAIN_SCALE_ORDER else 99
    p = PROTOCOLS.index(protocol) if protocol in PROTOCOLS else 99
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
        **ours_columns(ours),
        "run_id": ours["run_id"] if ours else None,
        "paper_top1": ref.top1_err if ref else None,
        "paper_top5": ref.top5_err if ref else None,
        "paper_test_top5": None,
    }


def ours_columns(ours: dict[str, Any] | None) -> dict[str, Any]:
    """Our error rates with their 95 % Wilson interval and n: ours_top1, ours_top1_lo, ours_top1_hi, the same
    for top-5, ours_n. The bounds come from the evaluation's row, else from the rate and n (None without n)."""
    out: dict[str, Any] = {}
    n = ours.get("n") if ours else None
    for k in ("top1", "top5"):
        err = ours.get(f"{k}_err") if ours else None
        lo, hi = (ours.get(f"{k}_lo"), ours.get(f"{k}_hi")) if ours else (None, None)
        if err is not None and n and (lo is None or hi is None):
            lo, hi = (100.0 * b for b in wilson_interval(err * n / 100.0, int(n)))
        out[f"ours_{k}"], out[f"ours_{k}_lo"], out[f"ours_{k}_hi"] = err, lo, hi
    out["ours_n"] = n
    return out


def _fusion_table(fusion_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 6: our fused rows matched to the paper's D/[256;512] + E/[256;512] rows."""

    def split(models: Iterable[str]) -> tuple[str, str]:
        parts = [m.split("/", 1) + [""] for m in sorted(models)]
        configs = "+".join(p[0] for p in parts)
        scales = sorted({normalize_scale(p[1]) for p in parts})
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
        row.update(**ours_columns(f), run_ids=list(f.get("run_ids", [])))
    return [rows[k] for k in sorted(rows, key=row_order)]


def normalize_scale(label: str) -> str:
    """'256', '256-512', '[256;512]' or '256,512' -> '256' / '256-512'."""
    digits = "".join(c if c.isdigit() else " " for c in str(label)).split()
    if len(digits) == 2 and digits[0] == digits[1]:
        digits = digits[:1]
    return "-".join(digits)
