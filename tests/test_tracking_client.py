"""Where MLflow is and what happens when it cannot be reached: the tracking URI, node-local stores on a cluster,
a dead server (fail fast at the start, logging never waits) and a server that never answers."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.mlflow_server import free_port
from tests.tracking_helpers import HTTP_VARS, in_tmp_cwd, tracking_warnings  # noqa: F401 - fixture
from vggdist import tracking
from vggdist.tracking import (
    Tracker,
    check_uri_for_cluster,
)


def test_tracking_uri_defaults_to_absolute_sqlite_in_cwd(in_tmp_cwd, monkeypatch):  # noqa: F811 - the fixture
    assert tracking.tracking_uri() == f"sqlite:///{in_tmp_cwd.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert tracking.tracking_uri() == "http://10.0.0.1:5000"


def test_check_uri_for_cluster():
    for local in ("sqlite:///tmp/mlflow.db", "sqlite:///mlflow.db", "file:///tmp/mlruns", "./mlruns"):
        check_uri_for_cluster(local, 1)
        with pytest.raises(
            ValueError, match=r"cannot be shared across nodes.*MLFLOW_TRACKING_URI=http://HEAD:5000"
        ):
            check_uri_for_cluster(local, 2)
    for remote in ("http://head:5000", "https://mlflow.example.com", "databricks", "postgresql://u@h/db"):
        assert not tracking.is_local_uri(remote)
        check_uri_for_cluster(remote, 64)


def test_dead_server_fails_fast_and_logging_never_waits(caplog, monkeypatch, tmp_path):
    for name in HTTP_VARS:
        monkeypatch.delenv(name, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach MLflow.*MLFLOW_TRACKING_URI"):
        Tracker.start(uri=dead)
    assert time.monotonic() - started < 15

    t = Tracker.attach("0" * 32, tmp_path / "run" / "mlflow_spool", uri=dead)  # no call to MLflow at all
    started = time.monotonic()
    for step in range(5):
        t.log_metrics({"train/loss": float(step)}, step=step)
        t.log_params({f"p{step}": step})
    assert time.monotonic() - started < 1.0
    assert t.pending == 10 and not t.flush(timeout_s=1.5)
    assert not t.close(wait_s=0.5)
    warnings = tracking_warnings(caplog)
    assert len([w for w in warnings if "unreachable" in w]) == 1  # one warning per outage, not per call
    assert "vggdist sync" in warnings[-1] and "10 logging calls" in warnings[-1]
    assert not any(name in os.environ for name in HTTP_VARS)  # our short HTTP policy is gone again
    assert t.pending == 10  # still on disk, in order
    segments = sorted((tmp_path / "run" / "mlflow_spool").glob("seg-*.jsonl"))
    lines = [json.loads(x) for seg in segments for x in seg.read_text().splitlines()][1:]
    assert [r["metrics"][0][3] for r in lines[::2]] == [0, 1, 2, 3, 4]


def test_a_server_that_never_answers_costs_training_nothing(tmp_path):
    """Packets dropped: MLflow's client waits 10 s per request there. Logging calls must not, nor closing."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # the kernel completes connections; nobody ever reads or answers
        t = Tracker.attach(
            "0" * 32, tmp_path / "run" / "mlflow_spool", uri=f"http://127.0.0.1:{hole.getsockname()[1]}"
        )
        slowest = 0.0
        for step in range(50):
            started = time.monotonic()
            t.log_metrics({"train/step_loss": 1.0 / (step + 1)}, step=step)
            slowest = max(slowest, time.monotonic() - started)
        time.sleep(1.5)  # the sender is now stuck in a request
        assert slowest < 0.05, f"a logging call took {slowest:.2f} s"
        started = time.monotonic()
        assert not t.close(wait_s=1)
        assert time.monotonic() - started < 5
        assert t.pending == 50
