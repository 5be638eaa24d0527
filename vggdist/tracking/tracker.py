"""`Tracker`: the rank-0 logger of one MLflow run, writing through the run's durable spool.

Every logging call (params, tags, metrics, artifacts, the final status) is appended to the spool in the run's
storage directory and returns at once: training never waits for MLflow. A background sender in the process that
owns the run (the driver) replays the spool to MLflow in order. A run whose spool is not delivered when the job
ends stays complete on disk: `vggdist sync` or the next `vggdist` command on that storage delivers it.

- `Tracker.start(...)` creates a run (the one call that needs MLflow up: it fails fast, before anything ran),
  or resumes one by id (a status flip back to RUNNING, spooled).
- `Tracker.attach(run_id, spool_dir, send=False)` logs into a known run with no network call at all: what rank 0
  of a (restarted) Ray Train worker group does; the driver's sender delivers what it writes.
- Without a spool directory (a checkpoint outside any run storage), a temporary spool is used; whatever it cannot
  deliver by `close()` is named in a warning with the command that delivers it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

from vggdist.runmeta import DEFAULT_EXPERIMENT, _param_str, flatten, markdown_table
from vggdist.tracking.client import tracking_uri
from vggdist.tracking.records import Tally, artifact_record, log_record, status_record
from vggdist.tracking.runs import check_status, create_run, lookup_run, parent_tags
from vggdist.tracking.sender import Sender
from vggdist.tracking.sink import sink
from vggdist.tracking.spool import SPOOL_DIR, Spool, SpoolWriter

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 30.0  # how long closing a run waits for MLflow to take what is still spooled


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """Rank-0 MLflow logger for one run. Create it with `Tracker.start(...)` or `Tracker.attach(...)`.

    `send`: run a background sender that delivers the spool (False for Ray Train workers: the driver sends).
    `wait_s`: how long `close()` / `end()` wait for an unreachable MLflow before leaving the rest spooled (less
    when this process already saw the server down for longer).
    """

    def __init__(
        self,
        run_id: str,
        *,
        uri: str,
        spool_dir: str | os.PathLike | None = None,
        experiment_id: str | None = None,
        params: Mapping[str, str] | None = None,
        send: bool = True,
        wait_s: float = DEFAULT_WAIT_S,
        poll_s: float = 1.0,
    ) -> None:
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.wait_s = wait_s
        self._temporary = spool_dir is None
        self.spool_dir = os.fspath(spool_dir) if spool_dir else tempfile.mkdtemp(prefix="vggdist-spool-")
        self._spool = Spool(self.spool_dir)
        self._writer = SpoolWriter(self._spool, uri)
        self._sender = Sender(self._spool, self._sink, poll_s=poll_s).start() if send else None
        self._params: dict[str, str] = dict(params or {})
        self._lock = threading.RLock()
        self._closed = False
        self._delivered = False

    def _sink(self, uri: str | None):
        return sink(uri or self.uri)

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
        spool_dir: str | os.PathLike | None = None,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> Tracker:
        """Create a run in `experiment` (created if missing), or resume `run_id` (status back to RUNNING).

        Unlike logging calls, this needs MLflow: it raises ConnectionError within seconds when MLflow cannot
        be reached, ValueError when `run_id` does not exist.
        """
        uri = uri or tracking_uri()
        tags = parent_tags(tags, parent_run_id)
        if run_id:
            exp_id, params = lookup_run(run_id, uri)
            t = cls(run_id, uri=uri, spool_dir=spool_dir, experiment_id=exp_id, params=params, wait_s=wait_s)
            t._append(status_record(run_id, "RUNNING", None))
            t.set_tags(tags)
            log.info("resumed MLflow run %s in %s", run_id, uri)
            return t
        run_id, _, exp_id = create_run(experiment, run_name=run_name, tags=tags, uri=uri)
        return cls(run_id, uri=uri, spool_dir=spool_dir, experiment_id=exp_id, wait_s=wait_s)

    @classmethod
    def attach(
        cls,
        run_id: str,
        spool_dir: str | os.PathLike | None = None,
        *,
        uri: str | None = None,
        send: bool = True,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> Tracker:
        """Log into the existing run `run_id` without any call to MLflow first (its status is left alone)."""
        return cls(run_id, uri=uri or tracking_uri(), spool_dir=spool_dir, send=send, wait_s=wait_s)

    def end(self, status: str = "FINISHED", wait_s: float | None = None) -> bool:
        """Mark the run `status` (FINISHED, FAILED, KILLED) and close. True if MLflow has everything."""
        check_status(status)
        with self._lock:
            if not self._closed:
                self._append(status_record(self.run_id, status, _now_ms()))
        return self.close(wait_s)

    def close(self, wait_s: float | None = None) -> bool:
        """Make the spool durable, wait up to `wait_s` for MLflow to take it, stop sending; the run's status
        is left as it is. True if nothing is left spooled. Says in one line what is left and how to send it."""
        with self._lock:
            if self._closed:
                return self._delivered
            self._closed = True
            self._writer.close()
        if self._sender is None:
            self._delivered = not self._spool.has_pending()
            return self._delivered
        wait = self.wait_s if wait_s is None else wait_s
        since = sink(self.uri).outage_since
        if since is not None:  # down for a while already: one more try, not a full wait
            wait = max(min(wait, 2.0), since + wait - time.monotonic())
        self._delivered = self._sender.stop(wait)
        if not self._delivered:
            self._say_what_is_left()
        elif self._temporary:
            self._spool.files.remove_tree(self._spool.root)
        return self._delivered

    def _say_what_is_left(self) -> None:
        left = self._spool.pending_records(final=True)
        if not left:
            self._delivered = True
            return
        why = self._sender.report.error or "not delivered in time"
        target = self.spool_dir
        if os.path.basename(target.rstrip("/")) == SPOOL_DIR:
            target = target.rstrip("/")[: -len(SPOOL_DIR) - 1]
        also = (
            "" if self._temporary else " (the next vggdist train / sweep / evaluate on that storage does too)"
        )
        log.warning(
            "%s of MLflow run %s stay spooled in %s (MLflow at %s: %s); deliver them with `vggdist sync %s`%s",
            Tally.of(left),
            self.run_id,
            self.spool_dir,
            self.uri,
            why,
            target,
            also,
        )

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
                self._append(log_record(self.run_id, params=new))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags, e.g. {TAG_CHECKPOINT: path} every epoch."""
        if tags:
            self._append(log_record(self.run_id, tags={k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at `step` (epoch for per-epoch metrics), stamped with the time of this call."""
        ts = _now_ms()
        if metrics:
            self._append(log_record(self.run_id, [(k, v, ts, step) for k, v in metrics.items()]))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or directory (its contents go under `artifact_path`), copied into the spool now."""
        local_path = os.fspath(local_path)
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"artifact {local_path} does not exist")
        with self._lock:
            if self._refuse("an artifact"):
                return
            rel = self._writer.add_artifact(local_path)
            self._append(artifact_record(self.run_id, rel, artifact_path, os.path.isdir(local_path)))

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (e.g. "eval_results.md" or "report/plan.yaml")."""
        with tempfile.TemporaryDirectory(prefix="vggdist-text-") as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_file))
            with open(path, "w") as f:
                f.write(text)
            self.log_artifact(path, os.path.dirname(artifact_file) or None)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """A dict as a JSON (or .yaml/.yml: YAML) artifact."""
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(dict(d), sort_keys=False)
        else:
            text = json.dumps(d, indent=2, default=str)
        self.log_text(text, artifact_file)

    def sync(self) -> None:
        """Durability point (each epoch's end): what was logged so far survives a crash of this machine."""
        with self._lock:
            if not self._closed:
                self._writer.sync()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Sync, then wait up to `timeout_s` (default `wait_s`) for MLflow to take everything logged so far.
        True when nothing is left spooled. Without a sender it only syncs and reports."""
        self.sync()
        if self._sender is None or self._closed:
            return not self._spool.has_pending()
        return self._sender.drain(self.wait_s if timeout_s is None else timeout_s)

    @property
    def pending(self) -> int:
        """Logging calls in the spool that MLflow has not acknowledged yet."""
        if self._closed and self._temporary and self._delivered:
            return 0
        return len(self._spool.pending_records(final=False))

    def _refuse(self, what: str) -> bool:
        if self._closed:
            log.warning("MLflow run %s: tracker already closed; %s was not logged", self.run_id, what)
        return self._closed

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._refuse(str(Tally.of([record]))):
                return
            self._writer.append(record)


class NullTracker:
    """The Tracker interface doing nothing: what ranks other than 0 hold."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri: str | None = None
    spool_dir: str | None = None
    pending = 0

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> NullTracker:
        return cls()

    @classmethod
    def attach(cls, *args: Any, **kwargs: Any) -> NullTracker:
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

    def sync(self) -> None:
        pass

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self, wait_s: float | None = None) -> bool:
        return True

    def end(self, status: str = "FINISHED", wait_s: float | None = None) -> bool:
        return True

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def log_eval_table(
    tracker: Tracker | NullTracker, rows: list[dict[str, Any]], name: str = "eval_results"
) -> None:
    """The evaluation results table as `<name>.json` and `<name>.md` artifacts."""
    tracker.log_dict({"rows": rows}, f"{name}.json")
    tracker.log_text(markdown_table(rows), f"{name}.md")
