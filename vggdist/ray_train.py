"""Data-parallel SGD (§3.1) on Ray Train: TorchTrainer + DDP, one worker per GPU (or CPU slot).

The driver (`train`, this module) resolves data, lineage and the MLflow run, then starts a TorchTrainer with
`WorkerSettings`; each worker runs `vggdist.ray_worker.worker_loop`, a thin shell around `vggdist.train.TrainLoop`
that adds three things: the cross-rank sum, checkpoint + `ray.train.report` at every epoch end, and rank-0 MLflow
logging into the run the driver created. Rank 0 only appends to the run's durable spool (`<storage>/<run>/mlflow_spool`, synced at every
epoch end) and never talks to MLflow, so a restarted worker group resumes logging into the same run with no
network call; the driver's sender replays the spool to MLflow while training runs. Evaluation on Ray is
`vggdist.ray_eval`; where Ray runs, `vggdist.cluster`; how the workers run (Ray Train workers, or local mode in
this process for one worker on a local Ray), `vggdist.ray_fit`.

Fault tolerance: `FailureConfig(max_failures)` restarts the worker group, which resumes from the newest whole
checkpoint (model, optimiser, lr schedule, epoch; random draws are reseeded per epoch; `vggdist.ray_checkpoints`).
Rerunning the same command with the run name its log shows (`--run-name`, default `<config>-<date>-<time>`)
resumes a run whose driver died, in the same MLflow run. A storage that is full, read-only or forbidden stops the
run at once with one line (`checkpoint_store.CheckpointWriteError`), without Ray's restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggdist import checkpoint_store, cluster, data, ray_fit, runmeta, tracking
from vggdist.config import Config
from vggdist.failures import CommandFailed
from vggdist.ray_worker import WorkerSettings, worker_loop
from vggdist.shardformat import data_dirs, read_manifest
from vggdist.shared_storage import check_storage_for_cluster
from vggdist.train import batch_plan

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "~/vggdist_results"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    run_name: str
    checkpoint: str | None  # latest checkpoint directory (storage path)
    best_checkpoint: str | None
    metrics: dict[str, float]
    warning: str | None = None  # the stall guard's warning, when training did not learn
    run_dir: str | None = None  # <storage>/<run name>: checkpoints and the MLflow spool
    spooled: int = 0  # logging calls MLflow had not taken when the run ended (`vggdist sync run_dir`)


def train(
    cfg: Config,
    data_dir: str,
    *,
    stage: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    address: str | None = None,
    where: cluster.Where | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Run one training of `cfg` on the shards under `data_dir`; returns the MLflow run and checkpoints.

    `address`: where to run (`vggdist.cluster`'s rule); `where`: the Ray the caller runs in already (a sweep's
    stages), which then decides local mode. `callbacks`: `vggdist.callbacks` hooks run in every worker (they must
    pickle). Raises CheckpointWriteError (one line, exit 1) when the storage
    cannot take a checkpoint, after marking the MLflow run FAILED with the reason."""
    train_dir, val_dir = data_dirs(data_dir)
    manifest = read_manifest(train_dir)
    num_classes = len(manifest["classes"])
    plan = batch_plan(cfg.optim, cfg.run.workers)
    samples = cfg.schedule.samples_per_epoch or int(manifest["num_samples"])
    steps = data.steps_per_epoch(samples, plan.global_batch_size)

    where, local_mode = ray_fit.where_to_train(cfg, address, where)
    uri = tracking.tracking_uri()
    tracking.check_uri_for_cluster(uri, where.nodes)
    storage = storage_path(cfg)
    check_storage_for_cluster(storage, where.nodes)  # before anything is written there
    tracking.replay_pending(storage)  # runs of this storage an earlier outage left spooled
    tracking.check_reachable(uri)  # creating the run needs MLflow: fail now, before anything ran

    init_checkpoint = init_from_run = None
    if cfg.run.init in ("from-shallower", "resume-weights"):
        init_checkpoint = tracking.resolve_checkpoint(cfg.run.init_from, uri=uri)
        init_from_run = checkpoint_store.read_meta(init_checkpoint).get("mlflow_run_id") or cfg.run.init_from

    run_name = cfg.run.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{storage}/{run_name}"
    tags = {
        runmeta.TAG_CONFIG: cfg.model.name,
        runmeta.TAG_MANIFEST: runmeta.manifest_hash(train_dir),
        runmeta.TAG_CODE_VERSION: runmeta.code_version(),
        runmeta.TAG_RAY_RUN_NAME: run_name,
        runmeta.TAG_STORAGE: run_dir,
        runmeta.TAG_RAY: where.describe(),
        **({runmeta.TAG_STAGE: stage} if stage else {}),
        **({runmeta.TAG_INIT_FROM: init_from_run} if init_from_run else {}),
        **(extra_tags or {}),
    }
    existing = _unfinished_run(cfg.run.experiment, run_name, uri)
    tracker = tracking.Tracker.start(
        cfg.run.experiment,
        run_name=run_name,
        run_id=existing,
        parent_run_id=parent_run_id,
        tags=tags,
        uri=uri,
        spool_dir=tracking.spool_dir(run_dir),
        wait_s=cfg.run.mlflow_wait_s,
    )
    tracker.log_params(
        {
            **cfg.flat(),
            # the name the run goes by, given or made up: what a rerun passes as --run-name to resume it
            "run.run_name": run_name,
            "data.dir": str(Path(data_dir).resolve()),
            "data.num_classes": num_classes,
            "data.train_samples": manifest["num_samples"],
            "run.steps_per_epoch": steps,
            "run.batch_size_per_worker": plan.batch_size_per_worker,
            "run.accum_steps": plan.accum_steps,
            "data.manifest_sha256": tags[runmeta.TAG_MANIFEST],
            # the code version is a param too; a resumed run keeps the one it started with
            **({} if existing else {"code_version": tags[runmeta.TAG_CODE_VERSION]}),
        }
    )
    tracker.sync()
    if not existing:  # the Dataset column and lineage of the MLflow UI; a resumed run has them already
        tracking.log_datasets(tracker.run_id, runmeta.dataset_inputs(train_dir, val_dir), uri)
    log.info(
        "MLflow run %s (%s) in %s; %d steps/epoch of %d images",
        tracker.run_id,
        run_name,
        uri,
        steps,
        plan.global_batch_size,
    )
    if not cfg.run.run_name:
        log.info(
            "run name %s: if this command stops, rerun it with --run-name %s to resume", run_name, run_name
        )

    settings = WorkerSettings(
        config=cfg,
        plan=plan,
        num_classes=num_classes,
        steps_per_epoch=steps,
        train_dir=str(train_dir),
        val_dir=str(val_dir) if val_dir else None,
        run_id=tracker.run_id,
        tracking_uri=uri,
        spool_dir=tracker.spool_dir,
        init_checkpoint=init_checkpoint,
        storage_root=run_dir,
        local_mode=local_mode,
        callbacks=tuple(callbacks),
        name=stage or run_name,
    )
    try:
        fitted = ray_fit.fit(
            worker_loop,
            {"settings": settings},
            cfg,
            run_name=run_name,
            storage=storage,
            local_mode=local_mode,
        )
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    rv = fitted.return_value
    if rv.get("data_error"):
        tracker.set_tags({runmeta.TAG_FAILURE: rv["data_error"]})
        tracker.end("FAILED")
        raise CommandFailed(rv["data_error"])
    if rv.get("error"):
        failure = checkpoint_store.CheckpointWriteError.from_dict(rv["error"])
        raise ray_fit.stopped(tracker, uri, run_name, run_dir, failure)
    out = TrainResult(
        run_id=tracker.run_id,
        run_name=run_name,
        checkpoint=fitted.checkpoint,
        best_checkpoint=fitted.best_checkpoint,
        metrics=rv.get("metrics", {}),
        warning=rv.get("warning"),
        run_dir=run_dir,
    )
    tracker.set_tags(
        {runmeta.TAG_CHECKPOINT: out.checkpoint or "", runmeta.TAG_BEST_CHECKPOINT: out.best_checkpoint or ""}
    )
    tracker.end("FINISHED")  # waits a little for MLflow; else says what stays spooled and how to send it
    return dataclasses.replace(out, spooled=tracker.pending)


def storage_path(cfg: Config) -> str:
    """The run's Ray storage: `run.storage_path` (local paths made absolute) or ~/vggdist_results."""
    storage = os.path.expanduser(cfg.run.storage_path or DEFAULT_STORAGE)
    return storage.rstrip("/") if "://" in storage else os.path.abspath(storage)


def _unfinished_run(experiment: str, run_name: str, uri: str) -> str | None:
    """The MLflow run of an earlier, interrupted `train` with the same run name: resuming logs into it."""
    try:
        runs = tracking.find_runs(
            experiment, filter_string=f"tags.`{runmeta.TAG_RAY_RUN_NAME}` = '{run_name}'", uri=uri
        )
    except Exception:  # experiment does not exist yet
        return None
    for r in runs:
        if r["status"] != "FINISHED":
            return r["run_id"]
    return None
