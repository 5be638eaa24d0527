"""Refuse a run storage that only one node can see when Ray spans several nodes.

Every rank-0 worker writes checkpoints and the MLflow spool into the run's storage, and a restarted worker group,
a resumed run, `vggdist evaluate` and a sweep's next stage read them back, possibly on another node. A path on a
node's own disk (the default ``~/vggdist_results``, ``/tmp/…``) then holds one node's checkpoints only: a resume
elsewhere starts from scratch or fails. So with more than one alive node the storage must be:

- a URI (``s3://bucket/prefix``, ``gs://…``): every node reaches it through ``pyarrow.fs``; or
- a local path on shared storage (NFS, EFS, Lustre, …) marked as such: a file named ``.vggdist-shared`` in the
  storage directory or in any directory above it (``touch /mnt/shared/.vggdist-shared`` once marks every storage
  under /mnt/shared). The marker lives on the shared filesystem itself, so a node-local directory of the same
  name does not have it; vggdist never creates it.

On a single node (a laptop, one big machine) any path is fine. No ray import.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = ".vggdist-shared"


def is_marked_shared(path: str) -> bool:
    """True when `path` or a directory above it holds the MARKER file."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    return any((d / MARKER).is_file() for d in (p, *p.parents))


def check_storage_for_cluster(storage: str, num_nodes: int) -> None:
    """Raise ValueError (a usage error, exit 2) for a local, unmarked `storage` when Ray has `num_nodes` > 1."""
    if num_nodes <= 1 or "://" in storage or is_marked_shared(storage):
        return
    raise ValueError(
        f"storage {storage} is on this node's disk but Ray has {num_nodes} nodes: checkpoints written on one node "
        f"cannot be resumed or evaluated on another; pass --storage-path /mnt/shared/vggdist (shared storage, "
        f"marked once with `touch /mnt/shared/{MARKER}`) or --storage-path s3://bucket/vggdist"
    )
