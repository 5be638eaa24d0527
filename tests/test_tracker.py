"""`Tracker` on the SQLite store (the default in a temp cwd, or one store shared by the module): a run's round
trip, resuming the same run, nested runs, rejected payloads, checkpoint resolution, concurrent dataset inputs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests.tracking_helpers import in_tmp_cwd, tracking_warnings  # noqa: F401 - fixture
from vggdist import tracking
from vggdist.tracking import (
    TAG_CHECKPOINT,
    TAG_CONFIG,
    TAG_STAGE,
    NullTracker,
    Tracker,
    find_runs,
    get_run,
    metric_history,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store shared by the module's fast tests (creating one costs ~1 s of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


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


def test_sqlite_default_round_trip(in_tmp_cwd):  # noqa: F811 - the fixture
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
    assert any("rejected" in m for m in tracking_warnings(caplog))
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
