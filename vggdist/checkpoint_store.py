"""Checkpoints in a run's storage directory (`<storage>/<run name>/epoch_NNN`): copied in whole or not at all,
found again by a rerun, and failures that no retry can fix named as such.

- `persist` copies a checkpoint directory written by `vggdist.checkpoint.save` into the storage, its manifest
  last; if the copy fails (a full disk, a read-only mount, a lost permission), what was copied is removed and
  :class:`CheckpointWriteError` says where, why, and how much space one checkpoint needs. It is what Ray Train
  calls to upload a checkpoint (`ray.train.report(checkpoint_upload_fn=...)`), and what the single-worker local
  mode calls itself.
- `latest` finds the newest whole checkpoint of a run (a partial one is skipped with a warning): where a rerun
  after a driver crash resumes, whichever way the run was started.
- `prune` keeps what Ray Train's `CheckpointConfig(num_to_keep, score)` keeps: the best `keep` by score plus the
  latest (used where Ray Train does not manage the checkpoints, i.e. in local mode).

Paths are local paths or URIs (`s3://…`, through `pyarrow.fs`). No ray import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggdist import runmeta
from vggdist.checkpoint import MANIFEST_FILE, META_FILE, InvalidCheckpoint, read_manifest, verify
from vggdist.failures import CommandFailed

log = logging.getLogger(__name__)

EPOCH_DIR = re.compile(r"epoch_(\d{3,})")

# Writing errors a retry cannot fix: it fails the same way until someone frees space or fixes the mount.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
NON_RETRYABLE = NO_SPACE | NOT_WRITABLE
_BY_TEXT = {  # object stores and pyarrow report these in words, without an errno
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
    "access denied": errno.EACCES,
    "accessdenied": errno.EACCES,
}


def epoch_dir(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def non_retryable_errno(e: BaseException) -> int | None:
    """The errno of an error that no retry fixes (no space, read-only, permission), else None."""
    code = getattr(e, "errno", None)
    if code in NON_RETRYABLE:
        return code
    text = str(e).lower()
    return (
        next((c for words, c in _BY_TEXT.items() if words in text), None) if isinstance(e, OSError) else None
    )


@dataclass
class CheckpointWriteError(CommandFailed):
    """Writing a checkpoint (or the run's tracking spool beside it) failed in a way that a retry cannot fix.
    Picklable, and a plain dict in between (it travels from a Ray Train worker to the driver in the worker's
    return value); printed as one line. `resume`: how to go on, added by the driver."""

    path: str
    code: int
    detail: str
    needed_bytes: int | None = None
    free_bytes: int | None = None
    resume: str | None = None

    def __str__(self) -> str:
        why = os.strerror(self.code)
        space = ""
        if self.code in NO_SPACE and self.needed_bytes:
            space = f"; a checkpoint needs {_mb(self.needed_bytes)}"
            if self.free_bytes is not None:
                space += f", {_mb(self.free_bytes)} free there"
        fix = "free space there" if self.code in NO_SPACE else "make it writable"
        then = f", then {self.resume}" if self.resume else ""
        return f"cannot write {self.path}: {why}{space}; {fix} (or choose another --storage-path){then}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointWriteError:
        return cls(**d)

    @classmethod
    def of(cls, path: str, e: BaseException, needed_bytes: int | None = None) -> CheckpointWriteError:
        return cls(path, non_retryable_errno(e) or errno.EIO, str(e)[:300], needed_bytes, _free_bytes(path))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _free_bytes(path: str) -> int | None:
    if "://" in path:
        return None
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def checkpoint_bytes(local_dir: str | os.PathLike) -> int:
    """The bytes of one checkpoint (all its files), from its manifest."""
    files = read_manifest(local_dir)["files"]
    return sum(f["bytes"] for f in files.values()) + (Path(local_dir) / MANIFEST_FILE).stat().st_size


# -------------------------------------------------------------------------------------------------- persist


def _filesystem(path: str | os.PathLike):
    """(pyarrow filesystem, path in it) for a URI; (None, absolute path) for a local path (str or Path)."""
    path = os.fspath(path)
    if "://" not in path:
        return None, os.path.abspath(os.path.expanduser(path))
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path)


def persist(local_dir: str | os.PathLike, dest: str, filesystem=None) -> str:
    """Copy the checkpoint in `local_dir` to `dest` (a local path or URI; with `filesystem`, a path in that
    `pyarrow.fs` filesystem), manifest last. On failure nothing stays at `dest`; a non-retryable failure raises
    CheckpointWriteError, others their own error. Returns `dest`."""
    local_dir = os.fspath(local_dir)
    names = sorted(n for n in os.listdir(local_dir) if n != MANIFEST_FILE)
    if filesystem is None:
        filesystem, fs_path = _filesystem(dest)
    else:
        fs_path = dest
    try:
        if filesystem is None or _is_local(filesystem):
            _copy_local(local_dir, fs_path, names)
        else:
            _copy_arrow(local_dir, filesystem, fs_path, names)
    except Exception as e:
        _remove(filesystem, fs_path)
        if non_retryable_errno(e) is not None:
            raise CheckpointWriteError.of(dest, e, checkpoint_bytes(local_dir)) from e
        raise
    return dest


def _is_local(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def _copy_local(src: str, dst: str, names: list[str]) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in [*names, MANIFEST_FILE]:
        with open(os.path.join(src, name), "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)  # the names, so that a crashed machine keeps the manifest only with its files
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_arrow(src: str, fs, dst: str, names: list[str]) -> None:
    fs.create_dir(dst, recursive=True)
    for name in [*names, MANIFEST_FILE]:
        with open(os.path.join(src, name), "rb") as fin, fs.open_output_stream(f"{dst}/{name}") as fout:
            while chunk := fin.read(8 << 20):
                fout.write(chunk)


def _remove(fs, path: str) -> None:
    try:
        if fs is None or _is_local(fs):
            shutil.rmtree(path, ignore_errors=True)
        else:
            fs.delete_dir(path)
    except Exception as e:  # the copy failed already; say what is left behind
        log.warning("could not remove the partial checkpoint %s: %s", path, e)


# ---------------------------------------------------------------------------------------- finding, pruning


@dataclass(frozen=True)
class Found:
    path: str
    epoch: int
    meta: dict[str, Any]


def _is_whole_remote(fs, path: str) -> bool:
    """A checkpoint on an object store is whole when every file of its manifest has the recorded size."""
    import pyarrow.fs as pafs

    try:
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
            files = json.loads(f.read())["files"]
        infos = fs.get_file_info([f"{path}/{name}" for name in files])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(i.type == pafs.FileType.File and i.size == files[i.base_name]["bytes"] for i in infos)


def whole_checkpoints(run_dir: str) -> list[Found]:
    """The whole checkpoints of a run directory (local or URI), oldest first; partial ones are skipped with a
    warning (by file sizes against the manifest: a cheap scan; loading checks the hashes too)."""
    fs, root = _filesystem(run_dir)
    found = []
    if fs is None:
        d = Path(root)
        entries = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    else:
        import pyarrow.fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        entries = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    for name in entries:
        m = EPOCH_DIR.fullmatch(name)
        if m is None:
            continue
        path = f"{run_dir.rstrip('/')}/{name}"
        if fs is None:
            try:
                verify(os.path.join(root, name), hashes=False)
            except InvalidCheckpoint as e:
                log.warning("skipping %s", e)
                continue
            meta_raw = _read_local(os.path.join(root, name, META_FILE))
            path = os.path.join(root, name)
        else:
            if not _is_whole_remote(fs, f"{root}/{name}"):
                log.warning("skipping %s: not a whole checkpoint (its copy was cut short)", path)
                continue
            try:
                with fs.open_input_stream(f"{root}/{name}/{META_FILE}") as f:
                    meta_raw = f.read()
            except OSError:
                meta_raw = None
        try:
            meta = json.loads(meta_raw) if meta_raw else {}
        except ValueError:
            meta = {}
        found.append(Found(path, int(m.group(1)), meta))
    return sorted(found, key=lambda f: f.epoch)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local directory holding the checkpoint at `path`: itself when local, else a temporary download."""
    fs, fs_path = _filesystem(path)
    if fs is None:
        yield fs_path
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="vggdist-ckpt-") as tmp:
        pafs.copy_files(fs_path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


def load(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """`vggdist.checkpoint.load` of a checkpoint at a local path or a URI (`s3://…`, downloaded first): what
    resume, `--init-from` and `vggdist evaluate` read, wherever the run's storage is."""
    from vggdist import checkpoint as ckpt

    with local_copy(path) as d:
        return ckpt.load(d, map_location=map_location)


def load_config(path: str):
    """The Config stored in the checkpoint at a local path or a URI."""
    from vggdist.config import Config

    return Config.from_dict(load(path)["config"])


def read_meta(path: str) -> dict[str, Any]:
    """meta.json of the checkpoint at a local path or a URI (only that file is read); {} when it has none."""
    fs, fs_path = _filesystem(path)
    if fs is None:
        f = Path(fs_path) / META_FILE
        return json.loads(f.read_text()) if f.is_file() else {}
    try:
        with fs.open_input_stream(f"{fs_path.rstrip('/')}/{META_FILE}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return {}


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def latest(run_dir: str) -> Found | None:
    """The newest whole checkpoint of a run directory (None when there is none)."""
    found = whole_checkpoints(run_dir)
    return found[-1] if found else None


def score(metrics: dict[str, float]) -> float:
    """What the kept checkpoints are ranked by: -val top-1 error, or -train top-1 error without validation."""
    return -metrics.get(runmeta.VAL_TOP1_ERR, metrics.get(runmeta.TRAIN_TOP1_ERR, 100.0))


def prune(run_dir: str, keep: int) -> Found | None:
    """Delete all but the `keep` best checkpoints by `score` and the latest; returns the best one kept."""
    found = whole_checkpoints(run_dir)
    if not found:
        return None
    ranked = sorted(found, key=lambda f: (score(f.meta.get("metrics", {})), f.epoch))  # worst first
    doomed = {f.path for f in ranked[:-keep]} - {found[-1].path}
    fs, _ = _filesystem(run_dir)
    for f in found:
        if f.path in doomed:
            _remove(fs, f.path if fs is None else _filesystem(f.path)[1])
    return ranked[-1]
