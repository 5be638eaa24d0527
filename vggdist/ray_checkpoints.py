"""The training worker's side of checkpoints: resume from the newest whole one, write each epoch's whole or not at
all, and stop every rank together when storage fails in a way no retry fixes.

`EpochCheckpoints` is what `vggdist.ray_worker.worker_loop` holds, under Ray Train workers as in local mode:

- `resume()`: Ray Train's `get_checkpoint()` (the run's latest registered checkpoint after a worker-group restart
  or a rerun) or the newest whole checkpoint in the run's storage directory, whichever is newer, checked against
  its manifest when loaded (`vggdist.checkpoint.load`); a partial one is skipped, never loaded. The storage scan
  is what resumes a run whose driver died before Ray Train recorded its last checkpoint, and a run resumed in
  the other mode (local mode keeps no record of its own).
- `save(...)`: rank 0 writes the checkpoint to a local temporary directory, copies it into
  `<storage>/<run>/epoch_NNN` (`vggdist.checkpoint_store.persist`, manifest last, removed again if the copy
  fails) and reports it to Ray Train with an upload function that only hands back that copy.
- Ray Train restarts the worker group after any worker error (its failure policy has no notion of an error a
  retry cannot fix). So a full, read-only or forbidden storage (`checkpoint_store.NON_RETRYABLE`) is not raised:
  it is recorded (`note`), all ranks learn of it at the epoch end through one all-reduce, and every rank leaves
  its loop (:class:`Stop`) so that the worker function returns the error to the driver as data.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import ray.train
import torch

from vggdist import checkpoint as ckpt
from vggdist import checkpoint_store as store

log = logging.getLogger(__name__)


class Stop(Exception):
    """Leave the training loop at this epoch end: a rank hit an error that no retry fixes (`EpochCheckpoints.failure`)."""


class EpochCheckpoints:
    """Checkpoints of one training worker (see the module docstring). `reduce` sums a tensor over all ranks."""

    def __init__(
        self,
        storage_root: str,
        *,
        rank: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        local_mode: bool,
        keep: int,
    ) -> None:
        self.storage_root = storage_root.rstrip("/")
        self.rank = rank
        self.reduce = reduce
        self.local_mode = local_mode
        self.keep = keep
        self.failure: store.CheckpointWriteError | None = None

    # -- resume ---------------------------------------------------------------------------------------

    def resume(self) -> tuple[dict[str, Any], str] | None:
        """(checkpoint state, where it came from) of the newest whole checkpoint of this run, or None."""
        candidates: list[tuple[int, str, Any]] = []
        registered = None if self.local_mode else ray.train.get_checkpoint()
        if registered is not None:
            epoch = _epoch_of(registered.path)
            candidates.append((epoch, registered.path, registered))
        found = store.latest(self.storage_root)
        if found is not None:
            candidates.append((found.epoch, found.path, None))
        for _epoch, path, registered_ckpt in sorted(candidates, key=lambda c: c[0], reverse=True):
            try:
                if registered_ckpt is not None:
                    with registered_ckpt.as_directory() as d:
                        return ckpt.load(d), path
                with store.local_copy(path) as d:
                    return ckpt.load(d), path
            except ckpt.InvalidCheckpoint as e:
                log.warning("rank %d: not resuming from %s", self.rank, e)
        return None

    # -- saving ---------------------------------------------------------------------------------------

    def note(self, e: BaseException, path: str) -> bool:
        """Record `e` if no retry fixes it (True); the caller carries on until the epoch end stops everyone."""
        if store.non_retryable_errno(e) is None and not isinstance(e, store.CheckpointWriteError):
            return False
        if self.failure is None:
            self.failure = (
                e if isinstance(e, store.CheckpointWriteError) else store.CheckpointWriteError.of(path, e)
            )
            log.error("rank %d: %s", self.rank, self.failure)
        return True

    def guard(self, call: Callable[..., Any], *args: Any, path: str) -> None:
        """`call(*args)` (a tracking call: the spool lives in the storage too); an error no retry fixes is recorded
        for the epoch end to stop the run, not raised into Ray Train's restarts."""
        try:
            call(*args)
        except OSError as e:
            if not self.note(e, path):
                raise

    def save(self, name: str, metrics: dict[str, float], write: Callable[[str], Any]) -> str | None:
        """Rank 0: `write(dir)` the checkpoint, persist it as `<storage root>/<name>`; every rank: agree on
        failure (raises Stop), then report `metrics` (with the checkpoint on rank 0). Returns the checkpoint's
        storage path on rank 0."""
        dest = None
        if self.rank == 0 and self.failure is None:
            try:
                with tempfile.TemporaryDirectory(prefix="vggdist-ckpt-") as tmp:
                    write(tmp)
                    dest = self._persist(tmp, name)
            except Exception as e:
                if not self.note(e, f"{self.storage_root}/{name}"):
                    raise
                dest = None
        self.agree()
        score = {**metrics, "score": store.score(metrics)}
        if dest is None or self.local_mode:
            ray.train.report(score)  # local mode keeps no checkpoints of its own: the storage scan resumes
            if dest is not None:
                store.prune(self.storage_root, self.keep)  # what Ray Train's CheckpointConfig does otherwise
            return None if dest is None else f"{self.storage_root}/{name}"
        storage = ray.train.get_context().get_storage()
        persisted = ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)
        ray.train.report(
            score,
            checkpoint=persisted,
            checkpoint_dir_name=name,
            checkpoint_upload_fn=lambda _checkpoint, _name: persisted,  # copied already, whole
            delete_local_checkpoint_after_upload=False,
        )
        return f"{self.storage_root}/{name}"

    def agree(self) -> None:
        """All ranks at once: raise Stop everywhere when any rank recorded a failure."""
        flag = torch.tensor([1.0 if self.failure is not None else 0.0], dtype=torch.float64)
        if float(self.reduce(flag)[0]) > 0:
            raise Stop()

    def _persist(self, tmp: str, name: str) -> str:
        if self.local_mode:
            return store.persist(tmp, f"{self.storage_root}/{name}")
        storage = ray.train.get_context().get_storage()
        storage._check_validation_file()  # a node that does not see the storage path says so, as Ray would
        fs_path = storage.build_checkpoint_path_from_name(name)
        store.persist(tmp, fs_path, filesystem=storage.storage_filesystem)
        return fs_path


def _epoch_of(path: str) -> int:
    m = store.EPOCH_DIR.fullmatch(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else -1
