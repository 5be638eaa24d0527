"""The MLflow side of tracking: tracking URI, HTTP policy, run creation and the sink a spool is replayed into.

HTTP policy. MLflow's REST client retries a failed request with exponential backoff (by default 7 retries,
about 4 minutes against a dead server) and waits up to 120 s for a reply; it reads the environment variables
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT on every request. While one of our calls runs, the
variables the user has NOT set are given these values (and removed afterwards):
  replaying a spool (`MlflowSink`):   MAX_RETRIES=0, TIMEOUT=10 s - the sender does its own retrying;
  creating / looking up a run:       MAX_RETRIES=2, BACKOFF_FACTOR=1, TIMEOUT=10 s (fail within seconds).
A variable the user has set is left alone. Read-back helpers use MLflow's defaults. The override is
process-wide while the call runs: another thread's MLflow call in that window gets the same short policy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from vggdist.runmeta import TAG_PARENT_RUN_ID  # noqa: E402
from vggdist.tracking.sender import Blocked, Rejected, Unreachable  # noqa: E402

log = logging.getLogger(__name__)

_LOCAL_SCHEMES = ("", "sqlite", "file")

# MLflow error codes that fail again however often they are sent: the payload is dropped, with an error.
REJECTED_ERRORS = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
        "RESOURCE_ALREADY_EXISTS",
    }
)
# Error codes that say this server cannot take the spool at all: it is kept, delivery stops.
BLOCKED_ERRORS = frozenset({"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"})
NO_SUCH_RUN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST")

LOG_HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
LIFECYCLE_HTTP_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_env_lock = threading.Lock()
_env_owners: dict[str, int] = {}  # variable -> number of active calls that set it
_sinks: dict[str, MlflowSink] = {}


@contextlib.contextmanager
def http_policy(policy: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of `policy` the user has not set, for the duration of one call."""
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

    Resolve this once in the driver and pass it on, since workers may run in another directory.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    """True for stores that live in this node's filesystem: sqlite:, file:, or a plain path."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return False
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    return scheme in _LOCAL_SCHEMES


class MissingStore(ValueError):
    """A run was asked for in a local tracking store that does not exist (a usage error: the wrong
    MLFLOW_TRACKING_URI, or the wrong directory for the default ./mlflow.db)."""


def local_store_path(uri: str) -> Path | None:
    """The file (sqlite:) or directory (file:, plain path) a local tracking store lives in; None for a server."""
    if not is_local_uri(uri):
        return None
    if uri.lower().startswith("sqlite:"):
        rest = uri.split(":", 1)[1].split("?", 1)[0]
        return Path(rest[3:] if rest.startswith("///") else rest.lstrip("/"))
    if uri.lower().startswith("file:"):
        rest = uri.split(":", 1)[1]
        return Path(rest[2:] if rest.startswith("//") else rest)
    return Path(uri)


def store_missing(uri: str) -> bool:
    """True when `uri` is a local store that does not exist yet: MLflow's client would create it on first use,
    which a command that only reads (evaluate, report) must not do."""
    path = local_store_path(uri)
    return path is not None and not path.exists()


def require_store(uri: str, what: str) -> None:
    """Raise MissingStore (exit 2, naming MLFLOW_TRACKING_URI) unless the local store at `uri` exists."""
    if store_missing(uri):
        raise MissingStore(
            f"{what}: there is no MLflow tracking store at {uri} (nothing was written there); set "
            f"MLFLOW_TRACKING_URI to the store the run was logged to (e.g. sqlite:////abs/path/mlflow.db or "
            f"http://HEAD:5000), or run from the directory that holds its mlflow.db"
        )


def check_uri_for_cluster(uri: str, num_nodes: int) -> None:
    """Refuse a node-local store (sqlite file, ./mlruns) when training spans more than one node."""
    if num_nodes > 1 and is_local_uri(uri):
        raise ValueError(
            f"MLflow tracking URI {uri!r} is a local file and cannot be shared across nodes; start "
            "`mlflow server` on the head and set MLFLOW_TRACKING_URI=http://HEAD:5000"
        )


def client(uri: str | None = None) -> mlflow.MlflowClient:
    """One MlflowClient per tracking URI and process (clients hold no per-call state)."""
    return _client(uri or tracking_uri())


@lru_cache(maxsize=16)
def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def one_line(e: BaseException) -> str:
    """The gist of an error in one short line: MLflow wraps a refused connection in 300 characters of urllib3."""
    text = str(e).strip()
    for pattern in (r"\[Errno -?\d+\] [^'\"()]+", r"[Rr]ead timed out[^'\"()]*", r"Connection refused"):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    msg = text.splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def unreachable(uri: str, e: BaseException) -> ConnectionError:
    return ConnectionError(
        f"cannot reach MLflow at {uri} ({one_line(e)}); start the server or fix MLFLOW_TRACKING_URI"
    )


# ------------------------------------------------------------------------------------------ runs


# The experiment tag the MLflow UI reads for the kind of an experiment (its "Custom model development" choice)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store: <dir of mlflow.db>/mlartifacts/<experiment>


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store, under ``<its directory>/mlartifacts/
    <experiment>`` (MLflow's own default is ``./mlruns`` in whatever directory the command ran from); None for
    a server, whose ``--artifacts-destination`` decides."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / ARTIFACTS_DIR / safe).resolve().as_uri()


def runs_page(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's training runs. The 3.x UI opens ``#/experiments/<id>`` in the
    view of its global workflow switch (GenAI, with traces, unless this browser chose "Machine learning"
    before) and ignores the experiment's kind tag while that switch is shown; the ``workflowType`` query
    parameter sets the switch, and ``/runs`` names the page."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_id(c: mlflow.MlflowClient, name: str, *, create: bool) -> str | None:
    exp = c.get_experiment_by_name(name)
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
        return c.create_experiment(
            name,
            artifact_location=artifact_location(c.tracking_uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except MlflowException as e:  # another process created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id


def existing_run(c: mlflow.MlflowClient, run_id: str, uri: str):
    require_store(uri, f"no MLflow run {run_id!r}")
    try:
        return c.get_run(run_id)
    except MlflowException as e:
        if e.error_code in NO_SUCH_RUN:
            raise ValueError(
                f"no MLflow run {run_id!r} in {uri}; check the run id in the MLflow UI"
            ) from None
        raise


def create_run(
    experiment: str, *, run_name: str | None, tags: Mapping[str, str], uri: str
) -> tuple[str, str, str]:
    """Create a run (and the experiment if missing); (run id, run name, experiment id). Raises
    ConnectionError within seconds when MLflow cannot be reached: nothing has run yet, so nothing is lost."""
    c = client(uri)
    try:
        with http_policy(LIFECYCLE_HTTP_POLICY):
            exp_id = experiment_id(c, experiment, create=True)
            run = c.create_run(exp_id, tags=dict(tags), run_name=run_name)
    except MlflowException as e:
        if e.error_code in REJECTED_ERRORS | BLOCKED_ERRORS:
            raise
        raise unreachable(uri, e) from e
    log.info("MLflow run %s (%s) in experiment %r at %s", run.info.run_id, run.info.run_name, experiment, uri)
    return run.info.run_id, run.info.run_name, exp_id


DATASET_DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest; the full hash is a tag


def log_datasets(run_id: str, datasets: Sequence[Mapping[str, Any]], uri: str) -> None:
    """Record the shards a run reads as MLflow dataset inputs (the UI's Dataset column and lineage).

    Each mapping: ``name``, ``digest`` (the manifest's sha256, shortened), ``source`` (the shard directory),
    ``num_samples``, ``context`` ("training" or "validation"). Called once, when the run is created (MLflow must
    be reachable then anyway); a resumed run has them already."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(
                name=d["name"],
                digest=str(d["digest"])[:DATASET_DIGEST_CHARS],
                source_type="local",
                source=json.dumps({"uri": str(d["source"])}),
                profile=json.dumps({"num_samples": int(d["num_samples"])}),
            ),
            tags=[InputTag("mlflow.data.context", d["context"])],
        )
        for d in datasets
    ]
    for attempt in range(3):
        try:
            with http_policy(LIFECYCLE_HTTP_POLICY):
                client(uri).log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            # Two runs that start together (a sweep's concurrent stages) may both insert the same dataset row
            # into a SQL store: the loser's insert fails on the unique key, and a retry finds the row.
            if "UNIQUE constraint" in str(e) or "duplicate key" in str(e):
                if attempt < 2:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                log.warning("run %s: its dataset inputs were not logged (%s); lineage only", run_id, e)
                return
            if e.error_code in REJECTED_ERRORS | BLOCKED_ERRORS:
                raise
            raise unreachable(uri, e) from e


def check_reachable(uri: str) -> None:
    """Raise ConnectionError within seconds, naming MLFLOW_TRACKING_URI, when MLflow at `uri` cannot be reached."""
    try:
        with http_policy(LIFECYCLE_HTTP_POLICY):
            client(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.error_code in REJECTED_ERRORS | BLOCKED_ERRORS:
            raise
        raise unreachable(uri, e) from e


def lookup_run(run_id: str, uri: str) -> tuple[str, dict[str, str]]:
    """(experiment id, params) of an existing run; ValueError if there is none, ConnectionError if unreachable."""
    c = client(uri)
    try:
        with http_policy(LIFECYCLE_HTTP_POLICY):
            run = existing_run(c, run_id, uri)
    except MlflowException as e:
        if e.error_code in REJECTED_ERRORS | BLOCKED_ERRORS:
            raise
        raise unreachable(uri, e) from e
    return run.info.experiment_id, dict(run.data.params)


def parent_tags(tags: Mapping[str, Any] | None, parent_run_id: str | None) -> dict[str, str]:
    out = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        out[TAG_PARENT_RUN_ID] = parent_run_id
    return out


def check_status(status: str) -> str:
    RunStatus.from_string(status)  # raises on a typo
    return status


# ------------------------------------------------------------------------------------------ the sink


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
    with _env_lock:
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
