"""Replays a spool to a tracking server, in order, recording how far the server has acknowledged.

`Sender` works through a `Sink` (the MLflow calls live in `vggdist.tracking.sink`), so this module imports no
MLflow. It merges consecutive logging records of a run into batched calls within MLflow's `log_batch` limits,
acknowledges each call in `acked.json` once the server accepted it, and stops at the first failure:

- `Unreachable` (or any unexpected error): the server is down or slow; nothing is acknowledged, the same calls
  are retried later (backoff up to `max_backoff_s`). One warning per outage, one when the server is back.
- `Rejected`: the server refuses this payload for good (an invalid metric name, a changed param, a deleted
  run). Merged calls are retried one record at a time; the refused record is dropped with an error naming it.
- `Blocked`: this spool cannot go to this server at all (its run does not exist there, no permission). The
  records stay spooled and delivery stops with an error; `vggdist sync --tracking-uri` can send them elsewhere.

A crash between a call and its acknowledgement sends that call again on replay. That is harmless: the metric
record carries the time it was logged, and MLflow stores an identical (key, value, timestamp, step) row once;
params and tags are re-set to the same values, an artifact overwrites itself, the status is set again.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vggdist.tracking.records import Entry, Tally
from vggdist.tracking.spool import Lease, Spool

log = logging.getLogger(__name__)

# MLflow's log_batch limits (mlflow.utils.validation): per call at most 1000 metrics, 100 params, 100 tags,
# 1000 entities in all and a 1 MB request body.
MAX_METRICS = 1000
MAX_PARAMS = 100
MAX_TAGS = 100
MAX_ENTITIES = 1000
MAX_BYTES = 500_000  # our own margin under the 1 MB body (keys, values and JSON overhead)


class Unreachable(Exception):
    """The server cannot be reached now: retry later."""


class Rejected(Exception):
    """The server refuses this payload; sending it again cannot succeed."""


class Blocked(Exception):
    """This spool cannot be delivered to this server (missing run, no permission): keep it, stop trying."""


class Sink(Protocol):
    def log_batch(
        self,
        run_id: str,
        metrics: list[tuple[str, float, int, int]],
        params: dict[str, str],
        tags: dict[str, str],
    ) -> None: ...

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None, is_dir: bool) -> None: ...

    def set_status(self, run_id: str, status: str, end_time: int | None) -> None: ...


@dataclass
class Report:
    """What the passes of a sender did so far."""

    delivered: Tally = field(default_factory=Tally)  # calls the server accepted
    rejected: int = 0  # records refused for good (dropped, each with an error)
    error: str | None = None  # why the last pass stopped early (unreachable / blocked), else None
    blocked: bool = False
    busy: bool = False  # another live process holds the spool's lease (and delivers it)
    uri: str | None = None  # the server of the last call tried


@dataclass
class _Batch:
    """Consecutive logging records of one run merged into one `log_batch` call."""

    run_id: str
    uri: str | None
    entries: list[Entry] = field(default_factory=list)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    size: int = 0

    def fits(self, rec: dict[str, Any]) -> bool:
        m, p, t = len(rec.get("metrics", ())), rec.get("params", {}), rec.get("tags", {})
        if any(k in self.params and self.params[k] != v for k, v in p.items()):
            return False  # a changed param: let the server judge it on its own
        n_p, n_t = len(self.params.keys() | p.keys()), len(self.tags.keys() | t.keys())
        return (
            len(self.metrics) + m <= MAX_METRICS
            and n_p <= MAX_PARAMS
            and n_t <= MAX_TAGS
            and len(self.metrics) + m + n_p + n_t <= MAX_ENTITIES
            and self.size + _size(rec) <= MAX_BYTES
        )

    def add(self, e: Entry) -> None:
        rec = e.record or {}
        self.entries.append(e)
        self.metrics += [tuple(m) for m in rec.get("metrics", ())]
        self.params.update(rec.get("params", {}))
        self.tags.update(rec.get("tags", {}))  # a tag set twice: the later value, as if sent in order
        self.size += _size(rec)


def _size(rec: dict[str, Any]) -> int:
    n = sum(len(m[0]) + 40 for m in rec.get("metrics", ()))
    pairs = [*rec.get("params", {}).items(), *rec.get("tags", {}).items()]
    return n + sum(len(k) + len(str(v)) + 20 for k, v in pairs)


def _split(rec: dict[str, Any], uri: str | None) -> list[_Batch]:
    """One record too large for one call, as several calls within the limits."""
    parts = []
    for key, limit in (("metrics", MAX_METRICS), ("params", MAX_PARAMS), ("tags", MAX_TAGS)):
        items = rec.get(key, [])
        items = list(items.items()) if isinstance(items, dict) else list(items)
        for i in range(0, len(items), limit):
            part = _Batch(rec["run_id"], uri)
            if key == "metrics":
                part.metrics = [tuple(m) for m in items[i : i + limit]]
            else:
                setattr(part, key, dict(items[i : i + limit]))
            parts.append(part)
    return parts


class Sender:
    """Delivers one spool through sinks (one per tracking URI), holding the spool's lease while it does.

    `deliver()` replays synchronously (`vggdist sync`); `start()` runs a background thread that tails the
    spool while a run writes to it (`drain()` waits for it, `stop()` ends it). `sink_for(uri)` gives the sink
    for the tracking URI recorded in a segment (or another one: `vggdist sync --tracking-uri`).
    """

    def __init__(
        self,
        spool: Spool,
        sink_for: Callable[[str | None], Sink],
        *,
        poll_s: float = 1.0,
        max_backoff_s: float = 10.0,
        lease_ttl_s: float = 60.0,
    ) -> None:
        self.spool = spool
        self.sink_for = sink_for
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.lease = Lease(spool, ttl_s=lease_ttl_s)
        self.report = Report()
        self._acks: dict[str, int] | None = None
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._passes = 0  # passes completed
        self._clean_pass = -1  # number of the last pass that left nothing to send
        self._outage_since: float | None = None
        self._final = False

    # -- synchronous ------------------------------------------------------------------------------------

    def deliver(self, *, final: bool = True) -> Report:
        """Replay everything pending now, with the lease; returns what was delivered and why it stopped."""
        if not self.lease.try_acquire():
            self.report.error = f"in use by {self.lease.describe_holder()}, which delivers it"
            self.report.busy = True
            return self.report
        try:
            while self._pass(final=final) and not self.report.error:
                pass
            return self.report
        finally:
            self.lease.release()

    # -- background -------------------------------------------------------------------------------------

    def start(self) -> Sender:
        self._thread = threading.Thread(
            target=self._loop, name=f"mlflow-sender {self.spool.path}", daemon=True
        )
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def drain(self, timeout_s: float, *, final: bool = False) -> bool:
        """Wait until a pass that began after this call left nothing to send, or `timeout_s` passed."""
        with self._cond:
            self._final = self._final or final
            target = self._passes + 2  # the pass running now (if any) may have begun before this call
        deadline = time.monotonic() + max(0.0, timeout_s)
        self.wake()
        with self._cond:
            while self._clean_pass < target and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0 or self.report.blocked:
                    break
                self._cond.wait(min(left, 1.0))
                self.wake()
            return self._clean_pass >= target

    def stop(self, timeout_s: float = 0.0) -> bool:
        """Drain for up to `timeout_s`, then end the thread and give the lease up. True if all was delivered.

        A call still waiting on a server that does not answer is not waited for: the thread ends (and releases the
        lease) when that call returns or fails; it is a daemon, so it does not keep the process alive."""
        ok = self.drain(timeout_s, final=True)
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return ok

    def _loop(self) -> None:
        backoff = 0.0
        try:
            while not self._stopping:
                had_lease = self.lease.held
                if self.report.blocked or not self.lease.try_acquire():
                    self._sleep(self.poll_s)
                    continue
                if not had_lease:
                    self._acks = None  # another process may have delivered part of the spool meanwhile
                left = self._pass(final=self._final)
                if left and self.report.error:
                    backoff = min(self.max_backoff_s, max(1.0, backoff * 2))
                    self._sleep(backoff)
                elif not left:
                    backoff = 0.0
                    self._sleep(self.poll_s)
        except Exception:  # a bug here must not take training down; the spool keeps everything
            log.exception("MLflow sender for %s stopped; `vggdist sync` delivers the spool", self.spool.path)
        finally:
            self.lease.release()
            with self._cond:
                self._cond.notify_all()

    def _sleep(self, s: float) -> None:
        self._wake.wait(s)
        self._wake.clear()

    # -- one pass ---------------------------------------------------------------------------------------

    def _pass(self, *, final: bool) -> int:
        """Send what is pending, in order, until done or the first failure; returns how many records are left."""
        with self._cond:
            number = self._passes + 1
        if self._acks is None:
            self._acks = self.spool.acks()
        entries = self.spool.read_pending(self._acks, final=final)
        self.report.error = None
        i = 0
        try:
            while i < len(entries) and not self._stopping:
                i = self._send_from(entries, i)
                self.lease.renew()
            if self._outage_since is not None:
                log.warning(
                    "MLflow at %s reachable again after %.0f s; delivering the spool %s",
                    self.report.uri,
                    time.monotonic() - self._outage_since,
                    self.spool.path,
                )
                self._outage_since = None
        except Blocked as e:
            self.report.error, self.report.blocked = _one_line(e), True
            log.error("MLflow delivery of %s stopped: %s; the records stay spooled", self.spool.path, e)
        except Exception as e:  # Unreachable, or anything unexpected: keep everything, retry later
            self.report.error = _one_line(e)
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning(
                    "MLflow at %s unreachable (%s); logging calls stay spooled in %s and are retried",
                    self.report.uri,
                    self.report.error,
                    self.spool.path,
                )
        left = sum(1 for e in entries[i:] if e.record)
        with self._cond:
            self._passes = number
            if left == 0 and not self.report.error:
                self._clean_pass = number
            self._cond.notify_all()
        return left

    def _send_from(self, entries: list[Entry], i: int) -> int:
        """Send the call that starts at entries[i], merged with the logging records after it where possible;
        returns the index after the last entry sent."""
        e = entries[i]
        rec = e.record
        if rec is None:
            self._ack([e])
            return i + 1
        sink = self.sink_for(e.uri)
        self.report.uri = getattr(sink, "uri", e.uri)
        kind = rec.get("kind")
        if kind == "log":
            batch = _Batch(rec["run_id"], e.uri)
            j = i
            while j < len(entries):
                r = entries[j].record
                if r is not None and (
                    r.get("kind") != "log" or r["run_id"] != batch.run_id or entries[j].uri != batch.uri
                ):
                    break
                if r is not None and not batch.fits(r):
                    break
                batch.add(entries[j])
                j += 1
            if j == i:  # this one record exceeds one call
                batch.add(e)
                j = i + 1
            try:
                self._log_batches(sink, [batch] if batch.fits({}) else _split(rec, e.uri))
            except Rejected:  # find the refused record(s): send one at a time
                for x in batch.entries:
                    if x.record is not None:
                        try:
                            self._log_batches(sink, _split(x.record, x.uri))
                            self.report.delivered.add(x.record)
                        except Rejected as err:
                            self._reject(x, err)
                    self._ack([x])
                return j
            for x in batch.entries:
                if x.record is not None:
                    self.report.delivered.add(x.record)
            self._ack(batch.entries)
            return j
        try:
            if kind == "artifact":
                self._send_artifact(sink, rec)
            elif kind == "status":
                sink.set_status(rec["run_id"], rec["status"], rec.get("end_time"))
            else:
                raise Rejected(f"unknown record kind {kind!r} (written by a newer vggdist?)")
            self.report.delivered.add(rec)
        except Rejected as err:
            self._reject(e, err)
        self._ack([e])
        return i + 1

    @staticmethod
    def _log_batches(sink: Sink, batches: list[_Batch]) -> None:
        for b in batches:
            if b.metrics or b.params or b.tags:
                sink.log_batch(b.run_id, b.metrics, b.params, b.tags)

    def _send_artifact(self, sink: Sink, rec: dict[str, Any]) -> None:
        path = self.spool.join(*rec["path"].split("/"))
        if not self.spool.files.exists(path):
            raise Rejected(f"its copy {path} is gone")
        with tempfile.TemporaryDirectory(prefix="vggdist-artifact-") as tmp:
            local = self.spool.files.local_copy(path, tmp)
            sink.log_artifact(rec["run_id"], local, rec.get("artifact_path"), bool(rec.get("is_dir")))

    def _reject(self, e: Entry, err: Exception) -> None:
        self.report.rejected += 1
        log.error(
            "MLflow rejected %s of run %s (dropped): %s",
            Tally.of([e.record]),
            e.record.get("run_id"),
            _one_line(err),
        )

    def _ack(self, entries: list[Entry]) -> None:
        for x in entries:
            self._acks[x.segment] = max(self._acks.get(x.segment, 0), x.end)
        self.spool.save_acks(self._acks)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]
