"""Where MLflow is and how vggdist calls it: the tracking URI, local stores, the HTTP policy, error gists.

`runs` (experiments and runs) and `sink` (the target a spool is replayed into) make their MLflow calls through
the `client()` and `http_policy()` of this module, and sort MLflow's errors with its error-code sets.

HTTP policy. MLflow's REST client retries a failed request with exponential backoff (by default 7 retries,
about 4 minutes against a dead server) and waits up to 120 s for a reply; it reads the environment variables
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT on every request. While one of our calls runs, the
variables the user has NOT set are given these values (and removed afterwards):
  replaying a spool (`sink.MlflowSink`): MAX_RETRIES=0, TIMEOUT=10 s - the sender does its own retrying;
  creating / looking up a run:           MAX_RETRIES=2, BACKOFF_FACTOR=1, TIMEOUT=10 s (fail within seconds).
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
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

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


@contextlib.contextmanager
def lifecycle_call(uri: str) -> Iterator[None]:
    """Make run-lifecycle calls to MLflow at `uri` under the short lifecycle HTTP policy; an error that is not
    MLflow refusing the request becomes a ConnectionError within seconds, naming MLFLOW_TRACKING_URI."""
    try:
        with http_policy(LIFECYCLE_HTTP_POLICY):
            yield
    except MlflowException as e:
        if e.error_code in REJECTED_ERRORS | BLOCKED_ERRORS:
            raise
        raise unreachable(uri, e) from e


def check_reachable(uri: str) -> None:
    """Raise ConnectionError within seconds, naming MLFLOW_TRACKING_URI, when MLflow at `uri` cannot be reached."""
    with lifecycle_call(uri):
        client(uri).search_experiments(max_results=1)


def wait_reachable(
    uri: str, timeout_s: float, what: str, *, poll_s: float = 1.0, max_poll_s: float = 15.0
) -> None:
    """`check_reachable`, retried for up to `timeout_s`: for work that is better late than lost (a sweep stage
    that must create or resume its MLflow run while the server restarts; the stages running already go on into
    their spools). Says once, in one line, that `what` waits; raises the last ConnectionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            check_reachable(uri)
        except ConnectionError as e:
            if time.monotonic() + poll_s > deadline:
                raise
            if not waited:
                log.warning("%s; %s waits for it (up to %.0f s)", e, what, timeout_s)
                waited = True
            time.sleep(poll_s)
            poll_s = min(2 * poll_s, max_poll_s)
            continue
        if waited:
            log.warning("MLflow at %s is back: %s goes on", uri, what)
        return
