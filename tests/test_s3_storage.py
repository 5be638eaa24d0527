"""Run storage on S3 (`--storage-path s3://…`) with a real S3 API on 127.0.0.1 (moto's server), reached through the
standard AWS variables (AWS_ENDPOINT_URL, keys, region) that pyarrow and boto read: a `vggdist train` writes its
checkpoints there, a rerun resumes from them, `vggdist evaluate --run` reads one, and a deeper net's stage is
seeded from it (`--init-from`), all through `pyarrow.fs` (`vggdist.checkpoint_store`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cli_run import run_cli
from tests.s3_server import moto_s3
from tests.tiny_data import make_shards
from vggdist import checkpoint_store, tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(bucket URI, the AWS_* environment that points at it)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), "vggdist") as bucket_and_env:
        yield bucket_and_env


def _run(args: list[str], tmp: Path, aws: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(args, tmp, aws)


def test_train_resume_evaluate_and_init_from_s3_storage(s3, tmp_path, monkeypatch):
    bucket, aws = s3
    data = make_shards(tmp_path, train_per_class=16, val_per_class=4)
    storage = f"{bucket}/results"
    common = ["--preset", "mini", "--data", str(data), "--storage-path", storage,
              "--set", "optim.global_batch_size=32", "--set", "schedule.early_stop=false",
              "--set", "data.loader_workers=0"]  # fmt: skip

    p = _run(["train", "--config", "A", "--epochs", "1", "--run-name", "a", *common], tmp_path, aws)
    assert p.returncode == 0, p.stderr[-3000:]
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    first = checkpoint_store.latest(f"{storage}/a")
    assert first is not None and first.epoch == 1 and first.path.startswith("s3://vggdist/results/a/")

    p = _run(["train", "--config", "A", "--epochs", "2", "--run-name", "a", *common], tmp_path, aws)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from s3://vggdist/results/a/epoch_001" in p.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.find_runs("vggdist", uri=uri)[-1]  # extending a FINISHED run logs into a new MLflow run
    assert run["status"] == "FINISHED" and run["tags"]["vggdist.checkpoint"].startswith("s3://vggdist/results/a/")
    assert [s for s, _ in tracking.metric_history(run["run_id"], "train/loss", uri=uri)] == [2]  # epoch 1: resumed

    p = _run(["evaluate", "--run", run["run_id"], "--data", str(data), "--workers", "1",
              "--protocols", "dense", "--scales", "37"], tmp_path, aws)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| dense |" in p.stdout

    p = _run(["train", "--config", "B", "--epochs", "1", "--run-name", "b", "--init", "from-shallower",
              "--init-from", run["run_id"], *common], tmp_path, aws)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    b = next(r for r in tracking.find_runs("vggdist", uri=uri) if r["name"] == "b")
    assert b["tags"]["vggdist.init_from"] == run["run_id"] and "vggdist.init_mapping" in b["tags"]
