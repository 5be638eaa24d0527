"""`vggdist sweep`: a plan (`vggdist.plan`) run as one job, a DAG of training runs under one MLflow parent run.

Stages whose dependencies are done run concurrently, as many at a time as the cluster has room for (each stage is a
Ray task that trains its run, then evaluates it). The sweep starts or joins Ray once (`vggdist.cluster`), and every
stage runs in that Ray: on a private local Ray a one-worker stage trains inside its own task (Ray Train's local
mode, `vggdist.ray_fit`; the task holds the worker's CPUs or GPU), so no stage pays for a Ray Train controller and
worker group. Rerunning the sweep with the same name skips stages whose MLflow child run is FINISHED and
evaluated, and resumes an interrupted one (same run name → newest whole checkpoint, same MLflow run). When every
stage is done, the plan's fusion groups are evaluated (Table 6). A stage whose run must be created or resumed
while MLflow is down waits for it (up to `STAGE_WAITS_FOR_MLFLOW_S`), so an outage delays a sweep instead of ending it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from vggdist import cluster, console, runmeta, tracking
from vggdist.config import Config
from vggdist.plan import Plan, Stage, builtin_plan, plan_to_yaml, stage_config
from vggdist.shared_storage import check_storage_for_cluster

log = logging.getLogger(__name__)

STAGE_WAITS_FOR_MLFLOW_S = 3600.0  # how long a stage that must create its MLflow run waits for MLflow


@ray.remote(num_cpus=0)
def _run_stage(
    cfg: Config,
    data_dir: str,
    stage: Stage,
    init_from: str | None,
    parent_run_id: str,
    uri: str,
    where: cluster.Where,
    callbacks: tuple[Any, ...] = (),
    verbose: bool = False,
    trained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A stage as a Ray task: train (or resume), then evaluate; returns the child run id and checkpoint.
    `trained`: the stage's FINISHED child run when its training ended before the sweep stopped but its evaluation
    was not logged (a driver killed while evaluating): it is evaluated only, not trained again into a new run."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    console.set_verbose(verbose)  # this task's process: quiet unless the command was run with --verbose
    from vggdist.ray_eval import evaluate
    from vggdist.ray_train import storage_path, train

    if init_from:
        cfg = replace(cfg, run=replace(cfg.run, init_from=init_from))
    if trained is not None:
        log.info("stage %s: run %s is trained already; evaluating it", stage.key, trained["run_id"])
        run_id, checkpoint, metrics = trained["run_id"], trained["checkpoint"], trained["metrics"]
        run_dir = trained["storage"] or f"{storage_path(cfg)}/{cfg.run.run_name}"
    else:
        # creating (or resuming) the stage's run needs MLflow: during an outage the stage waits for it, and the
        # sweep with it, instead of failing; the stages already running go on into their spools meanwhile
        tracking.wait_reachable(uri, STAGE_WAITS_FOR_MLFLOW_S, f"stage {stage.key}")
        tags = {runmeta.TAG_SWEEP: parent_run_id, runmeta.TAG_TRAIN_SCALE: stage.scale_label}
        result = train(
            cfg,
            data_dir,
            stage=stage.key,
            parent_run_id=parent_run_id,
            extra_tags=tags,
            where=where,
            callbacks=callbacks,
        )
        run_id, checkpoint, metrics = result.run_id, result.checkpoint, result.metrics
        run_dir = result.run_dir
    # a checkpoint path needs no MLflow read, so a stage goes on through an MLflow outage
    evaluate(
        checkpoint or run_id,
        data_dir,
        protocols=cfg.eval.protocols,  # the stage's, unless --set eval.protocols=… overrides them
        scales=list(cfg.eval.test_scales),
        paper_scales=list(stage.paper_test_scales),
        workers=cfg.run.workers,
        log_to_run=True,
        gpu=cfg.run.gpu,
    )
    done = tracking.Tracker.attach(
        run_id, tracking.existing_spool(run_dir), uri=uri, wait_s=cfg.run.mlflow_wait_s
    )
    done.set_tags({runmeta.TAG_EVALUATED: runmeta.TRUE})
    done.close()
    return {"run_id": run_id, "checkpoint": checkpoint, "metrics": metrics}


def _finished_children(
    parent_run_id: str, experiment: str, uri: str
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The sweep's FINISHED child runs by stage key: (evaluated, trained only). A stage is done once its
    evaluation is logged; one whose training finished but whose evaluation was not logged is evaluated again,
    never trained again (`train` would start a new MLflow run for a run name whose run is FINISHED)."""
    runs = tracking.find_runs(
        experiment, filter_string=f"tags.`{runmeta.TAG_SWEEP}` = '{parent_run_id}'", uri=uri
    )
    finished = [r for r in runs if r["status"] == "FINISHED"]
    evaluated = {
        r["tags"][runmeta.TAG_STAGE]: r
        for r in finished
        if r["tags"].get(runmeta.TAG_EVALUATED) == runmeta.TRUE
    }
    trained = {
        r["tags"][runmeta.TAG_STAGE]: r
        for r in sorted(finished, key=lambda r: r["start_time"] or 0)  # the newest wins
        if r["tags"][runmeta.TAG_STAGE] not in evaluated and r["tags"].get(runmeta.TAG_CHECKPOINT)
    }
    return evaluated, trained


def _trained(run: dict | None) -> dict[str, Any] | None:
    """What `_run_stage` needs of a trained, not yet evaluated child run (plain values: it crosses to a Ray task)."""
    if run is None:
        return None
    return {
        "run_id": run["run_id"],
        "checkpoint": run["tags"][runmeta.TAG_CHECKPOINT],
        "storage": run["tags"].get(runmeta.TAG_STORAGE),
        "metrics": dict(run["metrics"]),
    }


def _fusion_done(parent_run_id: str, uri: str) -> bool:
    return tracking.get_run(parent_run_id, uri=uri)["tags"].get(runmeta.TAG_FUSION_DONE) == runmeta.TRUE


def _parent_run(
    experiment: str, sweep_name: str, plan: Plan, uri: str, spool_dir: str, wait_s: float
) -> tracking.Tracker:
    """The sweep's parent run (created, or resumed by sweep name); it logs through `spool_dir`."""
    existing = tracking.find_runs(
        experiment,
        filter_string=f"tags.`{runmeta.TAG_SWEEP_NAME}` = '{sweep_name}' "
        f"and tags.`{runmeta.TAG_SWEEP}` = '{runmeta.SWEEP_PARENT}'",
        uri=uri,
    )
    if existing:
        log.info("resuming sweep %s (MLflow run %s)", sweep_name, existing[-1]["run_id"])
        return tracking.Tracker.start(
            experiment, run_id=existing[-1]["run_id"], uri=uri, spool_dir=spool_dir, wait_s=wait_s
        )
    t = tracking.Tracker.start(
        experiment,
        run_name=f"sweep-{sweep_name}",
        tags={
            runmeta.TAG_SWEEP: runmeta.SWEEP_PARENT,
            runmeta.TAG_SWEEP_NAME: sweep_name,
            runmeta.TAG_PLAN: plan.name,
        },
        uri=uri,
        spool_dir=spool_dir,
        wait_s=wait_s,
    )
    t.log_text(plan_to_yaml(plan), runmeta.PLAN_ARTIFACT)
    return t


def concurrency(workers_per_run: int, gpu: bool, max_concurrent: int | None = None) -> int:
    """How many stages to run at once: `max_concurrent` when given (e.g. what an autoscaling cluster may grow to),
    else what the cluster holds now, its CPUs (or GPUs) over one run's workers; re-read as stages finish."""
    if max_concurrent:
        return max(1, max_concurrent)
    res = ray.cluster_resources()
    have = res.get("GPU", 0) if gpu else res.get("CPU", 1)
    return max(1, math.floor(have / max(1, workers_per_run)))


def run_sweep(
    data_dir: str,
    *,
    plan: str = "paper",
    workers: int | None = None,
    experiment: str = runmeta.DEFAULT_EXPERIMENT,
    sweep_name: str | None = None,
    address: str | None = None,
    sets: list[str] | None = None,
    gpu: bool = False,
    max_concurrent: int | None = None,
    progress=None,
    callbacks: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """Run (or resume) the staged plan; returns {stage key: child run id, ...} and the fusion results.
    `callbacks` (`vggdist.callbacks`) go to every stage's training workers."""
    from vggdist.outcome_file import log_outcomes
    from vggdist.ray_eval import evaluate_fusion
    from vggdist.ray_fit import use_local_mode
    from vggdist.ray_train import storage_path
    from vggdist.shardformat import data_dirs

    p = builtin_plan(plan)
    data_dirs(data_dir)  # fail early with the preprocessing hint
    sweep_name = sweep_name or f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    configs = {
        s.key: stage_config(
            p,
            s,
            workers=workers,
            gpu=gpu,
            experiment=experiment,
            run_name=f"{sweep_name}-{s.key}",
            sets=sets or [],
        )
        for s in p.stages
    }
    # once for the whole sweep: every stage runs in this Ray. Ray Train's placement-group cleaner polls the
    # dashboard's state API, so a private local Ray gets one only when a stage needs Ray Train workers.
    trains_on_workers = any(not use_local_mode(c, cluster.Where("local")) for c in configs.values())
    where = cluster.connect(address, include_dashboard=None if trains_on_workers else False)
    uri = tracking.tracking_uri()
    first = next(iter(configs.values())).run
    storage = storage_path(next(iter(configs.values())))
    check_storage_for_cluster(storage, where.nodes)  # every stage's checkpoints, read by the next stage
    # before reading which stages are done: an earlier outage may have left their results spooled
    tracking.replay_pending(storage)
    tracking.check_reachable(uri)
    parent_spool = tracking.spool_dir(f"{storage}/sweep-{sweep_name}")
    parent = _parent_run(experiment, sweep_name, p, uri, parent_spool, first.mlflow_wait_s)
    parent.set_tags({runmeta.TAG_RAY: where.describe()})  # this time's, when a rerun resumes elsewhere
    done, trained = _finished_children(parent.run_id, experiment, uri)
    results: dict[str, dict] = {
        k: {"run_id": r["run_id"], "checkpoint": r["tags"].get(runmeta.TAG_CHECKPOINT)}
        for k, r in done.items()
    }
    if done:
        log.info("sweep %s: skipping finished stages %s", sweep_name, sorted(done))

    workers_per_run = first.workers * (1 if gpu else first.cpus_per_worker)  # slots one run takes
    pending = [s for s in p.stages if s.key not in results]
    running: dict[ray.ObjectRef, Stage] = {}
    while pending or running:
        ready = [s for s in pending if s.init_from is None or s.init_from in results]
        limit = concurrency(workers_per_run, gpu, max_concurrent)
        for s in ready[: max(0, limit - len(running))]:
            pending.remove(s)
            init_ckpt = results[s.init_from]["checkpoint"] if s.init_from else None
            cfg = configs[s.key]
            # a stage in local mode trains in its own task: that task holds what its one worker would
            held = (
                {"num_cpus": cfg.run.cpus_per_worker, "num_gpus": 1 if gpu else 0}
                if use_local_mode(cfg, where)
                else {}
            )
            ref = _run_stage.options(**held).remote(
                cfg,
                str(Path(data_dir).resolve()),
                s,
                init_ckpt,
                parent.run_id,
                uri,
                where,
                tuple(callbacks),
                console.verbose(),
                _trained(trained.get(s.key)),
            )
            running[ref] = s
            log.info("sweep %s: started stage %s", sweep_name, s.key)
        if not running:
            raise RuntimeError(
                f"sweep {sweep_name}: stages {[s.key for s in pending]} wait for stages that did not finish"
            )
        finished, _ = ray.wait(list(running), num_returns=1)
        stage = running.pop(finished[0])
        results[stage.key] = ray.get(
            finished[0]
        )  # raises (and stops the sweep) if the stage failed; rerun resumes
        log.info("sweep %s: stage %s done (run %s)", sweep_name, stage.key, results[stage.key]["run_id"])
        if progress is not None:
            progress(stage.key, results[stage.key])

    summary = {
        "sweep": sweep_name,
        "parent_run_id": parent.run_id,
        "experiment": experiment,
        "stages": {k: v["run_id"] for k, v in results.items()},
    }
    if len(done) == len(p.stages) and _fusion_done(parent.run_id, uri):
        log.info("sweep %s: every stage and the fusion are done already", sweep_name)
        parent.end("FINISHED")
        tracking.replay_pending(storage)
        return {**summary, "fusion": f"done (see {runmeta.FUSION_RESULTS} on the parent run)"}
    fusion_rows = []
    stage_of = {s.key: s for s in p.stages}
    for group in p.fusion:
        last = stage_of[
            group[-1]
        ]  # Table 6 fuses at the test scales of the (jittered) members: the last one's
        fused = evaluate_fusion(
            [results[k]["run_id"] for k in group],
            data_dir,
            labels=[f"{stage_of[k].config}/{stage_of[k].scale_label}" for k in group],
            protocols=p.fusion_protocols,
            scales=list(configs[last.key].eval.test_scales),
            paper_scales=list(last.paper_test_scales),
            workers=configs[group[0]].run.workers,
            gpu=gpu,
        )
        # the per-image outcomes beside the rows, for the report's fusion-vs-best-member test
        outcomes = f"{runmeta.FUSION_OUTCOMES_DIR}/{'+'.join(group)}.npz"
        log_outcomes(parent, fused["outcomes"], {**fused["outcomes_meta"], "stages": list(group)}, outcomes)
        fusion_rows += [{**r, "outcomes": outcomes} for r in fused["rows"]]
    if p.fusion:
        parent.log_dict({"rows": fusion_rows}, runmeta.FUSION_RESULTS)
    parent.set_tags({runmeta.TAG_FUSION_DONE: runmeta.TRUE})
    parent.end("FINISHED")
    tracking.replay_pending(storage)  # what the stages' processes left spooled, if MLflow is back
    return {**summary, "fusion": fusion_rows}
