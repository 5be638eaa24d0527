"""The MLflow sink a spool is replayed into, and ending a run directly when its spool cannot be written.

`MlflowSink` makes the replay's three calls (a batch of metrics / params / tags, an artifact, a status) under the
no-retry HTTP policy of `client`, and sorts their errors into the sender's `Unreachable` (retry later),
`Rejected` (drop the payload) and `Blocked` (keep the spool, stop delivering).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from vggdist.tracking.client import (
    BLOCKED_ERRORS,
    LOG_HTTP_POLICY,
    REJECTED_ERRORS,
    client,
    http_policy,
    one_line,
    tracking_uri,
)
from vggdist.tracking.runs import check_status
from vggdist.tracking.sender import Blocked, Rejected, Unreachable

_sinks_lock = threading.Lock()
_sinks: dict[str, MlflowSink] = {}


def end_run_now(
    run_id: str, status: str, *, tags: Mapping[str, str] | None = None, uri: str | None = None
) -> None:
    """Set `tags` and end the run `status` in MLflow directly, bypassing the spool: for a run whose storage (where
    its spool lives) cannot take another line, e.g. because it is full."""
    s = sink(uri or tracking_uri())
    if tags:
        s.log_batch(run_id, [], {}, {k: str(v) for k, v in tags.items()})
    s.set_status(run_id, check_status(status), int(time.time() * 1000))


def sink(uri: str) -> MlflowSink:
    """The process's sink for `uri` (shared, so every sender of the process knows when an outage began)."""
    with _sinks_lock:
        if uri not in _sinks:
            _sinks[uri] = MlflowSink(uri)
        return _sinks[uri]


class MlflowSink:
    """Where a spool is replayed: one MlflowClient, errors sorted into Unreachable / Rejected / Blocked.

    `outage_since`: monotonic time of the first failed call of the current outage (None while calls succeed).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client = client(uri)
        self.outage_since: float | None = None

    def log_batch(
        self,
        run_id: str,
        metrics: list[tuple[str, float, int, int]],
        params: dict[str, str],
        tags: dict[str, str],
    ) -> None:
        with self._calling():
            self._client.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None, is_dir: bool) -> None:
        with self._calling():
            if is_dir:
                self._client.log_artifacts(run_id, local_path, artifact_path)
            else:
                self._client.log_artifact(run_id, local_path, artifact_path)

    def set_status(self, run_id: str, status: str, end_time: int | None) -> None:
        with self._calling():
            if RunStatus.is_terminated(RunStatus.from_string(status)):
                self._client.set_terminated(run_id, status=status, end_time=end_time)
            else:
                self._client.update_run(run_id, status=status)

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        try:
            with http_policy(LOG_HTTP_POLICY):
                yield
            self.outage_since = None
        except MlflowException as e:
            if e.error_code in REJECTED_ERRORS:
                raise Rejected(one_line(e)) from e
            if e.error_code in BLOCKED_ERRORS:
                raise Blocked(f"MLflow at {self.uri}: {one_line(e)}") from e
            self.outage_since = self.outage_since or time.monotonic()
            raise Unreachable(one_line(e)) from e
        except Exception as e:  # requests errors from artifact uploads
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise Blocked(f"MLflow at {self.uri} answered {status}: {one_line(e)}") from e
            self.outage_since = self.outage_since or time.monotonic()
            raise Unreachable(one_line(e)) from e
