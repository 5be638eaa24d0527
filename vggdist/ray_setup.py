"""Connecting to Ray: the cluster at RAY_ADDRESS (or `--address`), else a local Ray started in this process; and
the environment every Ray worker of vggdist gets."""

from __future__ import annotations

import os

import ray

# Quiet and contained: one copy of each worker print, no usage reporting, no MLflow telemetry.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address` when given, else start a local Ray in-process (once)."""
    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # no runtime_env here: inside `ray job submit` the job's own runtime env (working dir, env vars) applies;
        # training workers get `worker_env()` through RunConfig(worker_runtime_env=...)
        ray.init(address=address, log_to_driver=True)
    else:
        # the dashboard process serves the state API Ray Train's placement-group cleaner polls; without it every
        # run prints pages of "Failed to query" warnings
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def worker_env() -> dict[str, str]:
    """Environment for training workers: WORKER_ENV plus this process's VGGDIST_* variables."""
    return {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("VGGDIST_")}}


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))
