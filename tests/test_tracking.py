"""vggdist.tracking against real MLflow stores: the sqlite default in a temp cwd, and a real `mlflow server`
subprocess (slow tests), including the server going away mid-run and coming back, and going away for longer
than the run (then `vggdist sync` delivers the spool)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vggdist import __version__, tracking
from vggdist.cli import main as cli_main
from vggdist.tracking import (
    TAG_CHECKPOINT,
    TAG_CONFIG,
    TAG_STAGE,
    NullTracker,
    Tracker,
    check_uri_for_cluster,
    eval_metric_name,
    find_runs,
    get_run,
    metric_history,
    resolve_checkpoint,
)

try:  # `python -m pytest` puts the repo root on sys.path; plain `pytest` only tests/
    from tests.mlflow_server import MlflowServer, free_port, mlflow_server_process  # noqa: F401 - fixture
except ModuleNotFoundError:
    from mlflow_server import MlflowServer, free_port, mlflow_server_process  # noqa: F401 - fixture

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
HTTP_VARS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """A temp working directory with MLflow's default (no MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store shared by the module's fast tests (creating one costs ~1 s of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


def _tracking_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("vggdist.tracking") and r.levelno >= logging.WARNING
    ]


# ----------------------------------------------------------------------------------------- URIs, names


def test_tracking_uri_defaults_to_absolute_sqlite_in_cwd(in_tmp_cwd, monkeypatch):
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


def test_eval_metric_names_round_trip():
    assert eval_metric_name("combined", [512, 256, 384], "top5_err") == "eval/combined/Q256-384-512/top5_err"
    assert eval_metric_name("single", (224,), "top1_err") == "eval/single/Q224/top1_err"
    assert tracking.parse_eval_metric_name("eval/dense/Q32-48/top1_err") == ("dense", (32, 48), "top1_err")
    assert tracking.parse_eval_metric_name("val/top1_err") is None
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        eval_metric_name("sevencrop", [256], "top1_err")
    with pytest.raises(ValueError, match="positive"):
        eval_metric_name("dense", [], "top1_err")


def test_code_version_names_the_git_commit():
    version = tracking.code_version()
    pkg = Path(tracking.__file__).parent
    sha = subprocess.run(
        ["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if sha.returncode != 0:  # an installed copy outside git
        assert version == __version__
        return
    assert re.fullmatch(rf"{re.escape(__version__)}\+{sha.stdout.strip()}(-dirty)?", version), version


def test_manifest_hash(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b'{"format": 1}')
    assert tracking.manifest_hash(tmp_path) == hashlib.sha256(b'{"format": 1}').hexdigest()
    with pytest.raises(FileNotFoundError, match="vggdist-preprocess shard"):
        tracking.manifest_hash(tmp_path / "missing")


def test_null_tracker_mirrors_tracker_interface():
    public = [n for n, _ in inspect.getmembers(Tracker) if not n.startswith("_")]
    for name in public:
        assert hasattr(NullTracker, name), name
        if inspect.isfunction(getattr(Tracker, name)):
            assert inspect.signature(getattr(NullTracker, name)).parameters.keys() == (
                inspect.signature(getattr(Tracker, name)).parameters.keys()
            ), name
    t = NullTracker.start("x", run_name="y")
    t.log_params({"a": 1})
    t.log_metrics({"m": 1.0}, step=0)
    t.sync()
    assert t.run_id is None and t.flush() and t.end() and t.close()


# --------------------------------------------------------------------------------- sqlite (default)


def test_sqlite_default_round_trip(in_tmp_cwd):
    t = Tracker.start(run_name="A-S256", tags={TAG_CONFIG: "A", TAG_STAGE: 1})
    assert (in_tmp_cwd / "mlflow.db").exists()
    t.log_params(
        {"optim": {"lr": 0.01, "momentum": 0.9}, "data.train_scale": 256, "eval.test_scales": (256, 384)}
    )
    t.log_params({"optim.lr": 0.01})  # same value again: skipped, no error
    for epoch in range(3):
        t.log_metrics({"train/loss": 2.0 - epoch, "val/top1_err": 0.9 - 0.1 * epoch}, step=epoch)
    t.set_tags({TAG_CHECKPOINT: "/ckpt/epoch2"})
    t.log_dict({"classes": ["a", "b"]}, "meta/classes.json")
    (in_tmp_cwd / "note.txt").write_text("hello")
    t.log_artifact(in_tmp_cwd / "note.txt", "notes")
    rows = [{"config": "A", "protocol": "dense", "top1_err": 0.31234, "top5_err": 0.1}]
    tracking.log_eval_table(t, rows)
    spool = Path(t.spool_dir)
    assert spool.is_dir()  # no storage directory given: a temporary spool ...
    assert t.end() and t.pending == 0
    assert not spool.exists()  # ... removed once MLflow has everything

    run = get_run(t.run_id)
    assert run["name"] == "A-S256" and run["status"] == "FINISHED" and run["end_time"] >= run["start_time"]
    assert run["params"] == {
        "optim.lr": "0.01",
        "optim.momentum": "0.9",
        "data.train_scale": "256",
        "eval.test_scales": "[256, 384]",
    }
    assert run["tags"][TAG_CONFIG] == "A" and run["tags"][TAG_STAGE] == "1"
    assert run["tags"][TAG_CHECKPOINT] == "/ckpt/epoch2"
    assert run["metrics"] == {"train/loss": 0.0, "val/top1_err": pytest.approx(0.7)}
    assert metric_history(t.run_id, "train/loss") == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert [r["run_id"] for r in find_runs()] == [t.run_id]
    assert find_runs("no-such-experiment") == []

    dst = in_tmp_cwd / "dl"
    assert json.loads(Path(tracking.download_artifact(t.run_id, "meta/classes.json", dst)).read_text()) == {
        "classes": ["a", "b"]
    }
    assert Path(tracking.download_artifact(t.run_id, "notes/note.txt", dst)).read_text() == "hello"
    assert json.loads(Path(tracking.download_artifact(t.run_id, "eval_results.json", dst)).read_text()) == {
        "rows": rows
    }
    md = Path(tracking.download_artifact(t.run_id, "eval_results.md", dst)).read_text().splitlines()
    assert (
        md[0] == "| config | protocol | top1_err | top5_err |" and md[2] == "| A | dense | 0.3123 | 0.1000 |"
    )


def test_resume_same_run_id(sqlite_uri):
    t = Tracker.start("resume", run_name="D", uri=sqlite_uri)
    t.log_params({"optim.lr": 0.01, "model.config": "D"})
    t.log_metrics({"train/loss": 3.0}, step=0)
    t.end("FAILED")  # e.g. the worker group died
    assert get_run(t.run_id, uri=sqlite_uri)["status"] == "FAILED"

    again = Tracker.start("resume", run_id=t.run_id, uri=sqlite_uri, tags={TAG_CHECKPOINT: "/ckpt/1"})
    assert again.run_id == t.run_id and again.experiment_id == t.experiment_id
    assert again.flush(timeout_s=30)  # the status flip goes through the spool like any logging call
    assert get_run(t.run_id, uri=sqlite_uri)["status"] == "RUNNING"
    again.log_params({"optim.lr": 0.01, "model.config": "D"})  # the restarted worker logs its config again
    with pytest.raises(ValueError, match=r"'optim.lr'.*cannot change it"):
        again.log_params({"optim.lr": 0.001})
    again.log_metrics({"train/loss": 2.0}, step=1)
    again.log_metrics({"train/loss": 2.5}, step=1)  # an epoch repeated after restart: the last value wins
    assert again.end()

    run = get_run(t.run_id, uri=sqlite_uri)
    assert run["status"] == "FINISHED" and run["tags"][TAG_CHECKPOINT] == "/ckpt/1"
    assert run["params"]["optim.lr"] == "0.01"
    assert metric_history(t.run_id, "train/loss", uri=sqlite_uri) == [(0, 3.0), (1, 2.5)]
    assert len(find_runs("resume", uri=sqlite_uri)) == 1
    with pytest.raises(ValueError, match="no MLflow run"):
        Tracker.start("resume", run_id="0" * 32, uri=sqlite_uri)


def test_nested_child_run_has_parent(sqlite_uri):
    with Tracker.start("nested", run_name="sweep", uri=sqlite_uri) as parent:
        with Tracker.start(
            "nested", run_name="stage1-A", parent_run_id=parent.run_id, uri=sqlite_uri
        ) as child:
            child.log_metrics({"val/top1_err": 0.5}, step=0)
    assert get_run(child.run_id, uri=sqlite_uri)["parent_run_id"] == parent.run_id
    assert get_run(child.run_id, uri=sqlite_uri)["tags"]["mlflow.parentRunId"] == parent.run_id
    children = find_runs(
        "nested", filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", uri=sqlite_uri
    )
    assert [c["name"] for c in children] == ["stage1-A"]

    with pytest.raises(RuntimeError), Tracker.start("nested", uri=sqlite_uri) as failing:
        raise RuntimeError("boom")
    assert get_run(failing.run_id, uri=sqlite_uri)["status"] == "FAILED"


def test_rejected_payload_is_dropped_not_retried_forever(sqlite_uri, caplog):
    t = Tracker.start("rejects", uri=sqlite_uri)
    t.log_metrics({"bad name?": 1.0}, step=0)  # MLflow refuses '?' in metric names
    t.log_metrics({"good": 1.0}, step=0)  # sent in the same batch, which MLflow refuses as a whole
    assert t.flush(timeout_s=30) and t.pending == 0
    assert any("rejected" in m for m in _tracking_warnings(caplog))
    assert t.end()
    assert get_run(t.run_id, uri=sqlite_uri)["metrics"] == {"good": 1.0}


def test_resolve_checkpoint(sqlite_uri, tmp_path):
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    assert resolve_checkpoint(str(ckpt), uri=sqlite_uri) == str(ckpt)
    assert resolve_checkpoint("s3://bucket/run/checkpoint_000003", uri=sqlite_uri).startswith("s3://")

    with Tracker.start("ckpt", uri=sqlite_uri) as t:
        t.set_tags({TAG_CHECKPOINT: "/ckpt/epoch1"})
        t.set_tags({TAG_CHECKPOINT: "/ckpt/epoch2"})  # rewritten every epoch: the latest wins
    assert resolve_checkpoint(t.run_id, uri=sqlite_uri) == "/ckpt/epoch2"

    with Tracker.start("ckpt", uri=sqlite_uri) as bare:
        pass
    with pytest.raises(ValueError, match="has no vggdist.checkpoint tag"):
        resolve_checkpoint(bare.run_id, uri=sqlite_uri)
    for bogus in ("0" * 32, str(tmp_path / "missing-dir")):
        with pytest.raises(ValueError, match="neither a checkpoint path nor a run id.*--init-from <run id>"):
            resolve_checkpoint(bogus, uri=sqlite_uri)


# ------------------------------------------------------------------------------ unreachable server


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
    warnings = _tracking_warnings(caplog)
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


# --------------------------------------------------------------------------------- real server


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
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0]

    server.start()  # same port, same database
    assert t.flush(timeout_s=60) and t.pending == 0
    assert "reachable again" in _tracking_warnings(caplog)[-1]
    assert t.end()

    run = get_run(t.run_id, uri=server.uri)
    assert run["status"] == "FINISHED"
    assert run["params"] == {"optim.lr": "0.01", "data.train_scale": "256"}
    assert run["tags"][TAG_CHECKPOINT] == "/ckpt/epoch5"
    assert metric_history(t.run_id, "train/loss", uri=server.uri) == [(s, 4.0 - s) for s in range(6)]
    got = tracking.download_artifact(t.run_id, "outage.txt", tmp_path, uri=server.uri)
    assert Path(got).read_text() == "written during the outage"


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
    last = _tracking_warnings(caplog)[-1]
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


def test_runs_that_start_together_log_the_same_dataset_inputs(tmp_path):
    """A sweep's concurrent stages log the same shards at the same moment: each run gets its inputs, none fails."""
    import threading

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    exp = c.create_experiment("e")
    runs = [c.create_run(exp).info.run_id for _ in range(6)]
    data = [{"name": "data/train", "digest": "ab" * 8, "source": str(tmp_path), "num_samples": 5,
             "context": "training"}]  # fmt: skip
    errors = []

    def log(run_id):
        try:
            tracking.log_datasets(run_id, data, uri)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(c.get_run(r).inputs.dataset_inputs) == 1 for r in runs)
