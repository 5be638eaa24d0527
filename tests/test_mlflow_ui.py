"""The MLflow UI as a user sees it, in a real headless Chromium (Debian package `chromium`).

A short `vggdist train` (one epoch, tiny shards) logs into a SQLite store; `mlflow server` serves that store on
127.0.0.1; Chromium loads the experiment's runs page by the link vggdist prints (`tracking.runs_page`), whose
rendered DOM must show the run and the shards as its dataset, and the run's page, which must show its metrics,
its system metrics and its datasets. (MLflow 3.17's runs table shows metric columns only once a user picks
them under "Columns"; the run's page lists them all.) Skipped only where no
Chromium is installed (`make test` installs it best-effort, scripts/install_chromium.sh).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.tiny_data import make_shards
from vggdist import tracking

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(
    url: str, profile: Path, *, screenshot: Path | None = None, budget_ms: int = 20000, window: str = "1600,1000"
) -> str:
    """The DOM of `url` after `budget_ms` of virtual time (the single-page app renders in it)."""
    cmd = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        f"--window-size={window}", f"--virtual-time-budget={budget_ms}",
    ]  # fmt: skip
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    p = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_runs_page_shows_the_run_its_metrics_and_its_dataset(tmp_path):
    data = make_shards(tmp_path, train_per_class=16, val_per_class=4)
    store = tmp_path / "mlflow"
    store.mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [sys.executable, "-m", "vggdist.cli", "train", "--config", "A", "--preset", "mini", "--data", str(data),
         "--epochs", "1", "--workers", "1", "--run-name", "ui-A", "--storage-path", str(tmp_path / "ray"),
         "--set", "optim.global_batch_size=16"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tracking.find_runs("vggdist", uri=env["MLFLOW_TRACKING_URI"])[0]

    server = MlflowServer(store)
    server.start()
    try:
        runs_page = chromium(tracking.runs_page(server.uri, run["experiment_id"]), tmp_path / "profile")
        run_page = chromium(
            f"{server.uri}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}?workflowType=machine_learning",
            tmp_path / "profile",
        )
    finally:
        server.stop()
    # the runs table (not the GenAI overview the UI opens by default): the run, by name, and its Dataset column
    assert "Run Name" in runs_page and "ui-A" in runs_page
    assert f"{data.name}/train" in runs_page
    # the run's page: its metrics with their values, its system metrics and its datasets
    assert "val/top1_err" in run_page and "train/loss" in run_page
    assert "system/cpu_utilization_percentage" in run_page
    assert f"{data.name}/train" in run_page and ">training<" in run_page  # the dataset and its context tag
