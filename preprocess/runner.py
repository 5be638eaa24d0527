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

**Connecting** (`ray_pool`) follows the address rule of every vggdist command (`vggdist.cluster`): the
address is checked before the job writes anything, so a wrong one (an HTTP dashboard URL, nothing listening, a
dead head) leaves nothing behind and is a one-line :class:`failures.JobError` (exit 2); without an address a
private local Ray is started for the job, never a cluster that merely happens to be recorded on this machine.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from preprocess.failures import InputUnavailable, JobError, JobFailed, RetryPolicy, ShardsFailed
from vggdist import cluster

log = logging.getLogger(__name__)


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


def check_address(target: cluster.Target) -> None:
    """Probe a cluster target (`vggdist.cluster.check`); a wrong address is a :class:`JobError`."""
    try:
        cluster.check(target)
    except cluster.AddressError as e:
        raise JobError(str(e)) from None


@contextlib.contextmanager
def ray_pool(target: cluster.Target, workers: int | None) -> Iterator[int]:
    """Ray by the address rule (a private local Ray sized to ``workers``, or the cluster), yielding how many
    shard tasks to keep in flight; a Ray started here is shut down on exit, one already running is kept."""
    import ray

    already = ray.is_initialized()
    try:
        where = cluster.connect(target, num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
    except cluster.AddressError as e:
        raise JobError(str(e)) from None
    try:
        yield workers or max(1, int(where.cpus or ray.cluster_resources().get("CPU", 1)))
    finally:
        if not already:
            cluster.shutdown()


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
