"""What listing a source yields: :class:`Item` s (a key, a class and the byte range holding the image) and
the inputs refused before decoding, as a :class:`Listing`; the vocabulary `preprocess.sources` and
`preprocess.folder` share."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class SourceError(Exception):
    """A source or label file that cannot be used as given; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Item:
    """One input file: its sample key, class, a path for people, and the byte range holding its data."""

    key: str
    wnid: str
    source: str  # shown in json / rejects: a file path, or "<tar path>/<member>[/<inner member>]"
    path: str  # absolute path of the file to read
    offset: int = 0
    size: int = -1  # -1: the whole file


@dataclass(frozen=True)
class ClassInfo:
    wnid: str
    name: str


@dataclass
class Listing:
    kind: str  # "image_folder" | "train_tar" | "val_tar"
    source: str
    classes: list[ClassInfo]  # sorted by wnid; position = class index
    items: list[Item]  # every readable input, in a deterministic order
    rejects: list[dict] = field(default_factory=list)  # inputs refused before decoding (no label, not a file)

    @property
    def class_index(self) -> dict[str, int]:
        return {c.wnid: i for i, c in enumerate(self.classes)}

    @property
    def num_inputs(self) -> int:
        return len(self.items) + len(self.rejects)


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots (they separate key and extension) and no slashes."""
    return _KEY_UNSAFE.sub("_", text)


def unique_keys(items: list[Item]) -> list[Item]:
    """Sanitising can map two names to one key ("a.b.jpg", "a_b.jpg"): give colliding keys a hash of the source."""
    seen: dict[str, int] = {}
    for it in items:
        seen[it.key] = seen.get(it.key, 0) + 1
    out = []
    for it in items:
        if seen[it.key] > 1:
            digest = hashlib.sha1(it.source.encode()).hexdigest()[:10]
            it = Item(f"{it.key}_{digest}", it.wnid, it.source, it.path, it.offset, it.size)
        out.append(it)
    return out


def kind(what: Path | int) -> str:
    """'a FIFO', 'a socket', … for a path (not following links) or an ``st_mode``."""
    mode = what if isinstance(what, int) else os.lstat(what).st_mode
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def reject(source: str, reason: str, detail: str) -> dict:
    return {"source": source, "reason": reason, "detail": detail}
