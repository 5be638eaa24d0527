"""The records of a tracking spool: one JSON object per line, built here and counted for messages.

{"kind": "head", "format": 1, "uri": ..., "writer": "host:pid", "time": ...}   first line of every segment
{"kind": "log", "run_id": ..., "metrics": [[key, value, timestamp_ms, step], ...],
 "params": {key: value}, "tags": {key: value}}                                  one logging call
{"kind": "artifact", "run_id": ..., "path": "artifacts/<id>/<name>", "artifact_path": ..., "is_dir": false}
{"kind": "status", "run_id": ..., "status": "FINISHED", "end_time": ms}         RUNNING has no end_time
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def log_record(
    run_id: str,
    metrics: Sequence[tuple[str, float, int, int]] = (),
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Metrics as (key, value, timestamp ms, step), taken when the caller logged them (replay is then exact)."""
    rec: dict[str, Any] = {"kind": "log", "run_id": run_id}
    if metrics:
        rec["metrics"] = [[k, float(v), int(ts), int(step)] for k, v, ts, step in metrics]
    if params:
        rec["params"] = dict(params)
    if tags:
        rec["tags"] = dict(tags)
    return rec


def artifact_record(run_id: str, path: str, artifact_path: str | None, is_dir: bool) -> dict[str, Any]:
    """`path`: the copy inside the spool, relative to it."""
    return {
        "kind": "artifact",
        "run_id": run_id,
        "path": path,
        "artifact_path": artifact_path,
        "is_dir": is_dir,
    }


def status_record(run_id: str, status: str, end_time: int | None) -> dict[str, Any]:
    return {"kind": "status", "run_id": run_id, "status": status, "end_time": end_time}


@dataclass
class Tally:
    """Counts of logging calls, for messages: '12 logging calls (40 metric values, 3 params, status FINISHED)'."""

    calls: int = 0
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    status: str | None = None

    @classmethod
    def of(cls, records: Sequence[Mapping[str, Any]]) -> Tally:
        t = cls()
        for r in records:
            t.add(r)
        return t

    def add(self, r: Mapping[str, Any]) -> None:
        self.calls += 1
        self.metrics += len(r.get("metrics", ()))
        self.params += len(r.get("params", ()))
        self.tags += len(r.get("tags", ()))
        self.artifacts += r.get("kind") == "artifact"
        if r.get("kind") == "status":
            self.status = r["status"]

    def __str__(self) -> str:
        counts = (
            (self.metrics, "metric value"),
            (self.params, "param"),
            (self.tags, "tag"),
            (self.artifacts, "artifact"),
        )
        parts = [f"{n} {name}{'s' if n != 1 else ''}" for n, name in counts if n]
        parts += [f"status {self.status}"] if self.status else []
        calls = f"{self.calls} logging call{'s' if self.calls != 1 else ''}"
        return calls + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class Entry:
    """One line of a segment. `record` is None for lines that only move the acknowledged position (the
    segment head, a torn or unreadable line). `end`: byte offset just past the line; `uri`: the segment's."""

    segment: str
    end: int
    record: dict[str, Any] | None
    uri: str | None
