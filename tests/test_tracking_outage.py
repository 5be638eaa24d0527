"""MLflow down for longer than a whole `vggdist train` job, end to end: real `mlflow server`, real local Ray, real
shards, the `vggdist` CLI.

The server is stopped right after rank 0 logged epoch 1 and stays down until the job has ended; meanwhile rank 0
is killed after epoch 2 (`tests.train_faults.KillWorker`, passed to the CLI as a callback), so the restarted worker
group resumes logging with MLflow down. Nothing may be missing or doubled once `vggdist sync` ran. Then an
evaluation logged while MLflow is down again reaches MLflow through the next command's automatic replay.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.tiny_data import make_shards
from tests.train_faults import KillWorker
from vggdist import tracking
from vggdist.cli import main as cli_main

pytestmark = pytest.mark.slow

EPOCHS = 3
PER_EPOCH = ("train/loss", "train/top1_err", "val/top1_err", "val/top5_err", "lr")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("outage")
    data = make_shards(tmp)
    server = MlflowServer(tmp / "mlflow")
    server.start()
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("r")), log_to_driver=False
    )
    yield {"tmp": tmp, "data": data, "server": server}
    ray.shutdown()
    server.stop()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _logged_epoch(spool: Path, epoch: int) -> bool:
    """Whether rank 0 has written epoch `epoch`'s validation error into the spool (read like any reader would)."""
    for seg in spool.glob("seg-*.jsonl"):
        for line in seg.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if any(m[0] == "val/top1_err" and m[3] >= epoch for m in rec.get("metrics", ())):
                return True
    return False


def _stop_after_epoch(server: MlflowServer, spool: Path, epoch: int, stopped: threading.Event) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not _logged_epoch(spool, epoch):
        time.sleep(0.1)
    server.stop()
    stopped.set()


def test_mlflow_down_longer_than_the_job_then_sync_and_automatic_replay(env, capsys):
    server: MlflowServer = env["server"]
    storage = env["tmp"] / "ray_results"
    run_dir = storage / "outage-A"
    stopped = threading.Event()
    watcher = threading.Thread(
        target=_stop_after_epoch, args=(server, run_dir / "mlflow_spool", 1, stopped), daemon=True
    )
    watcher.start()
    kill = KillWorker(epoch=2, rank=0, marker=str(env["tmp"] / "crashed"))
    sets = {
        "optim.global_batch_size": 32,
        "optim.lr": 0.01,
        "run.init": "glorot",
        "data.loader_workers": 1,
        "run.log_every_steps": 2,
        "run.mlflow_wait_s": 2,
    }
    argv = ["train", "--config", "A", "--preset", "mini", "--data", str(env["data"]), "--epochs", str(EPOCHS)]
    argv += ["--workers", "2", "--storage-path", str(storage), "--run-name", "outage-A"]
    argv += ["--max-failures", "2"]
    argv += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert cli_main(argv, callbacks=[kill]) == 0
    assert stopped.is_set() and not server.running, "MLflow was not down while the job ran"
    assert (env["tmp"] / "crashed").exists(), "the worker group did not restart"
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") :])  # the command's JSON summary ends its output
    run_id = summary["run_id"]
    assert summary["mlflow_spooled"] > 0 and summary["deliver_with"] == f"vggdist sync {run_dir}"

    server.start()  # the job is over: what happened while MLflow was down is only in the spool
    run = tracking.get_run(run_id, uri=server.uri)
    assert run["status"] == "RUNNING"
    assert [s for s, _ in tracking.metric_history(run_id, "val/top1_err", uri=server.uri)] != [1, 2, 3]

    assert cli_main(["sync", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"of run {run_id}" in out and "status FINISHED" in out

    run = tracking.get_run(run_id, uri=server.uri)
    assert run["status"] == "FINISHED"
    for key in PER_EPOCH:  # every epoch's metrics, each exactly once
        rows = tracking.metric_rows(run_id, key, uri=server.uri)
        assert sorted(step for step, _, _ in rows) == [1, 2, 3], (key, rows)
    assert run["tags"][tracking.TAG_CHECKPOINT].endswith("epoch_003")
    assert run["tags"]["vggdist.best_checkpoint"] and run["tags"]["vggdist.config"] == "A"
    assert sorted(w["rank"] for w in json.loads(run["tags"]["vggdist.workers"])) == [0, 1]
    assert run["params"]["optim.lr"] == "0.01" and run["params"]["run.mlflow_wait_s"] == "2.0"
    assert len(tracking.find_runs("vggdist", uri=server.uri)) == 1

    # MLflow down again: `vggdist evaluate` of the run still ends normally; its results stay in the run's spool
    checkpoint = run["tags"][tracking.TAG_CHECKPOINT]
    evaluate = ["evaluate", "--checkpoint", checkpoint, "--data", str(env["data"])]
    evaluate += ["--protocols", "dense", "--scales", "37", "--workers", "1"]
    server.stop()
    assert cli_main(evaluate) == 0
    assert "| dense |" in capsys.readouterr().out
    assert tracking.find_spools(run_dir)[0].has_pending()

    server.start()  # the next command on this storage delivers them before its own work
    assert cli_main([*evaluate, "--no-log"]) == 0
    capsys.readouterr()
    run = tracking.get_run(run_id, uri=server.uri)
    assert "eval/dense/Q37/top1_err" in run["metrics"] and run["status"] == "FINISHED"
    assert {"eval_results.json", "eval_results.md"} <= set(tracking.list_artifacts(run_id, uri=server.uri))
    assert len(tracking.metric_rows(run_id, "eval/dense/Q37/top1_err", uri=server.uri)) == 1
    assert not tracking.find_spools(run_dir)[0].has_pending()
