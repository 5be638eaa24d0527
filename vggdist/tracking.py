"""MLflow tracking for vggdist (DESIGN §5): the only module of the package that imports mlflow.

- `Tracker` is the rank-0 logger. It talks to MLflow through an explicit `MlflowClient` and run id (no
  fluent global state), so it works the same in the driver, in Ray Train workers and in threads. A
  restarted Ray worker group resumes the *same* run with `Tracker.start(run_id=...)`.
- Logging never kills training: when MLflow is unreachable, a payload is queued in memory (bounded), one
  warning is logged per outage, and the queue is retried on later calls and on `flush()` / `end()`.
- Read-back helpers (`get_run`, `find_runs`, `metric_history`, `download_artifact`, `resolve_checkpoint`)
  return plain dicts/lists for `vggdist evaluate`, `sweep` and `report`.

HTTP policy. MLflow's REST client retries a failed request with exponential backoff (by default 7 retries,
about 4 minutes against a dead server) and waits up to 120 s for a reply; it reads the environment
variables MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT on every request. While a Tracker
call runs, the variables the user has NOT set are given these values (and removed afterwards):
  logging calls (log_*, set_tags, flush):  MAX_RETRIES=0, TIMEOUT=10 s - our own queue does the retrying;
  starting / ending a run:                 MAX_RETRIES=2, BACKOFF_FACTOR=1, TIMEOUT=10 s (a few seconds).
A variable the user has set is left alone (so they choose the trade-off). Read-back helpers use MLflow's
defaults. The override is process-wide while the call runs; another thread's MLflow call in that window
gets the same short policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402, F401

from vggdist.runmeta import (  # noqa: E402, F401 - re-exported: tracking.TAG_CONFIG etc. stay valid
    DEFAULT_EXPERIMENT,
    PROTOCOLS,
    TAG_CHECKPOINT,
    TAG_CODE_VERSION,
    TAG_CONFIG,
    TAG_INIT_FROM,
    TAG_INIT_MAPPING,
    TAG_MANIFEST,
    TAG_PARENT_RUN_ID,
    TAG_STAGE,
    _param_str,
    code_version,
    eval_metric_name,
    flatten,
    manifest_hash,
    markdown_table,
    parse_eval_metric_name,
)

log = logging.getLogger(__name__)

_LOCAL_SCHEMES = ("", "sqlite", "file")

# MLflow error codes that will fail again however often they are retried: drop the payload, say why.
_PERMANENT_ERRORS = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)

_LOG_HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_LIFECYCLE_HTTP_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_env_lock = threading.Lock()
_env_owners: dict[str, int] = {}  # variable -> number of active Tracker calls that set it


@contextlib.contextmanager
def _http_policy(policy: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of `policy` the user has not set, for the duration of one Tracker call."""
    mine = []
    with _env_lock:
        for name, value in policy.items():
            if name in _env_owners:
                _env_owners[name] += 1
                mine.append(name)
            elif name not in os.environ:
                os.environ[name] = value
                _env_owners[name] = 1
                mine.append(name)
    try:
        yield
    finally:
        with _env_lock:
            for name in mine:
                _env_owners[name] -= 1
                if _env_owners[name] == 0:
                    del _env_owners[name]
                    os.environ.pop(name, None)


# ---------------------------------------------------------------------------------------------- URIs


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default made absolute: sqlite:///<cwd>/mlflow.db.

    Resolve this once in the driver and pass it to workers, which may run in another directory.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    """True for stores that live in this node's filesystem: sqlite:, file:, or a plain path."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return False
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    return scheme in _LOCAL_SCHEMES


def check_uri_for_cluster(uri: str, num_nodes: int) -> None:
    """Refuse a node-local store (sqlite file, ./mlruns) when training spans more than one node."""
    if num_nodes > 1 and is_local_uri(uri):
        raise ValueError(
            f"MLflow tracking URI {uri!r} is a local file and cannot be shared across nodes; start "
            "`mlflow server` on the head and set MLFLOW_TRACKING_URI=http://HEAD:5000"
        )


def _client(uri: str | None) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri or tracking_uri())


# ------------------------------------------------------------------------------------ names & values


@dataclasses.dataclass
class _Op:
    """One queued logging call. Metric timestamps are taken when the caller logs, not when sent."""

    kind: str  # "batch" | "artifact" | "text"
    metrics: list[Metric] = dataclasses.field(default_factory=list)
    params: list[Param] = dataclasses.field(default_factory=list)
    tags: list[RunTag] = dataclasses.field(default_factory=list)
    local_path: str = ""
    artifact_path: str | None = None
    text: str = ""
    artifact_file: str = ""

    def describe(self) -> str:
        if self.kind == "batch":
            return f"{len(self.metrics)} metrics, {len(self.params)} params, {len(self.tags)} tags"
        return f"artifact {self.artifact_file or self.local_path}"


class Tracker:
    """Rank-0 MLflow logger for one run. Create it with `Tracker.start(...)`.

    `retry_interval_s`: during an outage a logging call only queues its payload until this many seconds have
    passed since the last failed attempt, so training does not pay a connection attempt per call;
    `flush()` and `end()` always try. `max_pending`: queued calls kept at most (the oldest are dropped).
    """

    def __init__(
        self,
        client: mlflow.MlflowClient,
        run_id: str,
        experiment_id: str,
        *,
        params: Mapping[str, str] | None = None,
        retry_interval_s: float = 10.0,
        max_pending: int = 10_000,
    ) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = client.tracking_uri
        self.retry_interval_s = retry_interval_s
        self._params: dict[str, str] = dict(params or {})
        self._pending: deque[_Op] = deque()
        self._max_pending = max_pending
        self._dropped = 0
        self._outage_since: float | None = None
        self._last_failure = 0.0
        self._lock = threading.RLock()
        self._ended = False

    # -- lifecycle ------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        uri: str | None = None,
        retry_interval_s: float = 10.0,
        max_pending: int = 10_000,
    ) -> Tracker:
        """Create a run in `experiment` (created if missing), or resume `run_id` (status back to RUNNING).

        Unlike logging calls, this raises when MLflow cannot be reached: a run must exist before training.
        """
        uri = uri or tracking_uri()
        client = _client(uri)
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags[TAG_PARENT_RUN_ID] = parent_run_id
        try:
            with _http_policy(_LIFECYCLE_HTTP_POLICY):
                if run_id:
                    run = _get_existing_run(client, run_id, uri)
                    client.update_run(run_id, status="RUNNING")
                    if tags:
                        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                    params = run.data.params
                    experiment_id = run.info.experiment_id
                    log.info("resumed MLflow run %s in %s", run_id, uri)
                else:
                    experiment_id = _experiment_id(client, experiment, create=True)
                    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
                    run_id, params = run.info.run_id, {}
                    log.info(
                        "MLflow run %s (%s) in experiment %r at %s",
                        run_id,
                        run.info.run_name,
                        experiment,
                        uri,
                    )
        except MlflowException as e:
            if e.error_code in _PERMANENT_ERRORS:
                raise
            raise ConnectionError(
                f"cannot reach MLflow at {uri} ({_one_line(e)}); start the server or fix MLFLOW_TRACKING_URI"
            ) from e
        return cls(
            client,
            run_id,
            experiment_id,
            params=params,
            retry_interval_s=retry_interval_s,
            max_pending=max_pending,
        )

    def end(self, status: str = "FINISHED") -> bool:
        """Flush what is queued and mark the run `status` (FINISHED, FAILED, KILLED). True if nothing lost."""
        RunStatus.from_string(status)  # raises on a typo
        with self._lock:
            if self._ended:
                return not self._pending
            self._ended = True
            with _http_policy(_LIFECYCLE_HTTP_POLICY):
                ok = self._drain(force=True)
                try:
                    if ok:  # else MLflow is down: do not wait for a second failure
                        self._client.set_terminated(self.run_id, status=status)
                except Exception as e:  # ending must not raise in a training loop
                    log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, _one_line(e))
                    ok = False
            if self._pending:
                log.warning(
                    "MLflow at %s still unreachable: run %s stays RUNNING and its %d queued logging calls "
                    "are lost",
                    self.uri,
                    self.run_id,
                    len(self._pending),
                )
            return ok

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(
            "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        )

    # -- logging --------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings flattened, values stringified). A param already logged with the
        same value is skipped, so a resumed run can log its config again; a different value raises."""
        with self._lock:
            new: dict[str, str] = {}
            for k, v in flatten(params).items():
                s = _param_str(v)
                old = self._params.get(k)
                if old is None:
                    new[k] = s
                elif old != s:
                    raise ValueError(
                        f"param {k!r} of MLflow run {self.run_id} is {old!r}, cannot change it to {s!r}; "
                        "resume with the same config, or start a new run (no run id)"
                    )
            if new:
                self._params.update(new)
                self._submit(_Op("batch", params=[Param(k, v) for k, v in new.items()]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags, e.g. {TAG_CHECKPOINT: path} every epoch."""
        if tags:
            self._submit(_Op("batch", tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at `step` (epoch for per-epoch metrics) in one batched request."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        if batch:
            self._submit(_Op("batch", metrics=batch))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory. If queued during an outage, it is read when finally sent."""
        local_path = os.fspath(local_path)
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"artifact {local_path} does not exist")
        self._submit(_Op("artifact", local_path=local_path, artifact_path=artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(_Op("text", text=text, artifact_file=artifact_file))

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """A dict as a JSON (or .yaml/.yml: YAML) artifact."""
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(dict(d), sort_keys=False)
        else:
            text = json.dumps(d, indent=2, default=str)
        self.log_text(text, artifact_file)

    def flush(self) -> bool:
        """Try to send everything queued now. True when nothing is left queued."""
        with self._lock:
            return self._drain(force=True)

    @property
    def pending(self) -> int:
        """Number of logging calls queued and not yet accepted by MLflow."""
        return len(self._pending)

    # -- queue ----------------------------------------------------------------------------------------

    def _submit(self, op: _Op) -> None:
        with self._lock:
            if self._ended:
                log.warning("MLflow run %s already ended; dropped %s", self.run_id, op.describe())
                return
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(op)
            self._drain(force=False)

    def _drain(self, *, force: bool) -> bool:
        """Send queued calls in order; stop at the first transient failure. Caller holds the lock."""
        if not force and self._outage_since is not None:
            if time.monotonic() - self._last_failure < self.retry_interval_s:
                return False
        sent = 0
        with _http_policy(_LOG_HTTP_POLICY):
            while self._pending:
                op = self._pending[0]
                try:
                    self._send(op)
                except Exception as e:  # logging must never kill training
                    if isinstance(e, MlflowException) and e.error_code in _PERMANENT_ERRORS:
                        log.error(
                            "MLflow rejected %s for run %s: %s", op.describe(), self.run_id, _one_line(e)
                        )
                        self._pending.popleft()
                        continue
                    if isinstance(e, FileNotFoundError) and op.kind == "artifact":
                        log.error("artifact %s vanished before it could be uploaded", op.local_path)
                        self._pending.popleft()
                        continue
                    self._last_failure = time.monotonic()
                    if self._outage_since is None:
                        self._outage_since = self._last_failure
                        log.warning(
                            "MLflow at %s unreachable (%s); training goes on, logging calls are queued "
                            "(at most %d) and retried",
                            self.uri,
                            _one_line(e),
                            self._max_pending,
                        )
                    return False
                self._pending.popleft()
                sent += 1
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s reachable again after %.0f s; sent %d queued logging calls%s",
                self.uri,
                time.monotonic() - self._outage_since,
                sent,
                f", {self._dropped} oldest dropped (queue full)" if self._dropped else "",
            )
            self._outage_since, self._dropped = None, 0
        return True

    def _send(self, op: _Op) -> None:
        if op.kind == "batch":
            self._client.log_batch(self.run_id, metrics=op.metrics, params=op.params, tags=op.tags)
        elif op.kind == "artifact":
            if os.path.isdir(op.local_path):
                self._client.log_artifacts(self.run_id, op.local_path, op.artifact_path)
            else:
                self._client.log_artifact(self.run_id, op.local_path, op.artifact_path)
        elif op.kind == "text":
            self._client.log_text(self.run_id, op.text, op.artifact_file)
        else:  # pragma: no cover - internal invariant
            raise AssertionError(op.kind)


class NullTracker:
    """The Tracker interface doing nothing: what ranks other than 0 hold."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri: str | None = None
    pending = 0

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> NullTracker:
        return cls()

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def flush(self) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> bool:
        return True

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def tracker_for_rank(rank: int, **start_kwargs: Any) -> Tracker | NullTracker:
    """`Tracker.start(**start_kwargs)` on rank 0, a `NullTracker` elsewhere."""
    return Tracker.start(**start_kwargs) if rank == 0 else NullTracker()


def log_eval_table(
    tracker: Tracker | NullTracker, rows: list[dict[str, Any]], name: str = "eval_results"
) -> None:
    """The evaluation results table as `<name>.json` and `<name>.md` artifacts."""
    tracker.log_dict({"rows": rows}, f"{name}.json")
    tracker.log_text(markdown_table(rows), f"{name}.md")


# ------------------------------------------------------------------------------------------ read back


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def _experiment_id(client: mlflow.MlflowClient, name: str, *, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if create and exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                f"--experiment-id {exp.experiment_id}`) or choose another --experiment"
            )
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name)
    except MlflowException as e:  # another process created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


_NO_SUCH_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def _get_existing_run(client: mlflow.MlflowClient, run_id: str, uri: str):
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in _NO_SUCH_RUN:
            raise ValueError(
                f"no MLflow run {run_id!r} in {uri}; check the run id in the MLflow UI"
            ) from None
        raise


def _run_dict(run) -> dict[str, Any]:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "status": info.status,
        "params": dict(data.params),
        "tags": dict(data.tags),
        "metrics": dict(data.metrics),
        "experiment_id": info.experiment_id,
        "artifact_uri": info.artifact_uri,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "parent_run_id": data.tags.get(TAG_PARENT_RUN_ID),
    }


def get_run(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """One run as a dict: run_id, name, status, params, tags, metrics (latest values), experiment_id,
    artifact_uri, start_time / end_time (ms since the epoch), parent_run_id."""
    uri = uri or tracking_uri()
    return _run_dict(_get_existing_run(_client(uri), run_id, uri))


def find_runs(
    experiment: str = DEFAULT_EXPERIMENT, *, filter_string: str = "", uri: str | None = None
) -> list[dict[str, Any]]:
    """Every active (not deleted) run of `experiment` matching `filter_string`, oldest first, as
    `get_run` dicts; [] when the experiment does not exist. E.g. filter_string="tags.`vggdist.stage` = '1'"."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment, create=False)
    if exp_id is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(_run_dict(r) for r in page)
        token = page.token
        if not token:
            return runs


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """[(step, value)] sorted by step; where a step was logged twice (a resumed run repeating an epoch),
    the value logged last wins."""
    latest: dict[int, tuple[int, float]] = {}
    for m in _client(uri).get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def download_artifact(run_id: str, path: str, dst_dir: str | os.PathLike, uri: str | None = None) -> str:
    """Download artifact `path` (file or directory) of a run into dst_dir; returns the local path."""
    os.makedirs(dst_dir, exist_ok=True)
    return _client(uri).download_artifacts(run_id, path, os.fspath(dst_dir))


def resolve_checkpoint(run_or_path: str, uri: str | None = None) -> str:
    """An existing local path or a URI (s3://, file://, ...) is returned as is; otherwise `run_or_path` is
    an MLflow run id and its TAG_CHECKPOINT (the latest checkpoint location) is returned."""
    if os.path.exists(run_or_path) or "://" in run_or_path:
        return run_or_path
    uri = uri or tracking_uri()
    hint = "pass --init-from <run id> from the MLflow UI or a checkpoint directory"
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", run_or_path):
        raise ValueError(f"{run_or_path!r} is neither a checkpoint path nor a run id in {uri}; {hint}")
    try:
        run = _client(uri).get_run(run_or_path)
    except MlflowException as e:
        if e.error_code in _NO_SUCH_RUN:
            raise ValueError(
                f"{run_or_path!r} is neither a checkpoint path nor a run id in {uri}; {hint}"
            ) from None
        raise
    location = run.data.tags.get(TAG_CHECKPOINT)
    if not location:
        raise ValueError(
            f"MLflow run {run_or_path} ({run.info.run_name}, {run.info.status}) has no {TAG_CHECKPOINT} tag: "
            f"it saved no checkpoint yet; {hint}"
        )
    return location
