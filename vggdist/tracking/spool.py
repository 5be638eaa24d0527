"""The durable tracking spool: every MLflow logging call of a run, in order, in the run's storage directory.

Layout of `<storage>/<run name>/mlflow_spool/`:

    seg-00000001-3f2a9c1e.jsonl   numbered append-only segments of JSON records, one per line
    seg-00000002-b71d04aa.jsonl   (number, then the id of the writer; records: `vggdist.tracking.records`)
    artifacts/<id>/<file>         copies of logged artifacts, made when they were logged
    acked.json                    {segment: bytes MLflow has acknowledged}; written by the sender only
    lease.json                    which process delivers this spool now (heartbeat; see `Lease`)

Order. A writer takes the next free segment number when it starts a segment, and starts a new one whenever it
finds a higher-numbered segment than its own (another process wrote in between: the driver before and after
the Ray Train workers, a restarted worker group, a later `vggdist evaluate`). Since these processes write one
after another, (segment number, line) is the order in which the calls were made, and the sender replays in
that order. Each segment starts with a `head` record naming the MLflow tracking URI its calls belong to.

Durability. On a filesystem each record is one `write` (a crashed process loses nothing the kernel holds) and
`sync()` fsyncs it (the run's epoch boundaries and the end: a crashed machine loses at most the records since).
On an object store (`s3://…`) records are buffered and `sync()` writes them as one new immutable segment.
A record torn by a crash mid-write is skipped once a later segment exists (its writer is gone).

This module knows nothing of MLflow; `vggdist.tracking.sender` replays a spool through a sink.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from vggdist.tracking.fileops import files_for, fsync_dir, join_path
from vggdist.tracking.records import Entry

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow_spool"
FORMAT = 1
ACKS_FILE = "acked.json"
LEASE_FILE = "lease.json"
ARTIFACTS_DIR = "artifacts"
_SEGMENT = re.compile(r"seg-(\d{8})-([0-9a-f]{8})\.jsonl")


def spool_dir(run_dir: str | os.PathLike) -> str:
    """The spool directory of a run's storage directory (`<storage>/<run name>`)."""
    return join_path(run_dir, SPOOL_DIR)


def existing_spool(run_dir: str | os.PathLike) -> str | None:
    """The spool directory of a run directory if it has one (a run trained by vggdist), else None."""
    path = spool_dir(run_dir)
    files, root = files_for(path)
    return path if files.exists(root) else None


# ------------------------------------------------------------------------------------------------ spool


class Spool:
    """One spool directory: its segments, acknowledged positions, artifact copies and lease."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)  # as the user wrote it (shown in messages)
        self.files, self.root = files_for(self.path)
        self._heads: dict[str, str | None] = {}

    def __repr__(self) -> str:
        return f"Spool({self.path!r})"

    def join(self, *parts: str) -> str:
        return self.files.join(self.root, *parts)

    def create(self) -> None:
        self.files.makedirs(self.join(ARTIFACTS_DIR))

    def segments(self) -> list[tuple[str, int]]:
        """[(name, size)] in replay order."""
        listing = self.files.listdir(self.root)
        return sorted((name, size or 0) for name, size in listing.items() if _SEGMENT.fullmatch(name))

    def acks(self) -> dict[str, int]:
        raw = self.files.read(self.join(ACKS_FILE))
        if not raw:
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError):
            log.warning("%s: unreadable %s; replaying the spool from its start", self.path, ACKS_FILE)
            return {}

    def save_acks(self, acks: Mapping[str, int]) -> None:
        self.files.write_atomic(self.join(ACKS_FILE), json.dumps(dict(acks), sort_keys=True).encode())

    def has_pending(self) -> bool:
        """Whether any segment holds bytes not yet acknowledged (a listing and one small read)."""
        segs = self.segments()
        if not segs:
            return False
        acks = self.acks()
        return any(size > acks.get(name, 0) for name, size in segs)

    def read_pending(self, acks: Mapping[str, int], *, final: bool, max_bytes: int = 8 << 20) -> list[Entry]:
        """The lines past the acknowledged positions, in replay order (about `max_bytes` at most).

        A last line without its newline is still being written, unless a later segment exists or `final`
        (nobody writes any more): then it was torn by a crash and is skipped with a warning.
        """
        segs = self.segments()
        out: list[Entry] = []
        for i, (name, size) in enumerate(segs):
            done = acks.get(name, 0)
            if size <= done:
                continue
            data = self.files.read(self.join(name), done)
            if not data:
                continue
            uri = self._head_uri(name) if done else None
            pos = done
            *lines, tail = data.split(b"\n")
            for line in lines:
                pos += len(line) + 1
                rec = self._parse(name, line)
                if rec is not None and rec.get("kind") == "head":
                    uri = self._heads[name] = rec.get("uri")
                    rec = None
                out.append(Entry(name, pos, rec, uri))
            if tail and (final or i < len(segs) - 1):
                log.warning("%s: skipped a record torn by a crash at the end of %s", self.path, name)
                out.append(Entry(name, pos + len(tail), None, uri))
            max_bytes -= len(data)
            if max_bytes <= 0:
                break
        return out

    def _parse(self, segment: str, line: bytes) -> dict[str, Any] | None:
        try:
            rec = json.loads(line)
            if isinstance(rec, dict):
                return rec
        except ValueError:
            pass
        log.warning("%s: skipped an unreadable line in %s: %r", self.path, segment, line[:200])
        return None

    def _head_uri(self, segment: str) -> str | None:
        if segment not in self._heads:
            first = (self.files.read(self.join(segment), 0, 64 << 10) or b"").split(b"\n", 1)[0]
            rec = self._parse(segment, first) if first else None
            self._heads[segment] = rec.get("uri") if rec and rec.get("kind") == "head" else None
        return self._heads[segment]

    def pending_records(self, *, final: bool = True) -> list[dict[str, Any]]:
        """Every record not yet acknowledged (reads them all: for messages and `vggdist sync`, not hot paths)."""
        acks = self.acks()
        return [e.record for e in self.read_pending(acks, final=final, max_bytes=1 << 62) if e.record]


# ----------------------------------------------------------------------------------------------- writer


class SpoolWriter:
    """Appends records to a spool. Thread-safe; cheap (no network, a `write` per record locally).

    `fsync_interval_s`: on a filesystem, an append also fsyncs when this long has passed since the last fsync.
    `commit_interval_s`: on an object store, an append also writes the buffered records out when the oldest
    has waited this long (else they go out at `sync()`).
    """

    def __init__(
        self, spool: Spool, uri: str, *, fsync_interval_s: float = 5.0, commit_interval_s: float = 60.0
    ) -> None:
        self.spool = spool
        self.uri = uri
        self.writer_id = uuid.uuid4().hex[:8]
        self.fsync_interval_s = fsync_interval_s
        self.commit_interval_s = commit_interval_s
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._segment: str | None = None
        self._last_fsync = time.monotonic()
        self._buffer: list[bytes] = []
        self._buffered_since = 0.0
        self._closed = False
        spool.create()

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"spool writer for {self.spool.path} is closed")
            if self.spool.files.appendable:
                self._ensure_segment()
                _write_all(self._fd, line)
                if time.monotonic() - self._last_fsync > self.fsync_interval_s:
                    self._fsync()
            else:
                if not self._buffer:
                    self._buffered_since = time.monotonic()
                self._buffer.append(line)
                if time.monotonic() - self._buffered_since > self.commit_interval_s:
                    self._commit()

    def add_artifact(self, local_path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a local file or directory into the spool (durably); returns its path relative to the spool."""
        local_path = os.fspath(local_path)
        rel = "/".join(
            (ARTIFACTS_DIR, uuid.uuid4().hex[:16], name or os.path.basename(local_path.rstrip("/")))
        )
        self.spool.files.copy_in(local_path, self.spool.join(*rel.split("/")))
        return rel

    def sync(self) -> None:
        """Durability point: fsync the current segment, or write the buffered records as a new segment."""
        with self._lock:
            if self.spool.files.appendable:
                if self._fd is not None:
                    self._fsync()
            else:
                self._commit()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self.spool.files.appendable:
                if self._fd is not None:
                    self._fsync()
                    os.close(self._fd)
                    self._fd = None
            else:
                self._commit()
            self._closed = True

    # -- internals (caller holds the lock) ---------------------------------------------------------------

    def _head(self) -> bytes:
        head = {
            "kind": "head",
            "format": FORMAT,
            "uri": self.uri,
            "writer": _owner_name(),
            "time": time.time(),
        }
        return (json.dumps(head, separators=(",", ":")) + "\n").encode()

    def _next_name(self) -> str:
        segs = self.spool.segments()
        n = int(_SEGMENT.fullmatch(segs[-1][0]).group(1)) + 1 if segs else 1
        return f"seg-{n:08d}-{self.writer_id}.jsonl"

    def _ensure_segment(self) -> None:
        """Keep appending to our segment unless another writer started a later one (then start a new one)."""
        segs = self.spool.segments()
        if self._fd is not None and segs and segs[-1][0] <= self._segment:
            return
        if self._fd is not None:
            self._fsync()
            os.close(self._fd)
        self._segment = self._next_name()
        path = self.spool.join(self._segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _write_all(self._fd, self._head())
        self._fsync()
        fsync_dir(self.spool.root)

    def _fsync(self) -> None:
        os.fsync(self._fd)
        self._last_fsync = time.monotonic()

    def _commit(self) -> None:
        if not self._buffer:
            return
        data = self._head() + b"".join(self._buffer)
        self.spool.files.write_atomic(self.spool.join(self._next_name()), data)
        self._buffer.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ------------------------------------------------------------------------------------------------ lease


def _owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """Which process delivers a spool now: one sender at a time keeps the replay in order.

    The holder rewrites `lease.json` (host, pid, time) at least every `ttl_s / 6`. Another process takes the
    lease when it is absent, older than `ttl_s`, or held by a dead process on this host. Best effort on object
    stores (no atomic create there): the check after writing catches all but a race within milliseconds.
    """

    def __init__(self, spool: Spool, ttl_s: float = 60.0) -> None:
        self.spool = spool
        self.ttl_s = ttl_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:8]}
        self.held = False
        self._written = 0.0

    def holder(self) -> dict[str, Any] | None:
        raw = self.spool.files.read(self.spool.join(LEASE_FILE))
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _live(self, h: Mapping[str, Any]) -> bool:
        if time.time() - float(h.get("time", 0)) > self.ttl_s:
            return False
        if h.get("host") == self.me["host"] and h.get("pid") != self.me["pid"]:
            try:
                os.kill(int(h["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, KeyError):
                pass
        return True

    def try_acquire(self) -> bool:
        if self.held:
            self.renew()
            return True
        h = self.holder()
        if h and h.get("id") != self.me["id"] and self._live(h):
            return False
        self._write()
        h = self.holder()
        self.held = bool(h) and h.get("id") == self.me["id"]
        return self.held

    def renew(self, force: bool = False) -> None:
        if self.held and (force or time.monotonic() - self._written > self.ttl_s / 6):
            self._write()

    def release(self) -> None:
        if self.held:
            h = self.holder()
            if h and h.get("id") == self.me["id"]:
                self.spool.files.remove(self.spool.join(LEASE_FILE))
            self.held = False

    def describe_holder(self) -> str:
        h = self.holder() or {}
        return f"pid {h.get('pid')} on {h.get('host')}"

    def _write(self) -> None:
        self.spool.files.makedirs(self.spool.root)
        self.spool.files.write_atomic(
            self.spool.join(LEASE_FILE), json.dumps({**self.me, "time": time.time()}).encode()
        )
        self._written = time.monotonic()
