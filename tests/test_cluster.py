"""A real two-node Ray cluster on one machine (127.0.0.1 head + a node on 127.0.0.2), a real MLflow server, and
`ray job submit`: the cluster path a user takes, end to end.

- Ray Train places one worker on each node (node ranks 0 and 1) and each rank trains on its own sample stream;
- a local SQLite tracking URI is refused on a multi-node cluster (runs would be lost);
- `ray job submit -- python jobs/train.py` runs to SUCCEEDED and the run is in MLflow.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.ray_cluster import RAY, RayCluster
from tests.tiny_data import make_shards
from tests.train_faults import RecordKeys
from vggdist import tracking
from vggdist.config import preset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    data = make_shards(tmp)
    (tmp / "ray_results").mkdir()
    (tmp / "ray_results" / ".vggdist-shared").touch()  # both nodes see this machine's disk: shared storage
    server = MlflowServer(tmp / "mlflow")
    server.start()
    c = RayCluster(num_cpus=1, dashboard=True)
    try:
        c.add_node("127.0.0.2", num_cpus=1)
        yield {"cluster": c, "data": data, "tmp": tmp, "uri": server.uri}
    finally:
        import ray

        ray.shutdown()
        c.stop()
        server.stop()


def _cfg(tmp, name, **sets):
    base = {
        "optim.global_batch_size": 32,
        "schedule.epochs": 2,
        "run.workers": 2,
        "run.init": "glorot",
        "run.storage_path": str(tmp / "ray_results"),
        "run.run_name": name,
        "data.loader_workers": 0,
    }
    base.update(sets)
    return preset("mini", model="A").override([f"{k}={v}" for k, v in base.items()])


def test_two_nodes_one_worker_each_distinct_streams(cluster, monkeypatch):
    import ray

    from vggdist.ray_train import train

    c = cluster["cluster"]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes(2)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cluster['tmp'] / 'local.db'}")
    with pytest.raises(ValueError, match="cannot be shared across nodes"):
        train(_cfg(cluster["tmp"], "refused"), str(cluster["data"]))

    keys_dir = cluster["tmp"] / "keys"
    keys_dir.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster["uri"])
    node_local = cluster["tmp"] / "node_local"  # no .vggdist-shared marker: refused, nothing written
    with pytest.raises(ValueError, match="on this node's disk but Ray has 2 nodes.*--storage-path s3://"):
        train(_cfg(cluster["tmp"], "local", **{"run.storage_path": str(node_local)}), str(cluster["data"]))
    assert not node_local.exists()
    result = train(
        _cfg(cluster["tmp"], "two-nodes"), str(cluster["data"]), callbacks=[RecordKeys(str(keys_dir))]
    )

    run = tracking.get_run(result.run_id, uri=cluster["uri"])
    assert run["status"] == "FINISHED"
    workers = sorted(json.loads(run["tags"]["vggdist.workers"]), key=lambda w: w["rank"])
    assert [w["node_rank"] for w in workers] == [0, 1], workers
    assert len({w["ip"] for w in workers}) == 2 and "127.0.0.2" in {w["ip"] for w in workers}
    assert result.metrics["val/samples"] == 40  # validation split over both nodes, every image once

    # each rank trained on its own stream: 6 steps/epoch x 16 images per rank, different keys, not lockstep copies
    for epoch in (0, 1):
        streams = [(keys_dir / f"keys-e{epoch}-r{r}-w0.txt").read_text().split() for r in (0, 1)]
        assert [len(s) for s in streams] == [96, 96]
        assert streams[0] != streams[1]
        same_position = sum(a == b for a, b in zip(*streams, strict=True))
        assert same_position < 10, "ranks read the same samples in lockstep: shards are not split by rank"
    ray.shutdown()


# the dashboard answers before the head's job agent has registered, and a loaded head may not find it within the
# dashboard's own timeout: Ray's answer is then this, and no job was created, so the submission can be repeated
# (an agent that could not bind its port never comes: tests.ray_cluster gives each node a port of its own)
NO_AGENT = "No available agent to submit job, please try again later"


def _submit(cmd: list[str], env: dict[str, str], within_s: float = 180) -> subprocess.CompletedProcess:
    """`ray job submit`, repeated while Ray says its job agent is not available yet (for at most `within_s`)."""
    deadline = time.monotonic() + within_s
    while True:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or NO_AGENT not in out.stderr + out.stdout or time.monotonic() > deadline:
            return out
        time.sleep(3)


def test_ray_job_submit_runs_training_and_logs_to_mlflow(cluster):
    c = cluster["cluster"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # it would override --address
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": cluster["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}}
    cmd = [
        RAY, "job", "submit", "--address", c.dashboard_url, "--working-dir", str(ROOT), "--no-wait",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "jobs/train.py", "--config", "A", "--data", str(cluster["data"]), "--preset", "mini",
        "--epochs", "1", "--workers", "1", "--run-name", "submitted", "--experiment", "jobs",
        "--storage-path", str(cluster["tmp"] / "ray_results"), "--set", "optim.global_batch_size=32",
    ]  # fmt: skip
    out = _submit(cmd, env)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = next(
        w.strip("'")
        for line in out.stdout.splitlines()
        for w in line.split()
        if w.strip("'").startswith("raysubmit_")
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(c.dashboard_url)
    status = client.get_job_status(job_id)
    deadline = time.time() + 420
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", c.dashboard_url, job_id], env=env, capture_output=True, text=True
    ).stdout
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-3000:]}"
    runs = tracking.find_runs("jobs", uri=cluster["uri"])
    assert [r["name"] for r in runs] == ["submitted"] and runs[0]["status"] == "FINISHED"
    assert tracking.metric_history(runs[0]["run_id"], "train/loss", uri=cluster["uri"])
