"""A corrupt sample in the shards (a JPEG damaged after preprocessing) on a real `vggdist train` and `evaluate`:
skipped and counted (`train/skipped_samples`, `val/skipped_samples`), not a crash that Ray restarts until
max_failures is spent; above `data.max_skipped_fraction` the run fails in one line (exit 1, MLflow FAILED);
evaluation reports the skipped images as such and its error rates over the images it counted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import webdataset as wds

from tests.cli_run import run_cli
from tests.tiny_data import make_shards
from vggdist import runmeta, tracking
from vggdist.shardformat import shard_files
from vggdist.shardio import tar_samples

pytestmark = pytest.mark.slow


def _corrupt(split_dir: Path, split: str, every_shard: bool) -> list[str]:
    """Cut the JPEG of the first sample of the first shard (of every shard) after 40 bytes; returns their keys."""
    keys = []
    urls = shard_files(split_dir, split)[0]
    for url in urls if every_shard else urls[:1]:
        samples = list(tar_samples([{"url": url}]))
        with wds.TarWriter(url) as sink:
            for i, s in enumerate(samples):
                jpg = s["jpg"][:40] if i == 0 else s["jpg"]
                sink.write({"__key__": s["__key__"], "jpg": jpg, "cls": s["cls"], "json": s["json"]})
        keys.append(samples[0]["__key__"])
    return keys


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    data = make_shards(tmp_path_factory.mktemp("corrupt"), train_per_class=24, val_per_class=5)
    train_keys = _corrupt(data / "train", "train", every_shard=True)  # every epoch draws some
    val_keys = _corrupt(data / "val", "val", every_shard=False)
    return data, train_keys, val_keys


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return run_cli(args, tmp)


def _train(data: Path, tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        [
            "train", "--config", "A", "--preset", "mini", "--data", str(data), "--storage-path", str(tmp / "ray"),
            "--epochs", "2", "--run-name", name, "--set", "optim.global_batch_size=32",
            "--set", "schedule.early_stop=false", "--set", "data.loader_workers=0", *extra,
        ],  # fmt: skip
        tmp,
    )


def test_skipped_and_counted_below_the_threshold_then_evaluated_over_the_counted(damaged, tmp_path):
    data, _train_keys, val_keys = damaged
    p = _train(data, tmp_path, "tolerant", "--set", "data.max_skipped_fraction=0.5")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipping sample" in p.stderr and "vggdist-preprocess verify" in p.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = tracking.find_runs("vggdist", uri=uri)
    assert run["status"] == "FINISHED"
    skipped = tracking.metric_history(run["run_id"], runmeta.TRAIN_SKIPPED, uri=uri)
    assert [s for s, _ in skipped] == [1, 2] and all(v > 0 for _, v in skipped)
    assert tracking.metric_history(run["run_id"], runmeta.VAL_SKIPPED, uri=uri) == [(1, 1.0), (2, 1.0)]
    assert [v for _, v in tracking.metric_history(run["run_id"], runmeta.VAL_SAMPLES, uri=uri)] == [19.0, 19.0]

    p = _run(["evaluate", "--run", run["run_id"], "--data", str(data), "--workers", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    count = f"19 counted + 1 skipped (undecodable: keys {val_keys[0]}) = 20 listed"
    assert count in p.stdout and "error rates are over the 19 counted images" in p.stdout
    (run,) = tracking.find_runs("vggdist", uri=uri)
    assert run["tags"][runmeta.TAG_EVAL_COUNT].startswith(count)


def test_above_the_threshold_the_run_fails_in_one_line_without_retries(damaged, tmp_path):
    data = damaged[0]
    p = _train(data, tmp_path, "strict", "--set", "run.max_failures=3")  # default threshold 0.1 %
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("vggdist train: error: epoch 1 skipped ") and "data.max_skipped_fraction" in last
    assert "vggdist-preprocess verify" in last and "Traceback" not in p.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = tracking.find_runs("vggdist", uri=uri)
    assert run["status"] == "FAILED" and "undecodable training samples" in run["tags"][runmeta.TAG_FAILURE]
    assert [s for s, _ in tracking.metric_history(run["run_id"], runmeta.TRAIN_SKIPPED, uri=uri)] == [1]
