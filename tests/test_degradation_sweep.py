"""`vggdist sweep --plan degradation-mini` shortened (tiny shards, 1 epoch) through real Ray and MLflow, then
`vggdist report`: the only test that trains He et al.'s four nets as a plan, scores them with the 10-crop test on
the Ray evaluation path and reads the result back into Table 6, the paired tests and the findings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_data import make_shards
from vggdist import report_resnet, tracking

pytestmark = pytest.mark.slow


def test_shortened_degradation_plan_trains_evaluates_and_reports(tmp_path):
    data = make_shards(tmp_path, train_per_class=16, val_per_class=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "vggdist.cli"]
    p = subprocess.run(
        [*cli, "sweep", "--data", str(data), "--plan", "degradation-mini", "--workers", "1",
         "--experiment", "deg", "--name", "deg-test",
         "--set", f"run.storage_path={tmp_path / 'ray'}", "--set", "schedule.epochs=1",
         "--set", "optim.global_batch_size=32", "--set", "run.log_every_steps=1"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = tracking.find_runs("deg", uri=uri)
    parent = next(r for r in runs if r["tags"].get("vggdist.sweep") == "parent")
    assert parent["tags"]["vggdist.plan"] == "degradation-mini"
    children = {r["tags"]["vggdist.stage"]: r for r in runs if r["tags"].get("vggdist.sweep") == parent["run_id"]}
    assert sorted(children) == ["plain-20", "plain-56", "resnet-20", "resnet-56"]
    for key, r in children.items():
        assert r["status"] == "FINISHED" and r["tags"]["vggdist.evaluated"] == "true"
        assert (r["tags"]["vggdist.config"], r["tags"]["vggdist.train_scale"]) == (key, "256-480")
        assert (r["params"]["run.init"], r["params"]["model.shortcut"]) == ("he", "A")
        # the centre crop and He et al.'s 10-crop test at Q = 256 (37 at crop 32), on all 20 test images
        assert {"eval/single/Q37/top1_err", "eval/tencrop/Q37/top1_err"} <= set(r["metrics"])

    out = tmp_path / "report"
    p = subprocess.run([*cli, "report", "--experiment", "deg", "--out", str(out), "--sweep", parent["run_id"]],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "tables.json").read_text())
    rows = {r["config"]: r for r in doc["resnet"]["tables"]["6"]}
    assert all(rows[c]["ours_n"] == 20 and rows[c]["train_top1_final"] is not None for c in rows)
    assert [c["n"] for c in doc["resnet"]["comparisons"]] == [20, 20, 20, 20]  # paired by image
    assert [f["claim"] for f in doc["resnet"]["findings"]] == list(report_resnet.CLAIMS)
    assert "Table 6 (He et al. 2016)" in p.stdout
    assert {"degradation_curves.png", "depth.png"} <= {f.name for f in Path(out).iterdir()}
