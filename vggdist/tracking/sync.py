"""Delivering spools left behind: `vggdist sync PATH` and the automatic replay at the start of a command.

A path is a storage directory (`--storage-path`, which holds many runs), one run's directory
(`<storage>/<run name>`), or a spool directory itself. Replay is idempotent (see `vggdist.tracking.sender`): a
spool already delivered costs a directory listing and one small read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from vggdist.tracking.client import one_line, tracking_uri
from vggdist.tracking.fileops import files_for, join_path
from vggdist.tracking.records import Tally
from vggdist.tracking.sender import Report, Sender, Unreachable
from vggdist.tracking.sink import sink
from vggdist.tracking.spool import SPOOL_DIR, Spool

log = logging.getLogger(__name__)


def find_spools(path: str | os.PathLike) -> list[Spool]:
    """The spools at `path`: itself, `path/mlflow_spool`, or `path/*/mlflow_spool` (a storage directory).
    Raises FileNotFoundError when `path` does not exist."""
    path = os.fspath(path)
    files, root = files_for(path)
    listing = files.listdir(root)
    if not listing and not files.exists(root):
        raise FileNotFoundError(
            f"{path} does not exist; pass a storage directory, a run directory or a spool"
        )
    if os.path.basename(root.rstrip("/")) == SPOOL_DIR or any(n.startswith("seg-") for n in listing):
        return [Spool(path)]
    if SPOOL_DIR in listing:
        return [Spool(join_path(path, SPOOL_DIR))]
    found = []
    for name in sorted(n for n, size in listing.items() if size is None):
        if SPOOL_DIR in files.listdir(files.join(root, name)):
            found.append(Spool(join_path(path, name, SPOOL_DIR)))
    return found


@dataclass
class SyncResult:
    spool: str
    report: Report = field(default_factory=Report)
    left: Tally = field(default_factory=Tally)
    run_ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        runs = ", ".join(self.run_ids) or "?"
        done = f"delivered {self.report.delivered}" if self.report.delivered.calls else "delivered nothing"
        msg = f"{self.spool}: {done} of run {runs} to {self.report.uri or 'MLflow'}"
        if self.report.rejected:
            msg += f"; {self.report.rejected} rejected by MLflow (see the errors above)"
        if self.left.calls:
            msg += f"; {self.left} left spooled: {self.report.error}"
        return msg


class _Down:
    """Stands in for a server found unreachable earlier in this replay: fails at once, no new timeout."""

    def __init__(self, uri: str, why: str) -> None:
        self.uri, self.why = uri, why

    def _fail(self, *args, **kwargs) -> None:
        raise Unreachable(self.why)

    log_batch = log_artifact = set_status = _fail


def sync_spools(spools: list[Spool], *, uri: str | None = None, final: bool = True) -> list[SyncResult]:
    """Replay every spool with pending records, in the given order; `uri` overrides the recorded server."""
    down: dict[str, str] = {}

    def sink_for(recorded: str | None):
        target = uri or recorded or tracking_uri()
        return _Down(target, down[target]) if target in down else sink(target)

    results = []
    for sp in spools:
        if not sp.has_pending():
            continue
        pending = sp.pending_records(final=final)
        res = SyncResult(sp.path, run_ids=sorted({r.get("run_id", "?") for r in pending}))
        res.report = Sender(sp, sink_for).deliver(final=final)
        if res.report.error:
            res.left = Tally.of(sp.pending_records(final=final))
            if not res.report.blocked and res.report.uri and res.left.calls:
                down.setdefault(res.report.uri, res.report.error)
        results.append(res)
    return results


def sync(path: str | os.PathLike, *, uri: str | None = None) -> list[SyncResult]:
    """`vggdist sync PATH`: deliver every undelivered spool under `path`; one result per spool that had any."""
    return sync_spools(find_spools(path), uri=uri, final=True)


def replay_pending(storage: str | os.PathLike | None) -> list[SyncResult]:
    """Best-effort replay of the spools under `storage` before a command's own work. Logs one line per spool
    delivered or left; never raises (a storage that does not exist yet has nothing to replay)."""
    if not storage:
        return []
    try:
        spools = find_spools(storage)
        # final=False: a spool whose writer is still alive may end in a record being written right now
        results = sync_spools(spools, final=False)
    except FileNotFoundError:
        return []
    except Exception as e:  # replaying old runs must not stop a new one
        log.warning("could not replay the MLflow spools under %s: %s", storage, one_line(e))
        return []
    for r in results:
        (log.warning if r.left.calls and not r.report.busy else log.info)("MLflow replay: %s", r.line())
    return results
