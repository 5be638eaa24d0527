"""What every Ray Train worker of a training run runs (§3.1): `worker_loop`, a thin shell around
`vggdist.train.TrainLoop` that adds the cross-rank sum, a checkpoint and `ray.train.report` at every epoch end
(`vggdist.ray_checkpoints`), and rank 0's MLflow logging (into the run's durable spool), progress display and
system metrics. `WorkerSettings` is everything the driver (`vggdist.ray_train.train`) hands it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from vggdist import checkpoint as ckpt
from vggdist import checkpoint_store, console, data, runmeta, tracking
from vggdist.augment import DeviceAugment
from vggdist.callbacks import EpochEnd, SampleHook, call_hooks
from vggdist.comm import ddp_kwargs, register_comm_hook
from vggdist.config import Config
from vggdist.models import unwrap_model
from vggdist.progress import TrainProgress
from vggdist.ray_checkpoints import EpochCheckpoints, Stop
from vggdist.shardformat import read_stats
from vggdist.train import BatchPlan, TrainLoop, apply_init, build_model, sync_batch_norm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What every training worker gets from the driver: fixed before the run starts, pickled by Ray to each
    worker (and again to a restarted worker group)."""

    config: Config
    plan: BatchPlan  # how the global batch splits over the workers
    num_classes: int
    steps_per_epoch: int
    train_dir: str
    val_dir: str | None  # None: no per-epoch validation
    run_id: str  # the MLflow run rank 0 logs into
    tracking_uri: str
    spool_dir: str  # the run's durable MLflow spool: rank 0 appends, the driver replays
    init_checkpoint: str | None  # the weights --init from-shallower / resume-weights start from
    storage_root: str  # <storage path>/<run name>: where this run's checkpoints go
    local_mode: bool = False  # one worker in the driver's process (`vggdist.ray_fit`)
    callbacks: tuple[Any, ...] = ()  # `vggdist.callbacks` hooks, run in the workers
    name: str = "train"  # what rank 0's progress display calls the run (the sweep stage or the run name)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def worker_loop(loop_config: dict[str, WorkerSettings]) -> dict[str, Any]:
    ws = loop_config["settings"]
    cfg, plan = ws.config, ws.plan
    console.quiet_libraries()  # a Ray Train worker is a process of its own
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)  # identical initial weights everywhere (DDP also broadcasts rank 0's)

    model = build_model(cfg, ws.num_classes)
    init_state = checkpoint_store.load(ws.init_checkpoint)["model"] if ws.init_checkpoint else None
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

    stats = read_stats(ws.train_dir)
    augment = DeviceAugment.from_stats(stats, cfg.data)
    loop = TrainLoop(
        model,
        cfg,
        plan=plan,
        steps_per_epoch=ws.steps_per_epoch,
        augment=augment,
        device=device,
        reduce=_all_reduce_sum,
        is_rank0=rank == 0,
        num_classes=ws.num_classes,
    )

    checkpoints = EpochCheckpoints(
        ws.storage_root,
        rank=rank,
        reduce=_all_reduce_sum,
        local_mode=ws.local_mode,
        keep=cfg.run.keep_checkpoints,
    )
    resumed = checkpoints.resume()  # the newest whole checkpoint of this run, if any
    if resumed is not None:
        state, resumed_from = resumed
        unwrap_model(model).load_state_dict(state["model"])
        loop.load_state_dict(state["train_state"], state.get("optimizer"))
        log.info("rank %d resumed from %s at epoch %d", rank, resumed_from, loop.epoch)

    tracker = (
        tracking.Tracker.attach(ws.run_id, ws.spool_dir, uri=ws.tracking_uri, send=False)
        if rank == 0
        else tracking.NullTracker()
    )
    spooled = functools.partial(checkpoints.guard, path=ws.spool_dir)  # rank 0's tracking calls
    if mapping and resumed is None:
        spooled(tracker.set_tags, {runmeta.TAG_INIT_MAPPING: json.dumps(mapping)})
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
    spooled(tracker.set_tags, {runmeta.TAG_WORKERS: json.dumps(everyone)})  # where each rank ran

    loaders: dict[str, data.Batches] = {}  # this epoch's: their skipped-sample counts

    def train_batches(epoch: int):
        torch.manual_seed(
            cfg.run.seed * 1_000_003 + epoch * 1009 + rank
        )  # dropout/colour shift: exact on resume
        loaders["train"] = data.train_loader(
            ws.train_dir,
            cfg.data,
            batch_size=plan.batch_size_per_worker,
            steps=ws.steps_per_epoch * plan.accum_steps,
            rank=rank,
            world_size=world,
            seed=cfg.run.seed,
            epoch=epoch,
            on_sample=SampleHook.of(ws.callbacks, epoch, rank),
            timeout_s=cfg.data.loader_timeout_s,
        )
        return loaders["train"]

    expected_val = data.expected_eval_count(ws.val_dir) if ws.val_dir else 0

    def val_batches():
        loader = data.center_crop_loader(
            ws.val_dir,
            rank=rank,
            world_size=world,
            q=cfg.data.validation_scale,
            crop=cfg.data.crop_size,
            batch_size=cfg.eval.batch_size,
            timeout_s=cfg.data.loader_timeout_s,
        )
        loaders["val"] = loader
        return ((images, labels) for images, labels, _keys in loader)

    last: dict[str, float] = {}
    too_many: list[str] = []  # the run's failure when an epoch skipped more samples than allowed

    def on_epoch_end(metrics: dict[str, float], lp: TrainLoop) -> None:
        val = loaders.pop("val", None)
        counts = [loaders["train"].skipped, val.skipped if val is not None else 0]
        skipped = _all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).cpu()
        metrics[runmeta.TRAIN_SKIPPED], metrics[runmeta.VAL_SKIPPED] = float(skipped[0]), float(skipped[1])
        last.clear()
        last.update(metrics)
        name = checkpoint_store.epoch_dir(lp.epoch)
        if runmeta.VAL_SAMPLES in metrics:  # every val image counted once, or skipped as undecodable
            seen, val_skipped = int(metrics[runmeta.VAL_SAMPLES]), int(metrics[runmeta.VAL_SKIPPED])
            if seen + val_skipped != expected_val:
                data.check_eval_count(seen, expected_val)
        problem = _too_many_skipped(metrics, cfg.data.max_skipped_fraction, lp.epoch)
        if problem is not None:  # the same on every rank (summed counts): all stop here, none retries
            if rank == 0:
                log.error(problem)
                spooled(
                    tracker.log_metrics, {k: v for k, v in metrics.items() if k != runmeta.EPOCH}, lp.epoch
                )
            too_many.append(problem)
            raise Stop()

        def write(directory: str) -> None:
            ckpt.save(
                directory,
                model=model,
                config=cfg,
                optimizer=lp.optimizer,
                train_state=lp.state_dict(),
                stats=stats,
                meta={
                    "epoch": lp.epoch,
                    "metrics": metrics,
                    "mlflow_run_id": ws.run_id,
                    "init_mapping": mapping,
                },
            )

        saved = checkpoints.save(name, metrics, write)  # raises Stop on every rank after a storage failure
        if saved is not None:
            tags = {runmeta.TAG_CHECKPOINT: saved}
            if lp.stall_guard.warning:
                tags[runmeta.TAG_WARNING] = lp.stall_guard.warning
            if lp.schedule.events:
                tags[runmeta.TAG_LR_SCHEDULE] = json.dumps([e.to_dict() for e in lp.schedule.events])
            spooled(tracker.log_metrics, {k: v for k, v in metrics.items() if k != runmeta.EPOCH}, lp.epoch)
            spooled(tracker.set_tags, tags)
            spooled(tracker.sync)  # the epoch's metrics survive a crash of this machine
        if progress is not None:
            progress.epoch_end(lp.epoch, metrics.get(runmeta.VAL_TOP1_ERR))
        event = EpochEnd(
            run_name=Path(ws.storage_root).name,
            epoch=lp.epoch,
            rank=rank,
            world_size=world,
            metrics=dict(metrics),
            checkpoint=saved,
            local_mode=ws.local_mode,
        )
        call_hooks(ws.callbacks, "on_epoch_end", event)

    def log_step(m: dict[str, float], step: int) -> None:
        spooled(tracker.log_metrics, m, step)
        if progress is not None:
            progress.step(step, m[runmeta.STEP_LOSS], m.get(runmeta.STEP_TOP1_ERR), m[runmeta.STEP_IMG_PER_S])

    progress = (
        TrainProgress(
            ws.name, epochs=cfg.schedule.epochs, steps_per_epoch=ws.steps_per_epoch, start_epoch=loop.epoch
        )
        if rank == 0
        else None
    )
    # CPU, memory (and GPU) of the process that trains, every 10 s, into the spool like every other metric
    system = (
        tracking.SystemMetrics(lambda m, step: spooled(tracker.log_metrics, m, step)) if rank == 0 else None
    )
    try:
        if system is not None:
            system.start()
        loop.fit(train_batches, val_batches if ws.val_dir else None, on_epoch_end, log_fn=log_step)
    except Stop:
        pass  # a storage failure: every rank leaves here; rank 0 returns it
    finally:
        if progress is not None:
            progress.close()
        if system is not None:
            system.stop()
    spooled(tracker.close)
    failure = checkpoints.failure
    return {
        "metrics": last,
        "mapping": mapping,
        "warning": loop.stall_guard.warning,
        "error": failure.to_dict() if failure is not None else None,
        "data_error": too_many[0] if too_many else None,
    }


def _too_many_skipped(metrics: dict[str, float], max_fraction: float, epoch: int) -> str | None:
    """The run's one-line failure when an epoch skipped more undecodable samples than `max_fraction` of those it
    drew (train, or val), else None."""
    for split, skipped_key, seen_key in (
        ("training", runmeta.TRAIN_SKIPPED, runmeta.TRAIN_SAMPLES),
        ("validation", runmeta.VAL_SKIPPED, runmeta.VAL_SAMPLES),
    ):
        skipped, seen = metrics.get(skipped_key, 0.0), metrics.get(seen_key, 0.0)
        if skipped > max_fraction * (seen + skipped):
            return (
                f"epoch {epoch} skipped {int(skipped):,} undecodable {split} samples of {int(seen + skipped):,} "
                f"({100 * skipped / (seen + skipped):.2f} % > data.max_skipped_fraction {100 * max_fraction:g} %): "
                f"the shards are damaged; run `vggdist-preprocess verify DIR` and rebuild them, or raise "
                f"data.max_skipped_fraction"
            )
    return None
