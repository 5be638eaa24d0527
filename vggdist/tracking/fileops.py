"""The few file operations the tracking spool needs, on a local (or shared) filesystem or an object store.

A spool lives in the run's Ray storage directory, which is a local path, a shared filesystem (NFS, EFS) or a
URI such as `s3://bucket/prefix`. Two implementations of one small interface:

- `LocalFiles`: plain paths. Appends go straight to the kernel (one `write` per record), `fsync` makes them
  durable, and small state files are replaced atomically with `os.replace`.
- `ArrowFiles`: any `pyarrow.fs` URI (`s3://…`, `gs://…`, `file://…`). Objects cannot be appended to, so
  `appendable` is False and the spool writes each batch of records as a new immutable segment object; a PUT
  replaces a state object atomically (`file://` goes the same way, without that atomicity: tests use it).

Paths handed to either are strings in that filesystem's own form (what `files_for` returns).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from functools import lru_cache
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit


class Files(Protocol):
    appendable: bool

    def join(self, *parts: str) -> str: ...

    def makedirs(self, path: str) -> None: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> dict[str, int | None]:
        """{name: size in bytes, or None for a directory}; {} when `path` does not exist."""
        ...

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes from `offset` (to the end, or `length` of them); None when the file does not exist."""
        ...

    def write_atomic(self, path: str, data: bytes, durable: bool = False) -> None:
        """Replace `path` with `data` so that readers see the old or the new content, never a mix."""
        ...

    def remove(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def copy_in(self, src: str, dst: str) -> None:
        """Copy a local file or directory tree to `dst` durably (fsync'd / uploaded) before returning."""
        ...

    def local_copy(self, path: str, tmp_dir: str) -> str:
        """A local path holding the file or tree at `path` (itself when local; else downloaded into tmp_dir)."""
        ...


class LocalFiles:
    """Plain paths of this machine, including shared filesystems mounted here."""

    appendable = True

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        out[e.name] = None if e.is_dir() else e.stat().st_size
                    except FileNotFoundError:  # removed while listing
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return out

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return None

    def write_atomic(self, path: str, data: bytes, durable: bool = False) -> None:
        d = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if durable:
            fsync_dir(d)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def copy_in(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst)
            for root, _dirs, files in os.walk(dst):
                for name in files:
                    _fsync_file(os.path.join(root, name))
                fsync_dir(root)
        else:
            shutil.copyfile(src, dst)
            _fsync_file(dst)
        fsync_dir(os.path.dirname(dst))

    def local_copy(self, path: str, tmp_dir: str) -> str:
        return path


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the names in directory `path` (files created or renamed there) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; nothing more can be done there
        pass
    finally:
        os.close(fd)


class ArrowFiles:
    """A `pyarrow.fs.FileSystem` (S3, GCS, ...): whole-object writes only, no appends."""

    appendable = False

    def __init__(self, fs) -> None:
        self.fs = fs

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def _info(self, path: str):
        return self.fs.get_file_info(path)

    def exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> dict[str, int | None]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        return {
            i.base_name: (None if i.type == pafs.FileType.Directory else i.size)
            for i in infos
            if i.type != pafs.FileType.NotFound
        }

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes | None:
        if not self.exists(path):
            return None
        with self.fs.open_input_file(path) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def write_atomic(self, path: str, data: bytes, durable: bool = False) -> None:
        with self.fs.open_output_stream(path) as f:  # an object PUT: all or nothing
            f.write(data)

    def remove(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def remove_tree(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def copy_in(self, src: str, dst: str) -> None:
        import pyarrow.fs as pafs

        self.fs.create_dir(posixpath.dirname(dst), recursive=True)  # a no-op on object stores
        pafs.copy_files(src, dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def local_copy(self, path: str, tmp_dir: str) -> str:
        import pyarrow.fs as pafs

        dst = os.path.join(tmp_dir, posixpath.basename(path.rstrip("/")))
        pafs.copy_files(path, dst, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return dst


@lru_cache(maxsize=16)
def _arrow_fs(uri_root: str):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(uri_root)
    return fs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join_path(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a local path or a URI (a URI's `?query`, e.g. `?endpoint_override=…`, stays last)."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *names)
    u = urlsplit(base)
    return urlunsplit((u.scheme, u.netloc, "/".join([u.path.rstrip("/"), *names]), u.query, u.fragment))


def files_for(path: str | os.PathLike) -> tuple[Files, str]:
    """(the Files for `path`, `path` in that filesystem's form). A URI goes through pyarrow.fs."""
    path = os.fspath(path)
    if not is_uri(path):
        return LocalFiles(), os.path.abspath(os.path.expanduser(path))
    import pyarrow.fs as pafs

    u = urlsplit(path)
    # one filesystem object per bucket (or host) and options such as ?endpoint_override=...
    root = (
        "file:///" if u.scheme == "file" else f"{u.scheme}://{u.netloc}" + (f"?{u.query}" if u.query else "")
    )
    _, fs_path = pafs.FileSystem.from_uri(path)
    return ArrowFiles(_arrow_fs(root)), fs_path.rstrip("/")
