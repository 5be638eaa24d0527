"""MLflow the way cluster.yaml runs it: `mlflow server` with its tracking store in a real PostgreSQL (the Debian
package; a throwaway cluster in a temp dir, as an unprivileged user, on a port of its own) and a `vggdist train`
tracked through it. Skipped only where PostgreSQL cannot be installed or started here."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port
from tests.tiny_data import make_shards
from vggdist import tracking

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else (Path(p).parent if (p := shutil.which("initdb")) else None)


@pytest.fixture(scope="module")
def postgres():
    """postgresql://mlflow@127.0.0.1:PORT/mlflow on a fresh cluster, stopped afterwards."""
    pytest.importorskip("psycopg", reason="psycopg[binary] (dev extras) is needed for MLflow on PostgreSQL")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql; make test tries it)")
    # outside pytest's temp root, which is private to this user: the postgres user must reach the data dir
    root = Path(tempfile.mkdtemp(prefix="vggdist-pg-", dir="/tmp"))
    port = free_port()

    def as_user(cmd: str) -> subprocess.CompletedProcess:
        if os.geteuid() != 0:  # initdb refuses root: run it as the postgres user where we are root
            return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        return subprocess.run(["su", "postgres", "-s", "/bin/bash", "-c", cmd], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, log = root / "data", root / "log"
    steps = [
        f"{bindir}/initdb -D {data} -A trust -U mlflow",
        f"{bindir}/pg_ctl -D {data} -o '-k {root} -p {port} -c listen_addresses=127.0.0.1' -l {log} -w start",
        f"{bindir}/createdb -h 127.0.0.1 -p {port} -U mlflow mlflow",
    ]
    for step in steps:
        done = as_user(step)
        if done.returncode != 0:
            pytest.skip(f"PostgreSQL could not be started here ({step.split()[0]}: {done.stderr.strip()[-300:]})")
    try:
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        as_user(f"{bindir}/pg_ctl -D {data} -m immediate -w stop")
        shutil.rmtree(root, ignore_errors=True)


def test_a_run_tracked_through_mlflow_on_postgresql(postgres, tmp_path):
    server = MlflowServer(tmp_path / "mlflow", backend_uri=postgres)
    server.start(timeout_s=120)  # the first start migrates the schema
    try:
        data = make_shards(tmp_path, train_per_class=16, val_per_class=4)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": server.uri,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        env.pop("RAY_ADDRESS", None)
        p = subprocess.run(
            [sys.executable, "-m", "vggdist.cli", "train", "--config", "A", "--preset", "mini", "--data", str(data),
             "--storage-path", str(tmp_path / "ray"), "--epochs", "1", "--run-name", "pg",
             "--set", "optim.global_batch_size=32", "--set", "data.loader_workers=0"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        (run,) = tracking.find_runs("vggdist", uri=server.uri)
        assert run["status"] == "FINISHED" and run["name"] == "pg"
        assert [s for s, _ in tracking.metric_history(run["run_id"], "val/top1_err", uri=server.uri)] == [1]
        assert not (tmp_path / "mlflow" / "mlflow.db").exists()  # the store is PostgreSQL, not a SQLite file
    finally:
        server.stop()
