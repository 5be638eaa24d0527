"""The image-folder layout ``ROOT/<class>/…`` walked so that the listing never leaves ROOT and never opens
anything but regular files (§4.1 data).

Every immediate sub-folder of ROOT is a class; files at any depth inside it belong to it (as torchvision's
ImageFolder); names starting with ``.`` are skipped; files directly in ROOT are not inputs. Nothing is opened
while walking: each entry is ``lstat``-ed, and

- symbolic links are followed only while they stay inside ROOT (a class folder that links out of it is an
  error; a link inside a class folder that leads out is the reject ``outside_source``, never read);
- each directory is listed once, by its (device, inode): a link or bind mount back to a directory already
  listed (a loop) is skipped with a warning;
- FIFOs, sockets, devices, broken links and link loops are the reject ``not_regular_file`` (a FIFO would
  block the read for ever);
- files above ``max_file_bytes`` are the reject ``too_large``, from their size, without being read.

Items are listed in os.walk's order (a directory's files sorted, then its sub-directories sorted, depth first)
and read later through the path with every link resolved, so a link swapped after listing cannot lead out.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from preprocess.images import MAX_FILE_BYTES
from preprocess.listing import ClassInfo, Item, Listing, SourceError, kind, reject, sanitize_key, unique_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    """A directory entry as the walk sees it: where it really is (links resolved) and what it is."""

    shown: str  # the path as found under ROOT (through links), used for keys and `source`
    real: str  # the path with every link resolved (inside ROOT), used for reading
    st: os.stat_result | None  # of `real` (for a plain file: its lstat); None when it cannot be followed
    problem: tuple[str, str] | None = None  # (reject reason, detail) when it must not be followed


def _entry(shown: str, path: str, root: str, st: os.stat_result) -> _Entry:
    """``path`` (shown to people as ``shown``) with lstat ``st``, followed if it is a link; links that leave
    ``root``, dangle or loop are refused (nothing is opened)."""
    if not stat.S_ISLNK(st.st_mode):
        return _Entry(shown, path, st)
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        return _Entry(shown, real, None, ("outside_source", f"symbolic link to {real}, outside --source"))
    try:
        return _Entry(shown, real, os.stat(real))
    except FileNotFoundError:
        return _Entry(shown, real, None, ("not_regular_file", f"broken symbolic link (to {real})"))
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        return _Entry(shown, real, None, ("not_regular_file", "symbolic link loop"))


class _Walk:
    """The image-folder walk: one class at a time, each directory once (by device and inode), inside ROOT.

    Plain strings and ``os.scandir`` (one ``lstat`` per entry, cached by the directory entry): a million files
    list in well under a minute."""

    def __init__(self, root: str, max_file_bytes: int) -> None:
        self.root, self.max_file_bytes = root, max_file_bytes
        self.items: list[Item] = []
        self.rejects: list[dict] = []
        self.seen: dict[tuple[int, int], str] = {}
        self.loops = 0

    def first_visit(self, e: _Entry) -> bool:
        ident = (e.st.st_dev, e.st.st_ino)
        if ident in self.seen:
            return False
        self.seen[ident] = e.shown
        return True

    def entries(self, shown_dir: str, real_dir: str) -> list[_Entry]:
        """The entries of a directory, sorted by name, dot-names skipped, links followed inside ROOT only."""
        with os.scandir(real_dir) as it:
            found = sorted((d for d in it if not d.name.startswith(".")), key=lambda d: d.name)
        return [
            _entry(f"{shown_dir}/{d.name}", d.path, self.root, d.stat(follow_symlinks=False)) for d in found
        ]

    def walk_class(self, cls: _Entry) -> None:
        """Files of a directory first (sorted), then its sub-directories (sorted), depth first: os.walk's order."""
        wnid = os.path.basename(cls.shown)
        stack = [(cls.shown, cls.real)]
        while stack:
            shown_dir, real_dir = stack.pop()
            subdirs = []
            for e in self.entries(shown_dir, real_dir):
                if e.st is not None and stat.S_ISDIR(e.st.st_mode):
                    subdirs.append(e)
                else:
                    self._file(wnid, len(cls.shown) + 1, e)
            for e in reversed(subdirs):
                if self.first_visit(e):
                    stack.append((e.shown, e.real))
                else:
                    self.loops += 1
                    log.warning(
                        "%s: already listed as %s (a link or mount loop); skipped",
                        e.shown,
                        self.seen[(e.st.st_dev, e.st.st_ino)],
                    )

    def _file(self, wnid: str, skip: int, e: _Entry) -> None:
        if e.problem is not None:
            self.rejects.append(reject(e.shown, *e.problem))
        elif not stat.S_ISREG(e.st.st_mode):
            self.rejects.append(reject(e.shown, "not_regular_file", f"{kind(e.st.st_mode)}, never opened"))
        elif e.st.st_size > self.max_file_bytes:
            detail = f"{e.st.st_size:,} bytes, above --max-file-bytes {self.max_file_bytes:,}; not read"
            self.rejects.append(reject(e.shown, "too_large", detail))
        else:
            rel = e.shown[skip:]  # the path inside the class folder
            stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
            self.items.append(Item(sanitize_key(f"{wnid}_{stem}"), wnid, e.shown, e.real))


def list_image_folder(root: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Listing:
    top = str(root)
    walk = _Walk(top, max_file_bytes)
    walk.first_visit(_entry(top, top, top, os.stat(top)))
    class_dirs, loose = [], []
    for e in walk.entries(top, top):
        name = os.path.basename(e.shown)
        if e.problem is not None and e.problem[0] == "outside_source" and os.path.isdir(e.real):
            raise SourceError(
                f"--source {root}: class folder {name} is a symbolic link to {e.real}, outside --source; links "
                "are not followed out of the source root: pass a directory that holds the class folders "
                "themselves (a bind mount works), or remove the link"
            )
        if e.st is None or not stat.S_ISDIR(e.st.st_mode):
            loose.append(name)
        elif not walk.first_visit(e):
            first = os.path.basename(walk.seen[(e.st.st_dev, e.st.st_ino)])
            raise SourceError(
                f"--source {root}: class folders {first} and {name} are the same directory (a link); remove one"
            )
        else:
            class_dirs.append(e)
    if not class_dirs:
        raise SourceError(f"--source {root} has no class sub-folders (expected ROOT/<class>/<images>)")
    if loose:
        log.warning(
            "%d file(s) directly in %s belong to no class folder and are not inputs", len(loose), root
        )
    for e in class_dirs:
        walk.walk_class(e)
    if walk.loops:
        log.warning(
            "%d directory link(s) led back to directories already listed; each was listed once", walk.loops
        )
    classes = [ClassInfo(os.path.basename(e.shown), os.path.basename(e.shown)) for e in class_dirs]
    return Listing("image_folder", top, classes, unique_keys(walk.items), walk.rejects)
