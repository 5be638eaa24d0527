"""Where shard tasks run — in this process, or as Ray tasks on a local Ray or a cluster — and how they are retried.

**Retries.** A shard whose input could not be read for a reason a retry can fix (`failures.InputUnavailable`
with a transient errno, or ``MemoryError``) is run again from scratch after a backoff (`failures.RetryPolicy`:
5 tries over ~30 s by default), by the driver, the same way in both modes. Ray's own task retries would not do:
``retry_exceptions`` retries at once (the delay is one cluster-wide setting, ``task_retry_delay_ms``, fixed and
not settable when joining a running cluster), and it would also retry errors no retry fixes. So the Ray tasks
keep ``max_retries=3`` for what it is made for — a worker process or node that dies — and
``retry_exceptions=False``. When a shard still fails, no new shard is started, the running ones finish (their
work is kept), and :class:`failures.ShardsFailed` names every failed input. An :class:`failures.OutputError`
(no space, read-only ``--out``) is never retried: it stops the job at once.

**Connecting** (`ray_pool`) happens before the job writes anything, so a wrong address leaves nothing behind:
`check_address` refuses an HTTP URL (the dashboard / job-server address that ``ray job submit`` takes) and an
address where nothing listens, in seconds, with a one-line :class:`failures.JobError` (exit 2). Without an
address a private local Ray is started for the job (``address="local"``), never a cluster that merely happens
to be recorded on this machine.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from preprocess.failures import InputUnavailable, JobError, JobFailed, RetryPolicy, ShardsFailed

log = logging.getLogger(__name__)

_HTTP = re.compile(r"^https?://", re.IGNORECASE)


def _log_retry(e: InputUnavailable, attempt: int, retry: RetryPolicy) -> None:
    log.warning(
        "shard %s: %s; retrying in %.1f s (attempt %d of %d)",
        e.shard,
        e,
        retry.delay(attempt),
        attempt + 1,
        retry.attempts,
    )


def run_in_process(
    tasks: Sequence, write: Callable, retry: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> Iterator[dict]:
    """Yield ``write(task)`` (a done-marker) for each task in turn, retrying transient input failures."""
    failures: list[tuple[InputUnavailable, int]] = []
    for task in tasks:
        for attempt in itertools.count(1):
            try:
                marker = write(task)
            except InputUnavailable as e:
                if e.retryable and attempt < retry.attempts:
                    _log_retry(e, attempt, retry)
                    sleep(retry.delay(attempt))
                    continue
                failures.append((e, attempt))
                break
            yield marker
            break
        if failures:
            break  # start no new shard: the storage is failing; what is done is kept
    if failures:
        raise ShardsFailed(failures) from failures[-1][0]


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse (:class:`JobError`) an address that is not a Ray cluster's, or where nothing listens."""
    if address in ("auto", "local"):
        return
    if _HTTP.match(address):
        raise JobError(
            f"Ray address {address!r} (--address or RAY_ADDRESS) is an HTTP URL: that is the dashboard / job "
            "server that `ray job submit --address` takes; a driver needs the cluster address HOST:6379, or "
            "submit this command as a job with `ray job submit`"
        )
    host_port = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = host_port.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise JobError(
            f"Ray address {address!r} (--address or RAY_ADDRESS) is not HOST:PORT, e.g. 10.0.0.5:6379"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise JobError(
            f"nothing answers at the Ray address {address!r} (--address or RAY_ADDRESS): "
            f"{e.strerror or e}; start the cluster (`ray start --head`) or fix the address"
        ) from None


@contextlib.contextmanager
def ray_pool(address: str | None, workers: int | None) -> Iterator[int]:
    """Connect to Ray (or start a private local one) and yield how many shard tasks to keep in flight; shut
    down on exit what was started here."""
    import ray

    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
        else:
            check_address(address)
            try:
                ray.init(address=address, log_to_driver=True)
            except (
                ConnectionError,
                ValueError,
                TimeoutError,
                SystemExit,
            ) as e:  # SystemExit: GCS unreachable
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise JobError(
                    f"cannot connect to the Ray cluster at {address!r} (--address or RAY_ADDRESS): {text}"
                ) from None
        started = True
    try:
        yield workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def run_on_ray(
    tasks: Sequence, fn: Callable, args: tuple, workers: int, retry: RetryPolicy
) -> Iterator[dict]:
    """Yield the markers of ``fn(*args[:1], task, *args[1:])`` run as Ray tasks, at most ``workers`` at once,
    in the order they finish; retry transient input failures after a backoff (see the module docstring)."""
    import ray
    from ray.exceptions import RayTaskError

    remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(fn)
    queue = deque(tasks)
    waiting: list[tuple[float, int, object]] = []  # (when to resubmit, tie-break, task): a heap
    in_flight: dict = {}
    attempts: dict[str, int] = {}
    failures: list[tuple[InputUnavailable, int]] = []
    order = itertools.count()
    try:
        while True:
            now = time.monotonic()
            while waiting and waiting[0][0] <= now:
                queue.appendleft(heapq.heappop(waiting)[2])
            while queue and len(in_flight) < workers and not failures:
                task = queue.popleft()
                attempts[task.name] = attempts.get(task.name, 0) + 1
                in_flight[remote.remote(args[0], task, *args[1:])] = task
            if not in_flight:
                if failures or not waiting:
                    break
                time.sleep(max(0.0, waiting[0][0] - time.monotonic()))
                continue
            timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting and not failures else None
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
            for ref in ready:
                task = in_flight.pop(ref)
                try:
                    marker = ray.get(ref)
                except RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, JobFailed) and not isinstance(cause, InputUnavailable):
                        raise cause from err  # a full or missing --out: no retry helps
                    if not isinstance(cause, InputUnavailable):
                        raise
                    n = attempts[task.name]
                    if cause.retryable and n < retry.attempts and not failures:
                        _log_retry(cause, n, retry)
                        heapq.heappush(waiting, (time.monotonic() + retry.delay(n), next(order), task))
                    else:
                        failures.append((cause, n))
                        waiting.clear()
                    continue
                yield marker
    finally:
        for ref in in_flight:  # an error or Ctrl-C: stop what still runs (a rerun redoes those shards)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    if failures:
        raise ShardsFailed(failures) from failures[-1][0]
