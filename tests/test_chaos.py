"""The chaos test: a mini sweep through a bad day on the cluster, end to end with real processes.

A plan of two stages (A, then B initialised from A; 2 epochs each) runs as `vggdist sweep --workers 2` on a
private local Ray (2 Ray Train CPU workers per stage) against a real `mlflow server` on 127.0.0.1, on tiny JPEG
shards. Faults, in this order, each at a known point of the run (no sleeps racing the training):

1. MLflow stops as soon as stage A's workers run, and comes back only once stage A has trained, restarted and
   been evaluated: the whole stage runs offline, into its spool; stage B, which needs MLflow to create its run,
   waits for it.
2. Training worker rank 1 of stage A dies after epoch 1 (`KillWorker`): Ray Train restarts the worker group from
   epoch 1's checkpoint, with MLflow down.
3. The sweep driver is SIGKILLed while stage B's rank 0 holds after epoch 1 (`Hold`, its checkpoint whole), and
   the same command is run again: it skips A and resumes B from epoch 1 into the same MLflow run.

Then: every run FINISHED, one MLflow run per stage plus the sweep's parent, every epoch's metrics exactly once
(one value per step, nothing doubled), nothing left spooled, and `vggdist report` of the sweep identical in
structure to the report of an undisturbed run of the plan: the same files and headings, our numbers in the same
table rows on the same number of images, no row twice, the same paired comparison, the same findings measured and
the same runs. That structure (`EXPECTED`) was taken from an undisturbed run of the same command (no faults; one
worker and one epoch per stage give the same structure) and is written out here instead of running that
reference each time: it is as strict, and the test costs one sweep less.

Beside it, one fault the chaos sequence cannot stage at a known point (no hook runs inside an evaluation): the
driver killed while a stage evaluates, which leaves that stage's run FINISHED but not evaluated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.tiny_data import make_shards
from vggdist import runmeta, tracking
from vggdist.cli import main as cli_main
from vggdist.report_findings import CLAIMS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

PLAN = """\
name: chaos
preset: mini
stages:
  - {key: 1-A-S256, config: A, train_scale: 256, init: glorot, epochs: 2, test_scales: [256]}
  - {key: 2-B-S256, config: B, train_scale: 256, init: from-shallower, init_from: 1-A-S256, epochs: 2,
     test_scales: [256]}
"""
STAGES = ("1-A-S256", "2-B-S256")
EPOCHS = 2
PER_EPOCH = (
    runmeta.TRAIN_LOSS,
    runmeta.TRAIN_TOP1_ERR,
    runmeta.VAL_TOP1_ERR,
    runmeta.VAL_TOP5_ERR,
    runmeta.VAL_SAMPLES,
    runmeta.TRAIN_SKIPPED,
    runmeta.LR,
)
SETS = {
    "optim.global_batch_size": 32,
    "optim.lr": 0.01,
    "schedule.early_stop": "false",
    "data.loader_workers": 0,
    "run.log_every_steps": 1,
    "run.max_failures": 2,
    "run.mlflow_wait_s": 2,
}


def _sweep_args(data: Path, plan: Path, storage: Path, workers: int, *extra: str) -> list[str]:
    args = ["sweep", "--data", str(data), "--plan", str(plan), "--workers", str(workers)]
    args += ["--experiment", "chaos", "--name", "chaos", "--set", f"run.storage_path={storage}"]
    args += [x for k, v in SETS.items() for x in ("--set", f"{k}={v}")]
    return [*args, *extra]


def _env(uri: str, ray_tmp: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "RAY_TMPDIR": ray_tmp,  # this test's Ray processes are the ones whose command line names it
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "PYTHONUNBUFFERED": "1",  # the driver's log is read while it runs
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("RAY_ADDRESS", None)
    return env


_T0 = [time.monotonic()]


def _mark(what: str) -> None:
    """A line of the test's timeline (shown by pytest when the test fails)."""
    print(f"chaos {time.monotonic() - _T0[0]:6.1f} s: {what}", flush=True)


def _records(run_dir: Path):
    """The records of a run's spool, read as any reader would (a line being written is skipped)."""
    for seg in sorted((run_dir / tracking.SPOOL_DIR).glob("seg-*.jsonl")):
        for line in seg.read_text().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _tagged(run_dir: Path, tag: str) -> bool:
    return any(tag in r.get("tags", {}) for r in _records(run_dir))


def _wait_for(cond: Callable[[], bool], what: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline or not alive():
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.1)


class Outage(threading.Thread):
    """MLflow down from the moment stage A's workers run (their placement tag is spooled) until stage A is
    evaluated (its `vggdist.evaluated` tag is spooled) and stage B waits for MLflow to create its run (the
    driver's log says so): the whole of stage A, its restart included, runs offline."""

    def __init__(self, server: MlflowServer, run_dir: Path, log: Path, alive: Callable[[], bool]) -> None:
        super().__init__(daemon=True)
        self.server, self.run_dir, self.log, self.alive = server, run_dir, log, alive
        self.down_ms = self.up_ms = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            _wait_for(
                lambda: _tagged(self.run_dir, runmeta.TAG_WORKERS), "stage A's workers ran", 300, self.alive
            )
            self.down_ms = int(time.time() * 1000)
            self.server.stop()
            _mark("MLflow stopped")
            _wait_for(
                lambda: _tagged(self.run_dir, runmeta.TAG_EVALUATED), "stage A was evaluated", 300, self.alive
            )
            _wait_for(
                lambda: "stage 2-B-S256 waits for it" in self.log.read_text(errors="replace"),
                "stage B waited for MLflow",
                120,
                self.alive,
            )
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.up_ms = int(time.time() * 1000)
            self.server.start()
            _mark("MLflow started again")


def _ray_processes(ray_tmp: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if ray_tmp in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _end_ray(ray_tmp: str, timeout_s: float = 30) -> list[int]:
    """Wait for the Ray processes of a killed driver to go (Ray ends a driver's private cluster with it); SIGKILL
    and return those still there after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _ray_processes(ray_tmp)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _structure(out: Path) -> dict:
    """What must not depend on faults: the report's files and headings, which rows of each table hold our numbers
    (and on how many images), that no row is there twice (a stage run twice would add one), the paired
    comparisons, which findings are measured, and the sweep's runs; values, run ids and verdicts are left out."""
    md = (out / "report.md").read_text()
    doc = json.loads((out / "tables.json").read_text())
    rows = [r for t in doc["tables"].values() for r in t]
    ids = [(r["table"], r["config"], r["train_scale"], str(r["test_scales"]), r["protocol"]) for r in rows]
    runs = md[md.index("## Runs of this sweep") : md.index("## Findings")].splitlines()
    return {
        "files": sorted(f.name for f in out.iterdir()),
        "headings": [line for line in md.splitlines() if line.startswith("## ")],
        "ours": sorted(
            (*i, r["ours_n"]) for i, r in zip(ids, rows, strict=True) if r["ours_top1"] is not None
        ),
        "rows twice": len(ids) - len(set(ids)),
        "comparisons": [(c["family"], c["a"], c["b"], c["n"]) for c in doc["comparisons"]],
        "measured": [
            (f["claim"].split(" (")[0], f["verdict"] != "not measured in this plan") for f in doc["findings"]
        ],
        "runs": [line.rsplit("|", 2)[0] for line in runs if re.match(r"^\| \d-", line)],  # less the run id
    }


# An undisturbed run of the plan reports exactly this (measured once with the same command, no faults)
EXPECTED = {
    "files": ["error_vs_depth.png", "report.md", "tables.csv", "tables.json", "training_curves.png"],
    "headings": [
        "## Table 3: ConvNet performance at a single test scale (dense evaluation)",
        "## Table 4: ConvNet performance at multiple test scales (dense evaluation)",
        "## Table 5: ConvNet evaluation techniques comparison (multiple test scales)",
        "## Table 6: fusion of multiple ConvNets (posteriors averaged)",
        "## Paired comparisons (McNemar, exact)",
        "## Runs of this sweep",
        "## Findings",
    ],
    "ours": [(3, "A", "256", "[256]", "dense", 20), (3, "B", "256", "[256]", "dense", 20)],
    "rows twice": 0,
    "comparisons": [("depth (Table 3)", "A/256 dense Q=256", "B/256 dense Q=256", 20)],
    "measured": [(claim, claim == "depth helps") for claim in CLAIMS],
    "runs": ["| 1-A-S256 | A | 256 | FINISHED | yes ", "| 2-B-S256 | B | 256 | FINISHED | yes "],
}


@pytest.fixture
def ray_tmp():
    d = tempfile.mkdtemp(prefix="vgc", dir="/tmp")  # short: Ray's socket paths are length-limited
    yield d
    _end_ray(d, timeout_s=10)


def test_a_sweep_through_a_worker_crash_an_mlflow_outage_and_a_killed_driver(tmp_path, ray_tmp, monkeypatch):
    data = make_shards(tmp_path, train_per_class=16, val_per_class=5, samples_per_shard=16)
    plan = tmp_path / "chaos.yaml"
    plan.write_text(PLAN)
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        _chaos(tmp_path, data, plan, server, ray_tmp, monkeypatch)
    finally:
        server.stop()


def _chaos(tmp: Path, data: Path, plan: Path, server: MlflowServer, ray_tmp: str, monkeypatch) -> None:
    storage = tmp / "ray_results"
    killed, held = tmp / "killed-worker", tmp / "held"
    faults = [
        "-m",
        "tests.train_faults",
        "--kill-worker",
        f"1:1:{killed}:-1-A-",
        "--hold",
        f"1:0:{held}:-2-B-",
    ]
    command = [sys.executable, *faults, "--", *_sweep_args(data, plan, storage, 2)]
    env = _env(server.uri, ray_tmp)
    _T0[0] = time.monotonic()
    _mark("sweep started")
    first_log = tmp / "first.log"
    with open(first_log, "w") as log_file:
        first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        outage = Outage(server, storage / "chaos-1-A-S256", first_log, alive=lambda: first.poll() is None)
        outage.start()
        try:
            _wait_for(held.exists, "stage B held after epoch 1", 600, alive=lambda: first.poll() is None)
        finally:
            _mark("driver killed")
            first.send_signal(signal.SIGKILL)
            first.wait()
            outage.join(120)
    text = first_log.read_text()
    assert outage.error is None, f"{outage.error}\n{text[-4000:]}"
    assert first.returncode == -signal.SIGKILL, text[-4000:]
    assert killed.exists(), "the training worker was not killed"
    assert server.running
    assert "MLflow at" in text and "is back: stage 2-B-S256 goes on" in text, text[-4000:]
    assert not _end_ray(ray_tmp), "Ray processes outlived the killed driver"

    _mark("Ray gone")
    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    _mark("sweep rerun done")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "skipping finished stages ['1-A-S256']" in again.stderr

    runs = tracking.find_runs("chaos", uri=server.uri)
    parents = [r for r in runs if r["tags"].get(runmeta.TAG_SWEEP) == runmeta.SWEEP_PARENT]
    assert len(parents) == 1, runs
    parent = parents[0]
    children = {r["tags"][runmeta.TAG_STAGE]: r for r in runs if r is not parent}
    assert len(runs) == 1 + len(STAGES) and sorted(children) == list(STAGES)  # no duplicate run
    assert all(r["status"] == "FINISHED" for r in runs), [(r["run_id"], r["status"]) for r in runs]
    a, b = children["1-A-S256"], children["2-B-S256"]
    assert b["tags"][runmeta.TAG_INIT_FROM] == a["run_id"]
    mapping = json.loads(b["tags"][runmeta.TAG_INIT_MAPPING])  # B's staged init from A, set once
    assert len(mapping) == 7 and list(mapping.values())[-1] == "classifier.6"
    for r in children.values():
        assert r["tags"][runmeta.TAG_SWEEP] == parent["run_id"] and r["tags"][runmeta.TAG_EVALUATED] == "true"
        assert r["tags"][tracking.TAG_CHECKPOINT].endswith(f"epoch_{EPOCHS:03d}")
        assert "eval/dense/Q37/top1_err" in r["metrics"]
        assert sorted(w["rank"] for w in json.loads(r["tags"][runmeta.TAG_WORKERS])) == [0, 1]
        assert r["params"]["optim.lr"] == "0.01" and r["params"]["run.workers"] == "2"
        # every validation image counted once over both ranks, in every epoch
        assert [v for _, v in tracking.metric_history(r["run_id"], runmeta.VAL_SAMPLES, uri=server.uri)] == [
            20,
            20,
        ]
        for key in PER_EPOCH:  # every epoch's metrics, each exactly once
            steps = sorted(s for s, _, _ in tracking.metric_rows(r["run_id"], key, uri=server.uri))
            assert steps == list(range(1, EPOCHS + 1)), (r["tags"][runmeta.TAG_STAGE], key, steps)
        step_rows = tracking.metric_rows(r["run_id"], runmeta.STEP_LOSS, uri=server.uri)
        assert len({s for s, _, _ in step_rows}) == len(step_rows), step_rows  # no training step logged twice
    # stage A trained (restart included) and was evaluated after MLflow went down: all of it came from its spool
    a_epochs = [ts for _, _, ts in tracking.metric_rows(a["run_id"], runmeta.VAL_TOP1_ERR, uri=server.uri)]
    assert all(outage.down_ms < ts < outage.up_ms for ts in a_epochs), (
        outage.down_ms,
        a_epochs,
        outage.up_ms,
    )
    assert not any(sp.has_pending() for sp in tracking.find_spools(storage))

    # the report of the sweep has the structure of an undisturbed run's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert cli_main(["report", "--experiment", "chaos", "--out", str(tmp / "report")]) == 0
    _mark("report done")
    assert _structure(tmp / "report") == EXPECTED


ONE_STAGE = """\
name: chaos
preset: mini
stages:
  - {key: 1-A-S256, config: A, train_scale: 256, init: glorot, epochs: 1, test_scales: [256]}
"""


def test_a_stage_trained_but_not_evaluated_is_evaluated_not_trained_again(tmp_path, ray_tmp):
    """A sweep driver killed while a stage evaluates leaves the stage's run FINISHED without `vggdist.evaluated`.
    The rerun evaluates that run and trains nothing: the stage keeps its one run (`train` would start a new one
    for a run name whose run is FINISHED)."""
    import mlflow

    data = make_shards(tmp_path, train_per_class=8, val_per_class=5, samples_per_shard=16)
    plan = tmp_path / "one.yaml"
    plan.write_text(ONE_STAGE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "vggdist.cli", *_sweep_args(data, plan, tmp_path / "ray", 1)]
    first = subprocess.run(
        command, env=_env(uri, ray_tmp), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    [child] = [r for r in tracking.find_runs("chaos", uri=uri) if runmeta.TAG_STAGE in r["tags"]]
    mlflow.MlflowClient(uri).delete_tag(child["run_id"], runmeta.TAG_EVALUATED)  # the evaluation never ended

    again = subprocess.run(
        command, env=_env(uri, ray_tmp), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tracking.find_runs("chaos", uri=uri)
    assert len(runs) == 2 and all(
        r["status"] == "FINISHED" for r in runs
    )  # the parent and the stage's one run
    [rerun] = [r for r in runs if runmeta.TAG_STAGE in r["tags"]]
    assert rerun["run_id"] == child["run_id"] and rerun["tags"][runmeta.TAG_EVALUATED] == "true"
    assert [s for s, _, _ in tracking.metric_rows(child["run_id"], runmeta.TRAIN_LOSS, uri=uri)] == [1]
    assert "eval/dense/Q37/top1_err" in rerun["metrics"]
