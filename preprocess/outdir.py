"""``--out`` of a shard job: what it may already hold, who writes it, which shards in it are done.

- `check_out` / `check_claim` refuse, before anything is created, an ``--out`` that is a file, lies inside the
  source, holds another command's output or files this tool did not write (unless ``--overwrite``);
- `exclusive_lock` stops two drivers writing one directory; `claim` records the command (``.parts/job.json``);
- `done_marker` is the resume rule (a marker matching the plan and a shard file of the recorded size);
- `check_shards_present` refuses to assemble a manifest of shards this driver does not see (an ``--out`` that
  is not shared by every node); `writing` turns an OS error writing ``--out`` into a one-line
  `failures.OutputError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from preprocess.failures import SHARED_OUT, JobError, JobFailed, OutputError, is_output_error
from preprocess.images import MAX_FILE_BYTES
from preprocess.manifest import write_json_atomic
from vggdist.shardformat import MANIFEST, PARTS, REJECTS, SHARD_NAME_RE, STATS, TOOL

if TYPE_CHECKING:
    from preprocess.shards import ShardTask


def check_out(out: Path, source: str) -> None:
    """Refuse an --out that cannot hold shards (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} exists and is not a directory; choose a directory")
    source = Path(source).expanduser().resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise JobError(
            f"--out {out} lies inside --source {source}: its shards would become inputs; choose an --out "
            "outside the source"
        )


@contextlib.contextmanager
def writing(out: Path):
    """Turn an ``OSError`` about writing --out (no space, read-only, permission, I/O) into an OutputError."""
    try:
        yield
    except OSError as e:
        if not is_output_error(e):
            raise
        raise OutputError.from_oserror(e, out) from e


def check_shards_present(out: Path, tasks: list[ShardTask], markers: dict) -> None:
    """Every shard a task reported is in ``out`` with the size it recorded: a task on another node whose --out
    is a local directory writes shards this driver never sees, and the manifest must not list them."""
    wrong = []
    for t in tasks:
        try:
            size = (out / t.name).stat().st_size
        except FileNotFoundError:
            wrong.append(f"{t.name} (missing)")
            continue
        if size != markers[t.name]["bytes"]:
            wrong.append(f"{t.name} ({size:,} bytes, written as {markers[t.name]['bytes']:,})")
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise JobFailed(
            f"{len(wrong)} of {len(tasks)} shards are not in {out} as their tasks wrote them: "
            f"{', '.join(wrong[:5])}{more}. {SHARED_OUT}"
        )


class exclusive_lock:
    """flock on DIR/.parts/lock for the driver's lifetime (released by the kernel if the driver is killed)."""

    def __init__(self, out: Path) -> None:
        self._path = out / PARTS / "lock"

    def __enter__(self):
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise JobError(
                    f"another {TOOL} is writing {self._path.parent.parent}; wait for it or use another --out"
                ) from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def check_claim(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse (reading only) an --out holding another command's output or files this tool did not write,
    unless ``overwrite``; the same command's output is resumed."""
    if not out.is_dir():
        return
    job_file = out / PARTS / "job.json"
    if job_file.is_file():
        previous = _recorded(job_file)
        if previous == identity or overwrite:
            return
        diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        what = "the source content changed" if diff == ["plan"] else f"{', '.join(diff)} differ"
        raise JobError(
            f"{out} holds the output of a different command ({what}); pass --overwrite to replace it or use another --out"
        )
    if any(p.name != PARTS for p in out.iterdir()) and not overwrite:
        raise JobError(
            f"{out} is not empty and was not written by this command; pass --overwrite or use another --out"
        )


def claim(out: Path, identity: dict, overwrite: bool) -> None:
    """Resume only the same command; replace another's output only with ``overwrite`` (under the lock)."""
    check_claim(out, identity, overwrite)
    job_file = out / PARTS / "job.json"
    if job_file.is_file() and _recorded(job_file) == identity:
        if json.loads(job_file.read_text()) != identity:
            write_json_atomic(job_file, identity)
        return
    if overwrite:
        remove_outputs(out)
    write_json_atomic(job_file, identity)


def _recorded(job_file: Path) -> dict:
    """The identity a job recorded; one recorded before ``max_file_bytes`` existed had the default cap."""
    previous = json.loads(job_file.read_text())
    previous.setdefault("max_file_bytes", MAX_FILE_BYTES)
    return previous


def remove_outputs(out: Path) -> None:
    """Delete what this tool writes (shards, temp files, manifest, stats, rejects, markers); nothing else."""
    for p in out.iterdir():
        if p.is_file() and (
            SHARD_NAME_RE.match(p.name) or ".tar.tmp-" in p.name or p.name in (MANIFEST, REJECTS)
        ):
            p.unlink()
        elif p.is_file() and p.name == STATS:
            p.unlink()
    for p in (out / PARTS).glob("*.json"):
        p.unlink()


def done_marker(out: Path, task: ShardTask) -> dict | None:
    path = out / PARTS / f"{task.name}.json"
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shard = out / task.name
    if (
        marker.get("plan_hash") != task.plan_hash
        or not shard.is_file()
        or shard.stat().st_size != marker["bytes"]
    ):
        return None
    return marker
