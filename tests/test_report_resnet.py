"""`vggdist report` on a degradation sweep (He et al. 2016): Table 6 rows, paired tests, findings, the Fig. 4 and
depth plots, from a synthetic sweep with known per-image outcomes in a real MLflow SQLite store.

With b and c the images only one side gets right, McNemar's exact p = min(1, 2·P[X ≤ min(b, c)]),
X ~ Binomial(b + c, 1/2): each p below is checked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_report import PNG_MAGIC, build_sweep, empty_db, store  # noqa: F401 - fixtures
from vggdist import report_resnet, runmeta
from vggdist.outcome_file import write_outcomes
from vggdist.outcomes import EvalKey, Outcomes
from vggdist.report import make_report
from vggdist.report_resnet_plots import depth_series
from vggdist.significance import NOT_REPRODUCED, REPRODUCED, WITHIN_NOISE

N = 40
KEYS = [f"val_{i:02d}" for i in range(N)]
# the images each net gets wrong (single and 10-crop alike, at Q = 256 paper units, 37 at crop 32)
WRONG = {"plain-20": 10, "plain-56": 20, "resnet-20": 8, "resnet-56": 6}
TRAIN = {
    "plain-20": (60.0, 40.0),
    "plain-56": (70.0, 55.0),
    "resnet-20": (55.0, 30.0),
    "resnet-56": (50.0, 25.0),
}


def _hits(wrong: int) -> np.ndarray:
    return np.arange(N) >= wrong  # wrong on the first `wrong` images


def _child(client, exp_id, pid, config, tmp: Path, t: int, keys=KEYS) -> str:
    tags = {"vggdist.sweep": pid, "mlflow.parentRunId": pid, "vggdist.config": config, "vggdist.stage": config,
            "vggdist.train_scale": "256-480"}  # fmt: skip
    rid = client.create_run(exp_id, start_time=t, run_name=config, tags=tags).info.run_id
    hits = _hits(WRONG[config])
    settings = {EvalKey(p, (37,)): hits for p in ("single", "tencrop")}
    path = tmp / rid / runmeta.EVAL_OUTCOMES
    path.parent.mkdir(parents=True)
    meta = {"split": "val", "test_scales": [37], "paper_test_scales": [256]}
    write_outcomes(path, Outcomes(list(keys), settings, dict(settings)), paper_scales={37: 256}, meta=meta)
    client.log_artifact(rid, str(path))
    rows = [{"protocol": p, "scales": [37], "paper_scales": [256], "top1_err": 100.0 * WRONG[config] / N,
             "top5_err": 0.0, "n": N} for p in ("single", "tencrop")]  # fmt: skip
    client.log_dict(rid, {"rows": rows}, "eval_results.json")
    for epoch, err in enumerate(TRAIN[config], start=1):
        client.log_metric(rid, runmeta.TRAIN_TOP1_ERR, err, step=epoch)
        client.log_metric(rid, runmeta.VAL_TOP1_ERR, err + 3, step=epoch)
    client.set_terminated(rid)
    return rid


def _degradation_sweep(client, exp_id, tmp: Path, t0: int = 5000) -> str:
    parent = client.create_run(exp_id, start_time=t0, run_name="sweep-deg",
                               tags={"vggdist.sweep": "parent", "vggdist.plan": "degradation-mini"})  # fmt: skip
    pid = parent.info.run_id
    for i, config in enumerate(WRONG):
        _child(client, exp_id, pid, config, tmp, t0 + 1 + i)
    return pid


def _one(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_degradation_report_tables_tests_findings_and_plots(store, tmp_path):  # noqa: F811 - fixture
    uri, client, exp_id = store
    pid = _degradation_sweep(client, exp_id, tmp_path)
    out = make_report(out_dir=tmp_path / "rep", uri=uri)
    assert out["sweep_run_id"] == pid
    res = out["resnet"]
    assert list(res["tables"]) == ["6"]  # CIFAR nets only: Table 6, not Table 2
    t6 = res["tables"]["6"]
    assert [r["config"] for r in t6] == ["plain-20", "plain-56", "resnet-20", "resnet-56"]
    r20 = _one(t6, config="resnet-20")
    assert (r20["paper_top1"], r20["ours_top1"], r20["ours_n"], r20["protocol"]) == (8.75, 20.0, N, "single")
    assert r20["ours_top1_lo"] < 20.0 < r20["ours_top1_hi"]  # a Wilson interval
    assert (r20["train_top1_final"], r20["val_top1_final"], r20["epochs"]) == (30.0, 33.0, 2)
    assert _one(t6, config="plain-56")["paper_top1"] is None  # the paper only plots the CIFAR plain nets
    assert _one(t6, config="resnet-56")["paper_top1"] == 6.97

    cmp = res["comparisons"]
    plain = _one(cmp, family="plain: depth")
    # plain-20 wrong on 0..9, plain-56 on 0..19: b = 10, c = 0 -> p = 2 / 2^10; deeper worse = the paper's claim
    assert (plain["a"], plain["b"], plain["n"], plain["delta"]) == ("plain-20", "plain-56", N, 25.0)
    assert plain["p_value"] == pytest.approx(2 / 2**10) and plain["verdict"] == REPRODUCED
    deep = _one(cmp, family="residual: depth")  # 8 vs 6 wrong: c = 2 -> p = 0.5
    assert deep["p_value"] == pytest.approx(0.5) and deep["verdict"] == WITHIN_NOISE
    same = [c for c in cmp if c["family"] == "plain vs residual, same depth"]
    assert [(c["a"], c["b"]) for c in same] == [("plain-20", "resnet-20"), ("plain-56", "resnet-56")]
    assert same[1]["p_value"] == pytest.approx(2 / 2**14) and same[1]["verdict"] == REPRODUCED

    found = {f["claim"]: f for f in res["findings"]}
    assert list(found) == list(report_resnet.CLAIMS)
    degrade = found[report_resnet.CLAIMS[0]]
    assert degrade["verdict"] == REPRODUCED and "final training error 40.00 → 55.00" in degrade["ours"]
    assert "running error" in degrade["note"]
    assert found[report_resnet.CLAIMS[1]]["verdict"] == WITHIN_NOISE
    assert found[report_resnet.CLAIMS[1]]["paper"] == "resnet-20 8.75 → resnet-56 6.97"
    assert found[report_resnet.CLAIMS[2]]["verdict"] == REPRODUCED  # judged at the deeper pair

    md = Path(tmp_path / "rep" / "report.md").read_text()
    assert "Table 6 (He et al. 2016)" in md and "Table 3:" not in md  # no empty VGG tables
    assert "| resnet-20 | 20 | 8.75 | 20.00 [" in md and "plain nets degrade with depth" in md
    doc = json.loads((tmp_path / "rep" / "tables.json").read_text())
    assert doc["resnet"]["findings"][0]["verdict"] == REPRODUCED
    for name in ("degradation_curves.png", "depth.png"):
        assert (tmp_path / "rep" / name).read_bytes().startswith(PNG_MAGIC)
    logged = {Path(a.path).name for a in client.list_artifacts(pid, "report")}
    assert {"report.md", "degradation_curves.png", "depth.png"} <= logged
    # no VGG plot (it would show only the VGG paper's curves)
    assert not {"error_vs_depth.png", "training_curves.png"} & (logged | {p.name for p in (tmp_path / "rep").iterdir()})


def test_a_vgg_and_a_degradation_sweep_on_one_depth_picture(store, tmp_path):  # noqa: F811 - fixture
    uri, client, exp_id = store
    vgg = build_sweep(client, exp_id)["parent"]
    deg = _degradation_sweep(client, exp_id, tmp_path)
    out = make_report(out_dir=tmp_path / "rep", uri=uri, sweep_run_id=[vgg, deg])
    assert out["sweep_run_id"] == vgg and _one(out["tables"]["3"], config="A", train_scale="256")["ours_top1"]
    series = depth_series(out["tables"], out["resnet"]["tables"])
    ours = {s["label"]: s["points"] for s in series if s["who"] == "ours"}
    assert [p[0] for p in ours["VGG A–E, S=256, Table 3 dense"]] == [
        11
    ]  # A; A-LRN is an ablation, not a depth
    assert [p[:2] for p in ours["plain (Table 6, single Q=256)"]] == [(20, 25.0), (56, 50.0)]
    assert [p[:2] for p in ours["residual (Table 6, single Q=256)"]] == [(20, 20.0), (56, 15.0)]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Table 3:" in md and "Table 6 (He et al. 2016)" in md
    assert (tmp_path / "rep" / "depth.png").read_bytes().startswith(PNG_MAGIC)


def test_runs_scored_on_different_images_are_not_paired():
    from vggdist.outcome_file import OutcomeFile, RowOutcome

    def run(config, keys):
        hits = _hits(WRONG[config])
        row = RowOutcome(np.array(keys), hits, hits)
        f = OutcomeFile({}, {EvalKey("single", (37,)): row}, {EvalKey("single", (37,)): (256,)})
        return {"config": config, "run_id": config, "outcomes": f, "history": {}, "rows": []}

    a, b = run("plain-20", KEYS), run("plain-56", [f"other_{i}" for i in range(N)])
    c = report_resnet.compare("plain: depth", a, b, "single", b_better=False)
    assert (c["verdict"], c["p_value"], c["a_err"], c["b_err"]) == ("not paired", None, 25.0, 50.0)
    assert "same images" in c["note"]
    found = report_resnet.findings([a, b])
    assert found[0]["verdict"] == "not paired" and found[1]["verdict"] == report_resnet.NOT_MEASURED
    assert NOT_REPRODUCED != found[0]["verdict"]
