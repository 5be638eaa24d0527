"""How a training run's workers run: Ray Train workers, or Ray Train's local mode in this process.

- **Ray Train workers** (`TorchTrainer` with `ScalingConfig(num_workers=N)`): a controller actor starts N worker
  processes, DDP between them; `FailureConfig(max_failures)` restarts the worker group after a worker error or
  a dead worker process, and it resumes from the latest checkpoint. Ray Train manages the checkpoints it is
  given (`CheckpointConfig`: the best `keep_checkpoints` by score plus the latest).
- **Local mode** (`ScalingConfig(num_workers=0)`, Ray 2.60's single-process mode): the worker function runs in
  this process, with no Ray processes at all; a one-epoch run then starts in seconds instead of paying for a Ray
  node, a controller and a worker group. What Ray's local mode does not do, this module does the same way:
  checkpoints go to the same `<storage>/<run>/epoch_NNN` and are pruned the same way
  (`vggdist.ray_checkpoints`), a rerun resumes from the newest whole one, and a Python error in training
  restarts the worker function from the latest checkpoint up to `max_failures` times. The one difference: a
  crash of the process itself (killed, out of memory) ends the command, which a rerun with the same run name
  then resumes; `run.local_mode=false` keeps Ray's process-level restarts for one worker.

`use_local_mode` decides: `run.local_mode` when set, else one worker on a local Ray (no cluster address).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vggdist import checkpoint_store as store
from vggdist import cluster, console, runmeta, tracking
from vggdist.cluster import Where, started_here, worker_env
from vggdist.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fitted:
    return_value: dict[str, Any]  # rank 0's
    checkpoint: str | None  # the latest checkpoint (storage path)
    best_checkpoint: str | None


def where_to_train(cfg: Config, address: str | None, where: Where | None) -> tuple[Where, bool]:
    """Where the run trains, and whether in this process (`ray_fit.use_local_mode`); says it in one line when
    this call decides it. A Ray that is already up is used as it is (a sweep's stage, a notebook)."""
    if where is not None:
        return where, use_local_mode(cfg, where)
    target = cluster.resolve(address)
    local = cfg.run.local_mode if cfg.run.local_mode is not None else cfg.run.workers == 1 and target.local
    import ray

    if local and not ray.is_initialized():
        where = cluster.in_process(cfg.run.cpus_per_worker)
        cluster.say(where)
        return where, True
    where = cluster.connect(target)
    return where, use_local_mode(cfg, where)


def stopped(
    tracker: tracking.Tracker,
    uri: str,
    run_name: str,
    run_dir: str,
    failure: store.CheckpointWriteError,
) -> store.CheckpointWriteError:
    """The run stopped on a storage failure: say how to resume, and end its MLflow run FAILED with the reason
    (directly, if the storage cannot even take that in the spool)."""
    latest = store.latest(run_dir)
    failure = dataclasses.replace(
        failure,
        resume=f"rerun the same command with --run-name {run_name} to resume"
        + (f" from epoch {latest.epoch}" if latest else ""),
    )
    reason = {runmeta.TAG_FAILURE: str(failure)}
    try:
        tracker.set_tags(reason)
        tracker.end("FAILED")
    except OSError:
        tracking.end_run_now(tracker.run_id, "FAILED", tags=reason, uri=uri)
        try:
            tracker.close(wait_s=0)
        except OSError:
            pass
    return failure


def use_local_mode(cfg: Config, where: Where) -> bool:
    """Whether this run trains in this process (see the module docstring)."""
    if cfg.run.local_mode is not None:
        return cfg.run.local_mode
    return cfg.run.workers == 1 and where.local


def fit(
    worker_loop: Callable[[dict[str, Any]], dict[str, Any]],
    loop_config: dict[str, Any],
    cfg: Config,
    *,
    run_name: str,
    storage: str,
    local_mode: bool,
) -> Fitted:
    """Run `worker_loop(loop_config)` on the run's workers; returns rank 0's return value and checkpoints."""
    if local_mode:
        return _fit_local(worker_loop, loop_config, cfg, run_name=run_name, storage=storage)
    return _fit_ray(worker_loop, loop_config, cfg, run_name=run_name, storage=storage)


def _fit_ray(worker_loop, loop_config, cfg: Config, *, run_name: str, storage: str) -> Fitted:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
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
            logging_config=console.train_logging_config(),
            # a Ray started here passed this process's environment to its workers already; a runtime env
            # would only keep them from reusing the worker processes Ray started with the node
            worker_runtime_env=None if started_here() else {"env_vars": worker_env()},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}")
    best = result.get_best_checkpoint(metric="score", mode="max") if result.best_checkpoints else None
    return Fitted(
        result.return_value or {},
        result.checkpoint.path if result.checkpoint else None,
        best.path if best else None,
    )


def _fit_local(worker_loop, loop_config, cfg: Config, *, run_name: str, storage: str) -> Fitted:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    console.quiet_libraries()  # Ray Train says "Running in local mode" when the trainer is built
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.run.cpus_per_worker)  # what a Ray Train worker gets (Ray sets OMP_NUM_THREADS)
    try:
        for attempt in range(cfg.run.max_failures + 1):
            trainer = TorchTrainer(
                worker_loop,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=0, use_gpu=cfg.run.gpu),
                run_config=RunConfig(name=run_name, logging_config=console.train_logging_config()),
            )
            try:
                result = trainer.fit()
                break
            except Exception as e:
                if attempt == cfg.run.max_failures or store.non_retryable_errno(e) is not None:
                    raise
                log.warning(
                    "training failed (%s: %s); restarting from the latest checkpoint (%d of %d restarts)",
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    attempt + 1,
                    cfg.run.max_failures,
                )
    finally:
        torch.set_num_threads(threads)
    run_dir = f"{storage}/{run_name}"
    found = store.whole_checkpoints(run_dir)
    best = max(found, key=lambda f: (store.score(f.meta.get("metrics", {})), -f.epoch)) if found else None
    return Fitted(
        result.return_value or {},
        found[-1].path if found else None,
        best.path if best else None,
    )
