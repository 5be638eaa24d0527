"""Where a command runs: the one address rule of every entry point, checked before anything is written.

The rule (`vggdist train | evaluate | sweep | demo`, `vggdist-preprocess`, `jobs/*`; `report` needs no Ray):

1. ``--address`` when given;
2. else ``RAY_ADDRESS`` (what ``ray job submit`` sets for its entrypoint: the cluster's GCS address);
3. else a private local Ray that this process starts and stops (``ray.init(address="local")``). It never joins
   a cluster merely because one is recorded on this machine (``ray start --head`` writes
   ``/tmp/ray/ray_current_cluster``; plain ``ray.init()`` would join it, or hang on it once that head is dead).

``--address auto`` keeps Ray's meaning, "the cluster started on this machine" (its record), for a user who wants
a running local cluster on purpose. A cluster address is the GCS address ``HOST:PORT`` (port 6379 by default),
or ``ray://HOST:10001`` for Ray Client. A dashboard / job-server URL (``http://HOST:8265``, what ``ray job submit
--address`` takes) is refused with a line explaining the difference.

`check` probes a cluster address before ``ray.init`` touches it: one gRPC call to the GCS
(``NodeInfoGcsService.GetAllNodeInfo``) with a deadline, so a typo, a dead head or a dashboard port fails in
seconds with :class:`AddressError` (a usage error, exit 2) instead of Ray's minutes of "Failed to connect to
GCS". `connect` applies the rule, prints one line saying where (``Ray: local, 2 CPUs`` or ``Ray: cluster at
10.0.0.5:6379, 8 nodes, 512 CPUs, 64 GPUs``) and starts or joins Ray once per process; `shutdown` stops only a
Ray that `connect` started. Ray is imported inside the functions that need it. The rule (`resolve`) and the
probe (`check`) live in `vggdist.ray_address` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vggdist import console
from vggdist.ray_address import (  # noqa: F401 - the rule and the probe, re-exported: cluster.resolve etc.
    AUTO,
    ENV,
    LOCAL,
    PROBE_TIMEOUT_S,
    AddressError,
    Probe,
    Target,
    check,
    recorded_address,
    resolve,
)

log = logging.getLogger(__name__)

# Quiet and contained: one copy of each worker print, no usage reporting, no MLflow telemetry. Set in this
# process before Ray starts (a local Ray's workers inherit them) and passed to training workers explicitly.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# A private local Ray has no preemptions to watch for, and its Ray Train controller may poll its workers often:
# one actor process less to start, and a run's start and end seen within half a second instead of two.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

# where Ray's state-API and job clients find a cluster's dashboard (before RAY_ADDRESS and a machine-wide scan)
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@dataclass(frozen=True)
class Where:
    """Where this process's Ray is: what the first line of a command and the MLflow tag `vggdist.ray` say."""

    kind: str  # "local" (started here), "cluster" (joined), or "in-process" (no Ray: Ray Train local mode)
    address: str | None = None
    nodes: int = 1
    cpus: float = 0
    gpus: float = 0

    @property
    def local(self) -> bool:
        return self.kind != "cluster"

    def describe(self) -> str:
        """ "local, 2 CPUs", "cluster at 10.0.0.5:6379, 8 nodes, 512 CPUs, 64 GPUs"."""
        res = _count(self.cpus, "CPU") + (f", {_count(self.gpus, 'GPU')}" if self.gpus else "")
        if self.kind == "cluster":
            return f"cluster at {self.address}, {_count(self.nodes, 'node')}, {res}"
        if self.kind == "in-process":
            return f"local, Ray Train local mode (1 worker in this process), {res}"
        return f"local, {res}"

    def __str__(self) -> str:
        return f"Ray: {self.describe()}"


def _count(n: float, noun: str) -> str:
    n = int(n) if float(n).is_integer() else n
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------------------------------ connecting


_started_here = False
_where: Where | None = None


def connect(
    address: str | Target | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool | None = None,
    log_to_driver: bool = True,
    logging_level: int | None = None,
    announce: bool = True,
    **init_kwargs,
) -> Where:
    """Apply the address rule and start or join Ray, once per process; returns (and prints, with `announce`)
    where it runs. Later calls return the same `Where`; in a process Ray already runs in (a Ray task, a test
    that called `ray.init`), it is described as found, nothing is printed.

    `num_cpus`/`num_gpus` size a private local Ray only (a cluster has its own). `include_dashboard`: None is
    Ray's default; Ray Train's placement-group cleaner polls the dashboard's state API, so training keeps it.
    `log_to_driver`, `logging_level` and `init_kwargs` go to `ray.init` as they are; `logging_level` None is
    `vggdist.console`'s (Ray's own INFO lines only with --verbose).
    """
    global _started_here, _where
    target = address if isinstance(address, Target) else resolve(address)
    import ray

    if ray.is_initialized():
        return _where if _where is not None else _describe_running(ray)
    _started_here, _where = False, None  # a Ray of ours that someone else shut down
    probe = check(target)
    if logging_level is None:
        logging_level = console.ray_logging_level()
    console.quiet_libraries()
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    t0 = time.monotonic()
    if target.local:
        # said before Ray starts, so that it is the command's first line
        where = Where(
            "local", cpus=num_cpus or _local_cpus(), gpus=_local_gpus() if num_gpus is None else num_gpus
        )
        if announce:
            say(where)
        for k, v in LOCAL_TRAIN_ENV.items():  # the node's processes inherit them from here
            os.environ.setdefault(k, v)
        kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard)
        node_env = {}
        if include_dashboard is not False:
            kwargs["dashboard_host"] = "127.0.0.1"  # a private Ray: its dashboard stays on this machine
            kwargs["dashboard_port"] = port = _free_port()
            # Ray's state-API clients inside this Ray's processes (Ray Train's placement-group cleaner asks it
            # whether the controller is alive) look for the dashboard by scanning the machine for Ray instances,
            # and die with "Found multiple active Ray instances" (a traceback on the user's screen) when a
            # user's `ray start --head` or another command's Ray runs too: told where ours is, they don't look.
            node_env[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        with _inherited(node_env):
            ray.init(
                address=LOCAL, log_to_driver=log_to_driver, logging_level=logging_level, **kwargs, **init_kwargs
            )
        _started_here = True
    else:
        if announce and probe.nodes is not None:
            say(Where("cluster", probe.address, nodes=probe.nodes, cpus=probe.cpus, gpus=probe.gpus))
        # no runtime_env here: inside `ray job submit` the job's own runtime env (working dir, env vars) applies
        try:
            ray.init(
                address=probe.address, log_to_driver=log_to_driver, logging_level=logging_level, **init_kwargs
            )
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, SystemExit) as e:
            # SystemExit: Ray's own "GCS unreachable" exit; RuntimeError: e.g. a Ray version mismatch
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AddressError(f"cannot connect to the Ray cluster at {target.named}: {text}") from None
        where = _describe_running(ray, probe.address)
        if announce and probe.nodes is None:
            say(where)
    log.debug("Ray ready in %.1f s", time.monotonic() - t0)
    _where = where
    return where


@contextlib.contextmanager
def _inherited(env: Mapping[str, str]) -> Iterator[None]:
    """`env` in this process's environment while Ray starts its node (whose processes inherit it), and only then:
    RAY_API_SERVER_ADDRESS overrides even an explicit address in Ray's job and state clients of this process."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(where: Where) -> None:
    """The line that tells the user where a command runs (stderr, so stdout stays machine-readable)."""
    print(str(where), file=sys.stderr, flush=True)


def in_process(cpus: int | None = None) -> Where:
    """Where a run that starts no Ray at all (Ray Train local mode, one worker) runs."""
    return Where("in-process", cpus=cpus or _local_cpus())


def _describe_running(ray, address: str | None = None) -> Where:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    if _started_here:
        return Where("local", cpus=res.get("CPU", 0), gpus=res.get("GPU", 0))
    if address is None:
        with contextlib.suppress(Exception):
            address = ray.get_runtime_context().gcs_address
    return Where("cluster", address, nodes=len(nodes), cpus=res.get("CPU", 0), gpus=res.get("GPU", 0))


def _local_cpus() -> int:
    """The CPUs a local Ray would detect (cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:  # a Ray without the helper: the plain count
        return os.cpu_count() or 1


def _local_gpus() -> int:
    """The GPUs a local Ray would detect (CUDA_VISIBLE_DEVICES respected); 0 when none or unknown."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        visible = manager.get_current_process_visible_accelerator_ids()
        return len(visible) if visible is not None else int(manager.get_current_node_num_accelerators())
    except Exception:
        return 0


def started_here() -> bool:
    return _started_here


def shutdown() -> None:
    """Stop the private local Ray `connect` started (a joined cluster is only disconnected from)."""
    global _started_here, _where
    import ray

    if ray.is_initialized() and _where is not None:
        ray.shutdown()
    _started_here = False
    _where = None


# What training workers on a cluster get from this process's environment besides WORKER_ENV: the credentials and
# endpoint of the object store that holds the run's checkpoints and spool (`--storage-path s3://…`), which rank 0
# writes with pyarrow. Nothing else is forwarded: the tracking URI, the data and storage paths and the callbacks
# travel in `WorkerSettings`; a job started with `ray job submit --runtime-env-json` gives its env_vars to its
# workers itself.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    console.VERBOSE_ENV,  # --verbose: the workers show Ray Train's internal logs too
)


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for training workers on a cluster: WORKER_ENV plus the FORWARDED_ENV variables that are set."""
    env = os.environ if environ is None else environ
    return {**WORKER_ENV, **{k: env[k] for k in FORWARDED_ENV if k in env}}
