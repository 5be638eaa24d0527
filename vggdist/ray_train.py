"""Data-parallel SGD (§3.1) on Ray Train: TorchTrainer + DDP, one worker per GPU (or CPU slot).

The only training module that imports ray. The driver (`train`) resolves data, lineage and the MLflow run, then
starts a TorchTrainer; each worker runs `_worker_loop`, a thin shell around `vggdist.train.TrainLoop` that adds
three things: the cross-rank sum, checkpoint + `ray.train.report` at every epoch end, and rank-0 MLflow logging
into the run the driver created. Rank 0 only appends to the run's durable spool (`<storage>/<run>/mlflow_spool`,
synced at every epoch end) and never talks to MLflow, so a restarted worker group resumes logging into the same
run with no network call; the driver's sender replays the spool to MLflow while training runs.

Fault tolerance: `FailureConfig(max_failures)` restarts the worker group, which resumes from
`ray.train.get_checkpoint()` (model, optimiser, lr schedule, epoch, RNG). Rerunning the same command with the same
`run.run_name` resumes a run whose driver died (Ray finds the run's latest checkpoint under the storage path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from vggdist import checkpoint as ckpt
from vggdist import data, runmeta, tracking
from vggdist.comm import ddp_kwargs, register_comm_hook
from vggdist.config import Config
from vggdist.models import unwrap_model
from vggdist.shardformat import data_dirs, read_manifest, read_stats, split_dir
from vggdist.train import BatchPlan, TrainLoop, apply_init, batch_plan, build_model, sync_batch_norm
from vggdist.transforms import DeviceAugment

log = logging.getLogger(__name__)

# Test-only fault injection (documented in tests/test_ray_train.py): the worker of rank FAIL_RANK dies with
# os._exit(1) after reporting epoch FAIL_AT_EPOCH, once (the marker file records that it happened).
FAIL_AT_EPOCH_ENV = "VGGDIST_TEST_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "VGGDIST_TEST_FAIL_MARKER"
FAIL_RANK_ENV = "VGGDIST_TEST_FAIL_RANK"

DEFAULT_STORAGE = "~/vggdist_results"
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


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


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address` when given, else start a local Ray in-process."""
    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # no runtime_env here: inside `ray job submit` the job's own runtime env (working dir, env vars) applies;
        # training workers get WORKER_ENV through RunConfig(worker_runtime_env=...)
        ray.init(address=address, log_to_driver=True)
    else:
        # the dashboard process serves the state API Ray Train's placement-group cleaner polls; without it every
        # run prints pages of "Failed to query" warnings
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def _worker_env() -> dict[str, str]:
    """Environment for training workers: quiet Ray/MLflow defaults plus this process's VGGDIST_* variables."""
    return {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("VGGDIST_")}}


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _maybe_fail(epoch: int, rank: int) -> None:
    at = os.environ.get(FAIL_AT_EPOCH_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if at is None or marker is None or int(at) != epoch or rank != int(os.environ.get(FAIL_RANK_ENV, "0")):
        return
    if Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} died after epoch {epoch}\n")
    time.sleep(3)  # let the controller (2 s poll) register the checkpoint just reported
    os._exit(1)


def _worker_loop(lc: dict[str, Any]) -> dict[str, Any]:
    cfg = Config.from_dict(lc["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    plan = BatchPlan(**lc["plan"])
    torch.manual_seed(cfg.run.seed)  # identical initial weights everywhere (DDP also broadcasts rank 0's)

    model = build_model(cfg, lc["num_classes"])
    init_state = ckpt.load(lc["init_checkpoint"])["model"] if lc.get("init_checkpoint") else None
    mapping = apply_init(model, cfg, init_state)
    model = sync_batch_norm(model, cfg.run.sync_bn and world > 1)  # before DDP wraps it
    if cfg.run.use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs=ddp_kwargs(cfg.run.grad_compression, backend)
    )
    register_comm_hook(
        model,
        cfg.run.grad_compression,
        powersgd_rank=cfg.run.powersgd_rank,
        powersgd_start_iter=cfg.run.powersgd_start_iter,
    )
    if cfg.run.compile:
        model = torch.compile(model)

    stats = read_stats(lc["train_dir"])
    augment = DeviceAugment.from_stats(stats, cfg.data)
    loop = TrainLoop(
        model,
        cfg,
        plan=plan,
        steps_per_epoch=lc["steps_per_epoch"],
        augment=augment,
        device=device,
        reduce=_all_reduce_sum,
        is_rank0=rank == 0,
        num_classes=lc["num_classes"],
    )

    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt.load(d)
        unwrap_model(model).load_state_dict(state["model"])
        loop.load_state_dict(state["train_state"], state.get("optimizer"))
        log.info("rank %d resumed from %s at epoch %d", rank, resumed.path, loop.epoch)

    tracker = (
        tracking.Tracker.attach(lc["run_id"], lc["spool_dir"], uri=lc["tracking_uri"], send=False)
        if rank == 0
        else tracking.NullTracker()
    )
    if mapping and resumed is None:
        tracker.set_tags({runmeta.TAG_INIT_MAPPING: json.dumps(mapping)})
    placement = {
        "rank": rank,
        "node_rank": ctx.get_node_rank(),
        "local_rank": ctx.get_local_rank(),
        "ip": ray.util.get_node_ip_address(),
    }
    everyone = [placement]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, placement)
    tracker.set_tags({runmeta.TAG_WORKERS: json.dumps(everyone)})  # where each rank ran (node rank, address)

    def train_batches(epoch: int):
        torch.manual_seed(
            cfg.run.seed * 1_000_003 + epoch * 1009 + rank
        )  # dropout/colour shift: exact on resume
        return data.train_loader(
            lc["train_dir"],
            cfg.data,
            batch_size=plan.batch_size_per_worker,
            steps=lc["steps_per_epoch"] * plan.accum_steps,
            rank=rank,
            world_size=world,
            seed=cfg.run.seed,
            epoch=epoch,
        )

    expected_val = data.expected_eval_count(lc["val_dir"]) if lc.get("val_dir") else 0

    def val_batches():
        loader = data.center_crop_loader(
            lc["val_dir"],
            rank=rank,
            world_size=world,
            q=cfg.data.validation_scale,
            crop=cfg.data.crop_size,
            batch_size=cfg.eval.batch_size,
        )
        return ((images, labels) for images, labels, _keys in loader)

    last: dict[str, float] = {}

    def on_epoch_end(metrics: dict[str, float], lp: TrainLoop) -> None:
        last.clear()
        last.update(metrics)
        name = f"epoch_{lp.epoch:03d}"
        if runmeta.VAL_SAMPLES in metrics:  # every val image counted once
            data.check_eval_count(int(metrics[runmeta.VAL_SAMPLES]), expected_val)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt.save(
                    tmp,
                    model=model,
                    config=cfg,
                    optimizer=lp.optimizer,
                    train_state=lp.state_dict(),
                    stats=stats,
                    meta={
                        "epoch": lp.epoch,
                        "metrics": metrics,
                        "mlflow_run_id": lc["run_id"],
                        "init_mapping": mapping,
                    },
                )
                ray.train.report(
                    _score(metrics),
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=name,
                )
            tracker.log_metrics({k: v for k, v in metrics.items() if k != runmeta.EPOCH}, step=lp.epoch)
            tags = {runmeta.TAG_CHECKPOINT: f"{lc['storage_root']}/{name}"}
            if lp.stall_guard.warning:
                tags[runmeta.TAG_WARNING] = lp.stall_guard.warning
            if lp.schedule.events:
                tags[runmeta.TAG_LR_SCHEDULE] = json.dumps([e.to_dict() for e in lp.schedule.events])
            tracker.set_tags(tags)
            tracker.sync()  # the epoch's metrics survive a crash of this machine
        else:
            ray.train.report(_score(metrics))
        _maybe_fail(lp.epoch, rank)

    def log_step(m: dict[str, float], step: int) -> None:
        tracker.log_metrics(m, step=step)

    loop.fit(train_batches, val_batches if lc.get("val_dir") else None, on_epoch_end, log_fn=log_step)
    tracker.close()
    return {"metrics": last, "mapping": mapping, "warning": loop.stall_guard.warning}


def _score(metrics: dict[str, float]) -> dict[str, float]:
    """Ray keeps the k best checkpoints by `score` (plus always the latest): -val error, or -train error without val."""
    out = dict(metrics)
    out["score"] = -metrics.get(runmeta.VAL_TOP1_ERR, metrics.get(runmeta.TRAIN_TOP1_ERR, 100.0))
    return out


def train(
    cfg: Config,
    data_dir: str,
    *,
    stage: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    address: str | None = None,
) -> TrainResult:
    """Run one training of `cfg` on the shards under `data_dir`; returns the MLflow run and checkpoints."""
    train_dir, val_dir = data_dirs(data_dir)
    manifest = read_manifest(train_dir)
    num_classes = len(manifest["classes"])
    plan = batch_plan(cfg.optim, cfg.run.workers)
    samples = cfg.schedule.samples_per_epoch or int(manifest["num_samples"])
    steps = data.steps_per_epoch(samples, plan.global_batch_size)

    ensure_ray(address)
    uri = tracking.tracking_uri()
    tracking.check_uri_for_cluster(uri, alive_nodes())
    storage = storage_path(cfg)
    tracking.replay_pending(storage)  # runs of this storage an earlier outage left spooled
    tracking.check_reachable(uri)  # creating the run needs MLflow: fail now, before anything ran

    init_checkpoint = init_from_run = None
    if cfg.run.init in ("from-shallower", "resume-weights"):
        init_checkpoint = tracking.resolve_checkpoint(cfg.run.init_from, uri=uri)
        init_from_run = ckpt.read_meta(init_checkpoint).get("mlflow_run_id") or cfg.run.init_from

    run_name = cfg.run.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{storage}/{run_name}"
    tags = {
        runmeta.TAG_CONFIG: cfg.model.name,
        runmeta.TAG_MANIFEST: runmeta.manifest_hash(train_dir),
        runmeta.TAG_CODE_VERSION: runmeta.code_version(),
        runmeta.TAG_RAY_RUN_NAME: run_name,
        runmeta.TAG_STORAGE: run_dir,
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
    log.info(
        "MLflow run %s (%s) in %s; %d steps/epoch of %d images",
        tracker.run_id,
        run_name,
        uri,
        steps,
        plan.global_batch_size,
    )

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop_config = {
        "config": cfg.to_dict(),
        "plan": {
            "workers": plan.workers,
            "batch_size_per_worker": plan.batch_size_per_worker,
            "accum_steps": plan.accum_steps,
        },
        "num_classes": num_classes,
        "steps_per_epoch": steps,
        "train_dir": str(train_dir),
        "val_dir": str(val_dir) if val_dir else None,
        "run_id": tracker.run_id,
        "tracking_uri": uri,
        "spool_dir": tracker.spool_dir,
        "init_checkpoint": init_checkpoint,
        "storage_root": run_dir,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.run.workers,
            use_gpu=cfg.run.gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="score",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if result.error is not None:
        tracker.end("FAILED")
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    best = result.get_best_checkpoint(metric="score", mode="max") if result.best_checkpoints else None
    out = TrainResult(
        run_id=tracker.run_id,
        run_name=run_name,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        best_checkpoint=best.path if best else None,
        metrics=(result.return_value or {}).get("metrics", {}),
        warning=(result.return_value or {}).get("warning"),
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


# ------------------------------------------------------------------------------------------------ evaluation


@ray.remote
def _eval_slice(
    checkpoints: list[str], val_dir: str, rank: int, world: int, protocols: list[str], scales: list[int]
) -> dict:
    from vggdist.eval_run import evaluate_shard_slice

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return evaluate_shard_slice(
        checkpoints, val_dir, rank=rank, world_size=world, protocols=protocols, scales=scales, device=device
    )


def _distributed_counts(
    checkpoints: list[str], val_dir: Path, protocols: list[str], scales: list[int], workers: int, gpu: bool
) -> dict:
    """Sum the counts of `workers` Ray tasks; refuse to report unless every validation image was counted once."""
    from vggdist.evaluate import add_counts

    opts = {"num_gpus": 1} if gpu else {}
    refs = [
        _eval_slice.options(**opts).remote(checkpoints, str(val_dir), r, workers, protocols, scales)
        for r in range(workers)
    ]
    total: dict = {}
    seen = 0
    for part in ray.get(refs):
        total = add_counts(total, part["counts"])
        seen += part["images"]
    data.check_eval_count(seen, data.expected_eval_count(val_dir))
    for key, c in total.items():
        if c["n"] != seen:
            raise RuntimeError(f"internal error: {key} counted {c['n']} of {seen} images")
    return total


def _checkpoint_of(run_or_ckpt: str, uri: str) -> tuple[str, str | None]:
    """(checkpoint path, MLflow run id or None) for a run id or a checkpoint path."""
    path = tracking.resolve_checkpoint(run_or_ckpt, uri=uri)
    run_id = None if os.path.exists(run_or_ckpt) or "://" in run_or_ckpt else run_or_ckpt
    return path, run_id or ckpt.read_meta(path).get("mlflow_run_id")


def evaluate(
    run_or_checkpoint: str,
    data_dir: str,
    *,
    protocols: tuple[str, ...] = runmeta.PROTOCOLS,
    scales: list[int] | None = None,
    paper_scales: list[int] | None = None,
    ensemble: list[str] | None = None,
    workers: int = 2,
    split: str = "val",
    address: str | None = None,
    log_to_run: bool = True,
    gpu: bool = False,
) -> dict[str, Any]:
    """§4 evaluation of a run (fused with `ensemble` runs when given) on the validation shards.

    Logs `eval/<protocol>/<scales>/top1_err|top5_err` and the `eval_results` table to the evaluated run (for an
    ensemble: to the first run, with the members listed). Returns {"rows": [...], "markdown": str}.
    """
    from vggdist.eval_run import results_rows

    ensure_ray(address)
    uri = tracking.tracking_uri()
    val_dir = split_dir(data_dir, split)
    members = [_checkpoint_of(r, uri) for r in [run_or_checkpoint, *(ensemble or [])]]
    run_dir = os.path.dirname(members[0][0].rstrip("/"))  # <storage>/<run name>/epoch_NNN
    run_spool = tracking.existing_spool(run_dir)  # None for a checkpoint outside any vggdist run storage
    if run_spool and tracking.replay_pending(os.path.dirname(run_dir)) and members[0][0] != run_or_checkpoint:
        members[0] = _checkpoint_of(run_or_checkpoint, uri)  # the replay may have moved its checkpoint tag
    cfg = ckpt.load_config(members[0][0])
    scales = list(scales or cfg.eval.test_scales)
    counts = _distributed_counts(
        [m[0] for m in members], val_dir, list(protocols), scales, max(1, workers), gpu
    )
    rows = results_rows(counts, scales, paper_scales)
    if ensemble:
        for r in rows:
            r["models"] = [m[1] or m[0] for m in members]
    run_id = members[0][1]
    if log_to_run and run_id:
        # through the run's spool: kept if MLflow is down; a temporary one (and a warning) for foreign checkpoints
        tracker = tracking.Tracker.attach(run_id, run_spool, uri=uri, wait_s=cfg.run.mlflow_wait_s)
        prefix = runmeta.EVAL_FUSION if ensemble else runmeta.EVAL
        metrics = {
            runmeta.eval_metric_name(r["protocol"], r["scales"], kind, prefix): r[kind]
            for r in rows
            for kind in runmeta.ERROR_KINDS
        }
        tracker.log_metrics(metrics, step=0)
        artifact = runmeta.FUSION_EVAL_RESULTS if ensemble else runmeta.EVAL_RESULTS
        tracking.log_eval_table(tracker, rows, name=artifact)
        tracker.close()
    return {"rows": rows, "markdown": runmeta.markdown_table(rows), "run_id": run_id}


def evaluate_fusion(
    run_ids: list[str],
    data_dir: str,
    *,
    labels: list[str],
    protocols: tuple[str, ...],
    scales: list[int],
    paper_scales: list[int] | None = None,
    workers: int = 2,
    gpu: bool = False,
) -> list[dict[str, Any]]:
    """Table 6: the posteriors of several runs averaged over all `scales`; rows carry the member labels and run ids."""
    out = evaluate(
        run_ids[0],
        data_dir,
        protocols=protocols,
        scales=scales,
        paper_scales=paper_scales,
        ensemble=run_ids[1:],
        workers=workers,
        log_to_run=False,
        gpu=gpu,
    )
    rows = [r for r in out["rows"] if len(r["scales"]) == len(scales)]  # multi-scale rows only, as in Table 6
    for r in rows:
        r["models"] = labels
        r["run_ids"] = run_ids
    return rows
