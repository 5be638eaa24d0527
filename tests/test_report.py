"""vggdist.report on real MLflow stores: a small sweep (parent + child runs with the tags and artifacts
`vggdist sweep` writes) in a sqlite store, and once against a real `mlflow server` (slow)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from vggdist import paper
from vggdist.report import make_report

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

try:  # another helper's fixture; the server test is skipped without it
    from tests.mlflow_server import mlflow_server  # noqa: F401 - fixture
except ImportError:  # pragma: no cover
    mlflow_server = None

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MINI_Q = {256: 37, 384: 55, 512: 73, 224: 32, 288: 41}  # paper Q -> mini Q at crop 32


def _row(protocol: str, paper_scales: list[int], top1: float, top5: float, n: int = 1000) -> dict:
    return {
        "protocol": protocol,
        "scales": [MINI_Q[q] for q in paper_scales],
        "paper_scales": paper_scales,
        "top1_err": top1,
        "top5_err": top5,
        "n": n,
    }


def _child(
    client,
    exp_id,
    parent_id,
    config,
    train_scale,
    stage,
    *,
    rows=None,
    metrics=None,
    params=None,
    t=0,
    link="nested",
):
    run = client.create_run(
        exp_id,
        start_time=t,
        run_name=stage,
        tags={
            # `vggdist sweep` sets both; either one marks a child of the sweep.
            **({"mlflow.parentRunId": parent_id} if link in ("nested", "both") else {}),
            **({"vggdist.sweep": parent_id} if link in ("sweep", "both") else {}),
            "vggdist.config": config,
            "vggdist.stage": stage,
            "vggdist.train_scale": train_scale,
        },
    )
    rid = run.info.run_id
    if rows is not None:
        payload = {"run_id": rid, "config": config, "train_scale": train_scale, "rows": rows}
        client.log_dict(rid, payload, "eval_results.json")
    for k, v in (params or {}).items():
        client.log_param(rid, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid)
    return rid


MULTI = [256, 384, 512]


def build_sweep(client: mlflow.MlflowClient, exp_id: str, *, plan: str = "mini", t0: int = 1000) -> dict:
    """A parent run and children covering: results, a missing evaluation, metrics only, a config the paper
    does not list in Table 4, and a D+E fusion on the parent. Returns the run ids."""
    parent = client.create_run(
        exp_id, start_time=t0, run_name="sweep", tags={"vggdist.sweep": "parent", "vggdist.plan": plan}
    )
    pid = parent.info.run_id
    ids = {"parent": pid}
    ids["A"] = _child(
        client, exp_id, pid, "A", "256", "1-A-S256", t=t0 + 1,
        rows=[_row("dense", [256], 41.25, 12.5), _row("dense", [224, 256, 288], 40.0, 12.0)],
    )  # fmt: skip
    ids["A-LRN"] = _child(
        client, exp_id, pid, "A-LRN", "256", "2-A-LRN-S256", t=t0 + 2,
        rows=[_row("dense", [256], 42.0, 13.0), _row("dense", [224, 256, 288], 41.5, 12.75)],
    )  # fmt: skip
    ids["C384"] = _child(client, exp_id, pid, "C", "384", "3-C-S384", t=t0 + 3)  # never evaluated
    ids["D384"] = _child(
        client, exp_id, pid, "D", "384", "3-D-S384", t=t0 + 4,
        params={"data.crop_size": "32"},
        metrics={"eval/dense/Q55/top1_err": 33.5, "eval/dense/Q55/top5_err": 9.5, "val/top1_err": 50.0},
    )  # fmt: skip
    for config, base in (("D", 30.0), ("E", 31.0)):
        ids[config] = _child(
            client, exp_id, pid, config, "256-512", f"4-{config}-S256-512", t=t0 + 5,
            link="sweep" if config == "E" else "both",
            rows=[
                _row("dense", [384], base + 1.5, 8.25),
                _row("dense", MULTI, base, 8.0),
                _row("multicrop", MULTI, base - 0.5, 7.75),
                _row("combined", MULTI, base - 1.0, 7.5),
            ],
        )  # fmt: skip
    fusion = {
        "rows": [
            {"models": ["D/256-512", "E/256-512"], "run_ids": [ids["D"], ids["E"]], "protocol": p,
             "scales": [37, 55, 73], "paper_scales": MULTI, "top1_err": v, "top5_err": 6.5, "n": 1000}
            for p, v in (("dense", 28.5), ("multicrop", 28.25), ("combined", 28.0))
        ]
    }  # fmt: skip
    client.log_dict(pid, fusion, "fusion_results.json")
    return ids


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite database (creating one runs every migration: seconds), copied per test."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("vggdist", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def _find(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_report_tables_files_and_artifacts(store, tmp_path):
    uri, client, exp_id = store
    old = build_sweep(client, exp_id, plan="paper", t0=1000)
    client.log_dict(  # the older sweep's D differs, so a report of the wrong sweep is caught
        old["D"], {"rows": [_row("dense", [384], 99.0, 99.0)]}, "eval_results.json"
    )
    ids = build_sweep(client, exp_id, plan="mini", t0=5000)

    out = make_report(out_dir=tmp_path / "rep", uri=uri)
    assert out["sweep_run_id"] == ids["parent"]  # the latest sweep by default
    t = out["tables"]

    # Table 3: ours (dense at Q = S, or Q = 384 for S in [256;512]) beside the paper.
    d = _find(t["3"], config="D", train_scale="256-512")
    assert (d["test_scales"], d["ours_top1"], d["ours_top5"], d["ours_n"]) == ([384], 31.5, 8.25, 1000)
    assert (d["paper_top1"], d["paper_top5"], d["run_id"]) == (25.6, 8.1, ids["D"])
    # the 95 % Wilson interval of 315 errors in 1000 images, by hand: centre (p + z²/2n)/(1 + z²/n) = 0.315708,
    # half-width z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²) = 0.028744
    assert (d["ours_top1_lo"], d["ours_top1_hi"]) == (
        pytest.approx(28.696, abs=1e-3),
        pytest.approx(34.445, abs=1e-3),
    )
    c = _find(t["3"], config="C", train_scale="384")  # run without results: ours is missing
    assert (c["ours_top1"], c["ours_top5"], c["paper_top1"], c["paper_top5"]) == (None, None, 28.1, 9.3)
    d384 = _find(t["3"], config="D", train_scale="384")  # from metrics Q55 -> paper Q384
    assert (d384["ours_top1"], d384["ours_top5"], d384["paper_top1"]) == (33.5, 9.5, 26.8)
    assert d384["ours_n"] is None and d384["ours_top1_lo"] is None  # from metrics only: no n, no interval
    b = _find(t["3"], config="B", train_scale="256")  # paper row, no run of ours
    assert (b["ours_top1"], b["paper_top1"], b["paper_top5"]) == (None, 28.7, 9.9)
    assert [(r["config"], r["train_scale"]) for r in t["3"]][:4] == [
        ("A", "256"),
        ("A-LRN", "256"),
        ("B", "256"),
        ("C", "256"),
    ]
    assert len(t["3"]) == len(paper.table(3))  # every run of ours is one of the paper's rows here

    # Table 4: A-LRN is not in the paper's Table 4 but ours is shown, with paper "—".
    alrn = _find(t["4"], config="A-LRN")
    assert (alrn["test_scales"], alrn["ours_top1"], alrn["paper_top1"]) == ([224, 256, 288], 41.5, None)
    e4 = _find(t["4"], config="E", train_scale="256-512")
    assert (e4["ours_top1"], e4["paper_top1"], e4["paper_top5"]) == (31.0, 24.8, 7.5)
    assert _find(t["4"], config="C", train_scale="384")["ours_top1"] is None

    # Table 5 and 6.
    e5 = _find(t["5"], config="E", protocol="combined")
    assert (e5["ours_top1"], e5["ours_top5"], e5["paper_top1"], e5["paper_top5"]) == (30.0, 7.5, 24.4, 7.1)
    assert len(t["5"]) == 6
    f = _find(t["6"], protocol="combined")
    assert (f["config"], f["ours_top1"], f["paper_top1"], f["paper_top5"], f["paper_test_top5"]) == (
        "D+E",
        28.0,
        23.7,
        6.8,
        6.8,
    )
    assert f["run_ids"] == [ids["D"], ids["E"]]
    assert len(t["6"]) == 3

    # Markdown: both numbers on one line, "—" where missing, the mini caveat.
    md = out["markdown"]
    assert "| D | [256;512] | 384 | 31.50 [28.70, 34.45] | 8.25 [6.70, 10.12] | 25.6 | 8.1 | 1000 |" in md
    assert "| C | 384 | 384 | — | — | 28.1 | 9.3 | — |" in md
    assert "| A-LRN | 256 | 224,256,288 | 41.50 [38.48, 44.58] | 12.75 [10.82, 14.96] | — | — | 1000 |" in md
    assert (
        "| E | [256;512] | 256,384,512 | multi-crop & dense | 30.00 [27.24, 32.91] | 7.50 [6.03, 9.30] | 24.4 | 7.1 | 1000 |"
        in md
    )
    assert (
        "| D/256-512 + E/256-512 | [256;512] | 256,384,512 | dense | 28.50 [25.79, 31.38] | 6.50 [5.13, 8.20] "
        "| 24.0 | 7.1 | 7.0 | 1000 |" in md
    )
    assert "Fashion-MNIST" in md and "arXiv:1409.1556" in md
    # runs evaluated before per-image outcomes were stored: no paired test, every claim "not measured"
    assert out["comparisons"] == [] and "No pair of evaluations to compare" in md
    assert {f["verdict"] for f in out["findings"]} == {"not measured in this plan"}
    assert md.rstrip().endswith(out["findings_markdown"].rstrip())
    assert ids["C384"] in md.split("## Runs of this sweep")[1]

    # Files: report.md is the Markdown; CSV and JSON hold the same numbers.
    files = {Path(p).name: Path(p) for p in out["files"]}
    assert set(files) == {
        "report.md",
        "tables.csv",
        "tables.json",
        "error_vs_depth.png",
        "training_curves.png",
    }
    assert files["report.md"].read_text() == md
    with open(files["tables.csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "table", "config", "train_scale", "test_scales", "protocol",
        "ours_top1", "ours_top1_lo", "ours_top1_hi", "ours_top5", "ours_top5_lo", "ours_top5_hi", "ours_n",
        "paper_top1", "paper_top5",
    ]  # fmt: skip
    assert len(rows) == sum(len(v) for v in t.values())
    r = _find(rows, table="4", config="D", train_scale="256-512")
    assert (r["test_scales"], r["ours_top1"], r["paper_top1"], r["paper_top5"]) == (
        "256-384-512",
        "30.0",
        "24.8",
        "7.5",
    )
    r = _find(rows, table="3", config="C", train_scale="384")
    assert (r["ours_top1"], r["ours_top5"], r["paper_top1"]) == ("", "", "28.1")
    r = _find(rows, table="6", protocol="multicrop")
    assert (r["config"], r["ours_top1"], r["paper_top1"], r["paper_top5"]) == ("D+E", "28.25", "23.9", "7.2")
    data = json.loads(files["tables.json"].read_text())
    assert (data["sweep_run_id"], data["plan"]) == (ids["parent"], "mini")
    assert data["tables"] == t

    png = files["error_vs_depth.png"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    with Image.open(files["error_vs_depth.png"]) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 600

    # Logged on the sweep's parent run, not on the older sweep.
    logged = {Path(a.path).name for a in client.list_artifacts(ids["parent"], "report")}
    assert logged == set(files)
    assert client.list_artifacts(old["parent"], "report") == []
    dst = client.download_artifacts(ids["parent"], "report/report.md", str(tmp_path / "dl"))
    assert Path(dst).read_text() == md


def test_report_of_an_older_sweep_by_id(store, tmp_path):
    uri, client, exp_id = store
    old = build_sweep(client, exp_id, plan="paper", t0=1000)
    client.log_dict(old["D"], {"rows": [_row("dense", [384], 99.0, 98.0)]}, "eval_results.json")
    build_sweep(client, exp_id, plan="mini", t0=5000)

    out = make_report(out_dir=tmp_path / "rep", sweep_run_id=old["parent"], uri=uri)
    d = _find(out["tables"]["3"], config="D", train_scale="256-512")
    assert (d["ours_top1"], d["ours_top5"], d["paper_top1"]) == (99.0, 98.0, 25.6)
    assert "Fashion-MNIST" not in out["markdown"]  # plan "paper"
    assert {a.path for a in client.list_artifacts(old["parent"], "report")} >= {"report/report.md"}


def test_no_sweep_is_a_clear_error(store, tmp_path):
    uri, client, exp_id = store
    client.create_run(exp_id, tags={"vggdist.config": "A"})  # a run, but no sweep parent
    for experiment in ("vggdist", "no-such-experiment"):
        with pytest.raises(ValueError, match="`vggdist sweep`") as e:
            make_report(experiment=experiment, out_dir=tmp_path / "rep", uri=uri)
        assert "\n" not in str(e.value) and experiment in str(e.value)
    assert not (tmp_path / "rep").exists()


def test_paper_numbers():
    assert [len(paper.table(n)) for n in (3, 4, 5, 6)] == [12, 10, 6, 3]
    by_key = {(r.table, r.config, r.train_scale, r.protocol): r for r in paper.RESULTS}
    assert (by_key[3, "A", "256", "dense"].top1_err, by_key[3, "A", "256", "dense"].top5_err) == (29.6, 10.4)
    e3 = by_key[3, "E", "256-512", "dense"]
    assert (e3.test_scales, e3.top1_err, e3.top5_err) == ((384,), 25.5, 8.0)
    assert by_key[4, "C", "384", "dense"].test_scales == (352, 384, 416)
    assert by_key[5, "D", "256-512", "combined"].top5_err == 7.2
    fusion = {r.protocol: r for r in paper.table(6)}
    assert (fusion["dense"].top1_err, fusion["dense"].test_top5_err, fusion["multicrop"].test_top5_err) == (
        24.0,
        7.0,
        None,
    )
    assert paper.single_test_scale("256-512") == 384 and paper.multi_test_scales("256") == (224, 256, 288)
    assert paper.WEIGHT_LAYERS["E"] == 19
    with pytest.raises(ValueError, match="256-512"):
        paper.single_test_scale("big")


@pytest.mark.slow
@pytest.mark.skipif(mlflow_server is None, reason="tests/mlflow_server.py not available")
def test_report_against_mlflow_server(mlflow_server, tmp_path, monkeypatch):  # noqa: F811 - fixture
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.create_experiment(f"report-{tmp_path.name}")
    ids = build_sweep(client, exp_id)

    out = make_report(experiment=f"report-{tmp_path.name}", out_dir=tmp_path / "rep", uri=mlflow_server)
    assert out["sweep_run_id"] == ids["parent"]
    d = _find(out["tables"]["5"], config="D", protocol="multicrop")
    assert (d["ours_top1"], d["paper_top1"]) == (29.5, 24.6)
    assert _find(out["tables"]["3"], config="C", train_scale="384")["ours_top1"] is None
    logged = {Path(a.path).name for a in client.list_artifacts(ids["parent"], "report")}
    assert {"report.md", "error_vs_depth.png"} <= logged
    dst = client.download_artifacts(ids["parent"], "report/error_vs_depth.png", str(tmp_path / "dl"))
    assert Path(dst).read_bytes().startswith(PNG_MAGIC)


def test_reduced_scale_note_follows_the_plans_preset_or_the_runs_crop():
    from vggdist.report import _reduced_scale

    assert _reduced_scale([], "study") and _reduced_scale([], "mini") and not _reduced_scale([], "paper")
    assert _reduced_scale([{"crop_size": 32}, {"crop_size": 32}], "my-plan")  # a user plan on the mini preset
    assert not _reduced_scale([{"crop_size": 224}], "my-plan")
    assert not _reduced_scale([{"crop_size": 32}, {"crop_size": None}], "my-plan")  # unknown: no claim
