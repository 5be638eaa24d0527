"""Ray Train end to end on a real local Ray: A then B-from-A, evaluation with 2 workers (every protocol, Wilson
intervals, per-image outcomes, fusion), learning, refusals.

A training worker killed mid-run (Ray Train restarting the worker group from the last checkpoint into the same
MLflow run, each epoch logged once) is staged by tests/test_chaos.py, with 2 Ray Train workers per stage.
"""

import json
import os

import mlflow
import pytest

from tests.tiny_data import make_shards
from vggdist import runmeta, tracking
from vggdist.config import preset
from vggdist.outcome_file import read_outcomes
from vggdist.ray_eval import evaluate
from vggdist.ray_train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ray = pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("raytrain")
    data = make_shards(tmp)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("r")), log_to_driver=False
    )
    yield {"tmp": tmp, "data": data, "uri": os.environ["MLFLOW_TRACKING_URI"]}
    ray.shutdown()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _cfg(env, model, name, **sets):
    base = {
        "optim.global_batch_size": 32,
        "optim.lr": 0.01,
        "schedule.epochs": 3,
        "run.workers": 2,
        "run.storage_path": str(env["tmp"] / "ray_results"),
        "run.run_name": name,
        "run.init": "glorot",
        "run.max_failures": 2,
        "data.loader_workers": 1,
        "run.log_every_steps": 2,
    }
    base.update(sets)
    return preset("mini", model=model).override([f"{k}={v}" for k, v in base.items()])


def test_a_then_b_from_a_and_evaluation(env):
    # one worker, one epoch each: what this test checks is the staged init and the evaluation of the result
    a = train(
        _cfg(env, "A", "tiny-A", **{"schedule.epochs": 1, "run.workers": 1}), str(env["data"]), stage="1-A"
    )
    run = tracking.get_run(a.run_id, uri=env["uri"])
    assert run["status"] == "FINISHED"
    assert [s for s, _ in tracking.metric_history(a.run_id, "val/top1_err", uri=env["uri"])] == [1]
    assert (
        tracking.find_runs("vggdist", filter_string="tags.`vggdist.ray_run_name` = 'tiny-A'", uri=env["uri"])[
            0
        ]["run_id"]
        == a.run_id
    )
    assert len(tracking.find_runs("vggdist", uri=env["uri"])) == 1
    assert run["params"]["optim.lr"] == "0.01" and run["params"]["run.accum_steps"] == "1"
    assert run["tags"]["vggdist.config"] == "A" and run["tags"]["vggdist.stage"] == "1-A"
    assert run["tags"][tracking.TAG_CHECKPOINT].endswith("epoch_001")
    assert a.metrics["val/samples"] == 40  # every validation image counted once

    b = train(
        _cfg(
            env,
            "B",
            "tiny-B",
            **{"run.init": "from-shallower", "run.init_from": a.run_id, "schedule.epochs": 1, "run.workers": 1},
        ),
        str(env["data"]),
    )
    brun = tracking.get_run(b.run_id, uri=env["uri"])
    assert brun["tags"][tracking.TAG_INIT_FROM] == a.run_id
    mapping = json.loads(brun["tags"][tracking.TAG_INIT_MAPPING])
    assert len(mapping) == 7 and list(mapping.values())[-1] == "classifier.6"

    out = evaluate(
        b.run_id, str(env["data"]), protocols=("dense", "multicrop", "combined"), scales=[37, 55], workers=2
    )
    keys = {(r["protocol"], tuple(r["scales"])) for r in out["rows"]}
    assert ("combined", (37, 55)) in keys and ("dense", (37,)) in keys
    assert all(r["n"] == 40 for r in out["rows"])
    metrics = tracking.get_run(b.run_id, uri=env["uri"])["metrics"]
    assert "eval/combined/Q37-55/top1_err" in metrics and "eval/dense/Q55/top5_err" in metrics
    # every error rate with its 95 % Wilson interval, in the table and as MLflow metrics
    dense55 = next(r for r in out["rows"] if r["protocol"] == "dense" and r["scales"] == [55])
    assert dense55["top1_lo"] <= dense55["top1_err"] <= dense55["top1_hi"]
    assert metrics["eval/dense/Q55/top1_lo"] == pytest.approx(dense55["top1_lo"])
    assert metrics["eval/dense/Q55/top5_hi"] == pytest.approx(dense55["top5_hi"])
    assert "[" in out["markdown"] and "| 40 |" in out["markdown"]
    # the per-image outcomes are an artifact of the run, and count to the same error rates
    assert "eval_outcomes.npz" in tracking.list_artifacts(b.run_id, uri=env["uri"])
    stored = read_outcomes(
        tracking.download_artifact(b.run_id, "eval_outcomes.npz", env["tmp"] / "dl", uri=env["uri"])
    )
    assert len(stored.rows) == len(out["rows"])
    for r in out["rows"]:
        row = stored.find(r["protocol"], r["scales"])  # no paper scales given: the scales themselves
        assert row.n == 40 and len(set(row.keys.tolist())) == 40
        assert row.error_rate("top1").percent == pytest.approx(r["top1_err"], abs=1e-4)
        assert row.error_rate("top5").percent == pytest.approx(r["top5_err"], abs=1e-4)
    assert stored.meta["split"] == "val" and stored.meta["models"] == [b.run_id]

    fused = evaluate(
        a.run_id,
        str(env["data"]),
        protocols=("dense",),
        scales=[37],
        ensemble=[b.run_id],
        workers=1,
        log_to_run=False,
    )
    assert fused["rows"][0]["models"] == [a.run_id, b.run_id]


def test_training_learns_on_real_jpegs(env):
    r = train(_cfg(env, "A", "tiny-A-learn", **{"schedule.epochs": 4, "run.workers": 1}), str(env["data"]))
    assert r.metrics["val/top1_err"] < 50.0, r.metrics  # 4 classes: chance is 75 %
    run = tracking.get_run(r.run_id, uri=env["uri"])
    assert r.warning is None and "vggdist.warning" not in run["tags"]
    # what the MLflow UI shows beside the metrics: CPU and memory of the training process, and the shards read
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run["metrics"])
    mlflow_run = mlflow.MlflowClient(env["uri"]).get_run(r.run_id)
    inputs = {i.dataset.name: i for i in mlflow_run.inputs.dataset_inputs}
    train_dir = env["data"] / "train"
    assert set(inputs) == {f"{env['data'].name}/train", f"{env['data'].name}/val"}
    ds = inputs[f"{env['data'].name}/train"].dataset
    assert runmeta.manifest_hash(train_dir).startswith(ds.digest) and str(train_dir.resolve()) in ds.source
    assert json.loads(ds.profile)["num_samples"] == json.loads((train_dir / "manifest.json").read_text())[
        "num_samples"
    ]
    # artifacts beside the SQLite store, not in ./mlruns of the current directory
    exp = mlflow.MlflowClient(env["uri"]).get_experiment(mlflow_run.info.experiment_id)
    assert exp.artifact_location == (env["tmp"] / "mlartifacts" / "vggdist").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_uneven_global_batch_is_refused_before_starting(env):
    with pytest.raises(ValueError, match="cannot be split evenly over 3 workers"):
        train(_cfg(env, "A", "bad", **{"run.workers": 3}), str(env["data"]))


def test_missing_data_names_the_preprocessing_command(env, tmp_path):
    with pytest.raises(ValueError, match="vggdist-preprocess shard --split train"):
        train(_cfg(env, "A", "nodata"), str(tmp_path))


def test_a_run_that_cannot_learn_says_so_in_the_log_and_in_mlflow(env):
    r = train(
        _cfg(
            env,
            "A",
            "tiny-A-stuck",
            **{
                "schedule.epochs": 3,
                "schedule.plateau_patience": 1,
                "run.workers": 1,
                "run.init": "normal",
                "optim.lr": 1e-12,
            },
        ),
        str(env["data"]),
    )
    assert r.warning and "--init glorot" in r.warning
    run = tracking.get_run(r.run_id, uri=env["uri"])
    assert run["tags"]["vggdist.warning"] == r.warning
    # the net never started learning (loss ln 4), so the plateau rule held the lr instead of dividing it
    assert [v for _, v in tracking.metric_history(r.run_id, "lr_drops", uri=env["uri"])] == [0, 0, 0]
    assert [e["action"] for e in json.loads(run["tags"]["vggdist.lr_schedule"])] == ["hold"]
