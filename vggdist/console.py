"""What a command prints: our own lines and progress, and the libraries' internal chatter only with --verbose.

Quiet by default, at the source of each kind of chatter (nothing is filtered out of a stream afterwards):

- Ray's driver-side INFO lines ("Started a local Ray instance", the dashboard URL): ``ray.init(logging_level=)``
  at WARNING (`vggdist.cluster.connect` asks `ray_logging_level`).
- Ray Train's internal lines in its controller and workers: INFO ("Running in local mode", "Moving model to
  device", "Reported metrics: {...}" on every epoch) and WARNING, which Ray Train uses for its own transient
  trouble (under CPU overload the controller logs "Failed to send resource request ... it's safe to ignore this
  error" with a traceback, which a user would read as the run failing): ``RunConfig(logging_config=
  LoggingConfig(log_level="ERROR"))`` (`train_logging_config`; Ray Train applies it to the ``ray.train``
  loggers' console output only, its log files under the session directory keep every line), and the
  ``ray.train`` logger of the process that builds the trainer.
- The token-authentication notice a local Ray prints when ``~/.ray/auth_token`` exists ("Token
  authentication is enabled for this Ray cluster"): the cluster is private to this command.
- Ray's worker-line decoration: the coloured ``(_run_stage pid=…)`` prefix and the folding of alike lines into
  "[repeated 2x across cluster]" with its note (``RAY_DISABLE_WORKER_LOG_PREFIX``, ``RAY_DEDUP_LOGS``).
- MLflow's and alembic's INFO lines when a SQLite store is created ("Creating initial MLflow database tables"),
  and MLflow's "Downloading artifacts" bar for every small artifact `vggdist report` reads
  (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``).

Warnings and errors still show: a worker's exception reaches the user through ``ray.get`` / Ray Train's result
(once, as a Python traceback with ``--verbose``, else as the command's one-line error). Worker output stays
forwarded to the driver (``log_to_driver``), so a warning logged in a worker (e.g. a stalled run) and the
training progress lines of rank 0 still reach the screen.

``--verbose`` sets ``VGGDIST_VERBOSE=1`` in the environment, which a local Ray's processes inherit and training
workers are given (`vggdist.cluster.worker_env`), so every process of a command agrees.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "VGGDIST_VERBOSE"

# library loggers whose INFO lines are internal chatter for a user: WARNING and up still show
QUIET_LOGGERS = (
    "ray.train",
    "ray.tune",
    "ray.data",
    "mlflow.store.db.utils",
    "mlflow.tracking.fluent",
    "alembic",
)
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def verbose() -> bool:
    """Whether this command (and every process it started) shows the libraries' internal logs."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def set_verbose(on: bool) -> None:
    """Record the choice for this process and the processes it starts, and apply it to the logging here."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if not on:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # worker lines forwarded to this driver (progress of each stage's rank 0) print as they are: they name
        # their stage themselves, so no coloured "(_run_stage pid=…)" prefix, and none is folded into Ray's
        # "[repeated 2x across cluster]" with its note on log deduplication (two stages' progress lines look
        # alike to it). Read when ray is imported, which the CLI does only after this.
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_libraries()


def quiet_libraries() -> None:
    """Raise the library loggers above INFO in this process (a no-op with --verbose). Called by the CLI and
    by every Ray task or worker that runs our code, since each is its own process."""
    if verbose():
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    auth = logging.getLogger(_AUTH_LOGGER)
    if not any(isinstance(f, _TokenAuthEnabled) for f in auth.filters):
        auth.addFilter(_TokenAuthEnabled())


class _TokenAuthEnabled(logging.Filter):
    """Drops Ray's notice that token authentication is on (it is, for our private Ray); keeps its warning that
    it is off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def ray_logging_level() -> int:
    """The level for ``ray.init(logging_level=)``: Ray's own INFO lines only with --verbose."""
    return logging.INFO if verbose() else logging.WARNING


def train_logging_config():
    """Ray Train's ``LoggingConfig`` for a run: on the console, Ray Train's own errors only; its INFO and WARNING
    lines with --verbose. Our code's log lines in a worker (a stalled run's warning) are not Ray Train's and
    still show."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "ERROR")
