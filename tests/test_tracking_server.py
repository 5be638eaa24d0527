"""`Tracker` against a real `mlflow server` subprocess (slow): round trip, resume and a child run; the server going
away mid-run and coming back; and going away for longer than the run, after which `vggdist sync` delivers the
spool; a sweep stage waiting for the server to come back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port, mlflow_server_process  # noqa: F401 - fixture
from tests.tracking_helpers import HTTP_VARS, tracking_warnings
from vggdist import tracking
from vggdist.cli import main as cli_main
from vggdist.tracking import (
    TAG_CHECKPOINT,
    TAG_CONFIG,
    Tracker,
    find_runs,
    get_run,
    metric_history,
)


@pytest.mark.slow
def test_server_round_trip_resume_and_child(mlflow_server_process: MlflowServer, tmp_path):  # noqa: F811
    uri = mlflow_server_process.uri
    parent = Tracker.start("server", run_name="sweep", uri=uri)
    t = Tracker.start("server", run_name="B", parent_run_id=parent.run_id, uri=uri, tags={TAG_CONFIG: "B"})
    t.log_params({"optim.lr": 0.01})
    t.log_metrics({"train/loss": 1.5, "lr": 0.01}, step=0)
    (tmp_path / "config.yaml").write_text("model: B\n")
    t.log_artifact(tmp_path / "config.yaml")
    t.end("KILLED")

    again = Tracker.start("server", run_id=t.run_id, uri=uri)
    again.log_params({"optim.lr": 0.01})
    again.log_metrics({"train/loss": 1.0}, step=1)
    assert again.end() and parent.end()

    run = get_run(t.run_id, uri=uri)
    assert run["status"] == "FINISHED" and run["params"] == {"optim.lr": "0.01"}
    assert run["tags"][TAG_CONFIG] == "B" and run["parent_run_id"] == parent.run_id
    assert run["artifact_uri"].startswith("mlflow-artifacts:")
    assert metric_history(t.run_id, "train/loss", uri=uri) == [(0, 1.5), (1, 1.0)]
    assert {r["name"] for r in find_runs("server", uri=uri)} == {"sweep", "B"}
    got = tracking.download_artifact(t.run_id, "config.yaml", tmp_path / "dl", uri=uri)
    assert Path(got).read_text() == "model: B\n"
    # and the artifact really went through the server into its --artifacts-destination
    assert list(mlflow_server_process.artifacts.rglob("config.yaml"))


@pytest.mark.slow
def test_server_outage_mid_run_loses_nothing(
    mlflow_server_process: MlflowServer,  # noqa: F811
    caplog,
    monkeypatch,
    tmp_path,
):
    for name in HTTP_VARS:
        monkeypatch.delenv(name, raising=False)
    server = mlflow_server_process
    t = Tracker.start("outage", run_name="E", uri=server.uri, spool_dir=tmp_path / "E" / "mlflow_spool")
    t.log_params({"optim.lr": 0.01})
    t.log_metrics({"train/loss": 4.0}, step=0)
    assert t.flush(timeout_s=30) and t.pending == 0

    server.stop()
    slowest = 0.0
    for step in range(1, 6):
        started = time.monotonic()
        t.log_metrics({"train/loss": 4.0 - step}, step=step)
        t.set_tags({TAG_CHECKPOINT: f"/ckpt/epoch{step}"})
        slowest = max(slowest, time.monotonic() - started)
    t.log_params({"data.train_scale": 256})
    t.log_text("written during the outage", "outage.txt")
    assert slowest < 0.5, f"a logging call took {slowest:.1f} s against a dead server"
    assert t.pending == 12 and not t.flush(timeout_s=1.5)
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0]

    server.start()  # same port, same database
    assert t.flush(timeout_s=60) and t.pending == 0
    assert "reachable again" in tracking_warnings(caplog)[-1]
    assert t.end()

    run = get_run(t.run_id, uri=server.uri)
    assert run["status"] == "FINISHED"
    assert run["params"] == {"optim.lr": "0.01", "data.train_scale": "256"}
    assert run["tags"][TAG_CHECKPOINT] == "/ckpt/epoch5"
    assert metric_history(t.run_id, "train/loss", uri=server.uri) == [(s, 4.0 - s) for s in range(6)]
    got = tracking.download_artifact(t.run_id, "outage.txt", tmp_path, uri=server.uri)
    assert Path(got).read_text() == "written during the outage"


@pytest.mark.slow
def test_a_sweep_stage_waits_for_mlflow_to_come_back(
    mlflow_server_process: MlflowServer,  # noqa: F811
    caplog,
):
    """A stage that must create its run during an outage waits (`wait_reachable`) instead of ending the sweep;
    a server that stays away ends the wait with the ConnectionError of `check_reachable`."""
    server = mlflow_server_process
    server.stop()
    back = threading.Timer(1.0, server.start)
    back.start()
    try:
        tracking.wait_reachable(server.uri, 120, "stage 2-B", poll_s=0.5)
    finally:
        back.join()
    assert server.running
    said = tracking_warnings(caplog)
    assert "stage 2-B waits for it" in said[0] and "cannot reach MLflow" in said[0]
    assert said[-1] == f"MLflow at {server.uri} is back: stage 2-B goes on" and len(said) == 2

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach MLflow"):
        tracking.wait_reachable(dead, 1.0, "stage 3-C", poll_s=0.5)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_outage_longer_than_the_run_then_vggdist_sync(
    mlflow_server_process: MlflowServer,  # noqa: F811
    caplog,
    capsys,
    tmp_path,
):
    server = mlflow_server_process
    storage = tmp_path / "storage"
    t = Tracker.start("long-outage", run_name="D", uri=server.uri, spool_dir=storage / "D" / "mlflow_spool")
    t.log_params({"optim.lr": 0.01})
    t.log_metrics({"val/top1_err": 90.0}, step=1)
    assert t.flush(timeout_s=30)

    server.stop()
    for epoch in (2, 3):
        t.log_metrics({"val/top1_err": 90.0 - epoch}, step=epoch)
        t.set_tags({TAG_CHECKPOINT: f"/ckpt/epoch_{epoch:03d}"})
        t.sync()
    (tmp_path / "table.md").write_text("| a |\n")
    t.log_artifact(tmp_path / "table.md", "eval")
    (tmp_path / "table.md").unlink()  # the spool holds its own copy
    started = time.monotonic()
    assert not t.end("FINISHED", wait_s=2)
    assert time.monotonic() - started < 10
    last = tracking_warnings(caplog)[-1]
    assert "stay spooled" in last and f"vggdist sync {storage / 'D'}" in last and "status FINISHED" in last

    server.start()
    run = get_run(t.run_id, uri=server.uri)
    assert run["status"] == "RUNNING"  # nothing arrived while it was down
    assert metric_history(t.run_id, "val/top1_err", uri=server.uri) == [(1, 90.0)]

    assert cli_main(["sync", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "delivered 6 logging calls" in out and t.run_id in out
    run = get_run(t.run_id, uri=server.uri)
    assert run["status"] == "FINISHED" and run["tags"][TAG_CHECKPOINT] == "/ckpt/epoch_003"
    rows = tracking.metric_rows(t.run_id, "val/top1_err", uri=server.uri)
    assert sorted(s for s, _, _ in rows) == [1, 2, 3]  # every epoch, each once
    got = tracking.download_artifact(t.run_id, "eval/table.md", tmp_path / "dl", uri=server.uri)
    assert Path(got).read_text() == "| a |\n"

    assert cli_main(["sync", str(storage)]) == 0  # again: nothing left, nothing sent twice
    assert "nothing spooled" in capsys.readouterr().out
    assert len(tracking.metric_rows(t.run_id, "val/top1_err", uri=server.uri)) == 3
    assert cli_main(["sync", str(tmp_path / "missing")]) == 2
