"""`vggdist demo --quick` end to end (Fashion-MNIST → image folder → shards → mini sweep → report), then a rerun of
the same sweep that must skip every finished stage (found through MLflow).

Both run while a user's `ray start --head` is up on the machine (recorded where Ray's processes look for it:
RAY_TMPDIR): each starts its own private Ray ("Ray: local"), and the head keeps its nodes and jobs, as for the
preprocessing and training of tests/test_startup.py."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_cluster import user_head
from vggdist import tracking
from vggdist.report_findings import CLAIMS

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _env(tmp, ray_tmpdir):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'work' / 'mlflow.db'}",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TMPDIR": ray_tmpdir,  # where the user's head is recorded
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _first_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip())


@pytest.fixture
def head():
    cluster, ray_tmpdir = user_head()
    try:
        yield cluster, ray_tmpdir
    finally:
        cluster.stop()


@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (make demo installs it)",
)
def test_quick_demo_then_sweep_rerun_skips_finished_stages(tmp_path, head):
    cluster, ray_tmpdir = head
    before = cluster.gcs_state()
    work = tmp_path / "work"
    t0 = time.time()
    # 40 training images per class, not --quick's 100: one epoch per stage shows the plumbing, which is what this
    # test checks; the 200 test images that every claim is scored on stay as they are
    demo = [sys.executable, "-m", "vggdist.cli", "demo", "--quick", "--train-per-class", "40"]
    p = subprocess.run(
        [*demo, "--workdir", str(work)],
        env=_env(tmp_path, ray_tmpdir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    # its own private Ray, not the head recorded on the machine, which it leaves as it was
    assert _first_line(p.stderr).startswith("Ray: local, "), p.stderr[-2000:]
    assert "Connecting to existing Ray cluster" not in p.stderr
    assert cluster.gcs_state() == before
    assert "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    assert (
        len(p.stdout.splitlines()) < 80
    )  # a screen or two: the tables are in report.md, the findings end it
    md = (work / "report" / "report.md").read_text()
    assert "## Table 3" in md and re.search(r"\| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", md)
    assert not (
        work / "sweep-in-progress"
    ).exists()  # only an interrupted demo leaves its sweep name to resume
    # error rates with their 95 % intervals and n; the findings table, one row per claim, ends the output
    assert re.search(r"A \d+\.\d% \[\d+\.\d, \d+\.\d\] \(n=\d+\)", p.stdout)  # best error per config, with CI
    findings = p.stdout[p.stdout.rindex("## Findings") :]
    assert p.stdout.index("mlflow ui") < p.stdout.rindex("## Findings")
    assert all(claim in findings for claim in CLAIMS) and "McNemar" in p.stdout
    assert findings.rstrip().splitlines()[-1].startswith("| fusion beats the best single net |")
    assert {f.name for f in (work / "report").iterdir()} >= {
        "report.md",
        "tables.csv",
        "tables.json",
        "error_vs_depth.png",
        "training_curves.png",
    }
    uri = f"sqlite:///{work / 'mlflow.db'}"
    runs = tracking.find_runs("vggdist-demo", uri=uri)
    parent = next(r for r in runs if r["tags"].get("vggdist.sweep") == "parent")
    children = [r for r in runs if r["tags"].get("vggdist.sweep") == parent["run_id"]]
    assert sorted(r["tags"]["vggdist.stage"] for r in children) == [
        "1-A-S256",
        "1-D-S256-random",
        "2-B-S256",
        "2-D-S256",
        "4-D-S256-512",
    ]
    assert all(
        r["status"] == "FINISHED"
        and "eval/dense/Q37-55-73/top1_err" in r["metrics"]
        or r["tags"]["vggdist.stage"] != "4-D-S256-512"
        for r in children
    )
    by_stage = {r["tags"]["vggdist.stage"]: r for r in children}
    assert (
        by_stage["2-D-S256"]["tags"]["vggdist.init_from"] == by_stage["1-A-S256"]["run_id"]
    )  # staged init lineage
    assert by_stage["4-D-S256-512"]["tags"]["vggdist.init_from"] == by_stage["2-D-S256"]["run_id"]
    assert "eval/combined/Q37-55-73/top1_err" in by_stage["4-D-S256-512"]["metrics"]
    assert all("eval_outcomes.npz" in tracking.list_artifacts(r["run_id"], uri=uri) for r in children)
    first = time.time() - t0

    # the same sweep again: every stage is FINISHED and evaluated in MLflow, so nothing is retrained
    name = parent["tags"]["vggdist.sweep_name"]
    t1 = time.time()
    again = subprocess.run(
        [sys.executable, "-m", "vggdist.cli", "sweep", "--data", str(work / "shards"), "--plan", "mini", "--workers", "1",
         "--experiment", "vggdist-demo", "--name", name, "--set", f"run.storage_path={work / 'ray_results'}", "--set", "schedule.epochs=1"],
        env=_env(tmp_path, ray_tmpdir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _first_line(again.stderr).startswith("Ray: local, ") and cluster.gcs_state() == before
    assert "skipping finished stages" in again.stderr + again.stdout
    runs_after = tracking.find_runs("vggdist-demo", uri=uri)
    assert len(runs_after) == len(runs)  # no new child run
    assert "every stage and the fusion are done already" in again.stderr + again.stdout
    assert time.time() - t1 < first
