"""Where the images come from: an image-folder tree or the original ILSVRC-2012 archives, read in place (§4.1 data).

Listing a source gives :class:`Item` s: a stable key, a class (WordNet id or folder name), a readable source path
and a byte range (``path``, ``offset``, ``size``) that any process on any node can read with one ``pread``. Tar
members are never extracted: the offsets of the member data inside the (uncompressed) tar are taken from the
headers, so a 150 GB ``ILSVRC2012_img_train.tar`` is listed by seeking over it and read in place.

Layouts
- **Image folder**: ``ROOT/<class>/…``; every immediate sub-folder is a class (sorted names → indices 0…K-1,
  as torchvision's ImageFolder). Files at *any depth* inside a class folder belong to that class (again as
  ImageFolder, which walks recursively); files directly in ROOT belong to no class and are not inputs (logged).
  Names starting with ``.`` are skipped (``.DS_Store``, ``.ipynb_checkpoints``). Every other file is an input,
  whatever its extension: decoding goes by content, and what does not decode is rejected with a reason.
  The walk never leaves ROOT and never opens anything but regular files:

  - symbolic links are followed only while they stay inside ROOT (a class folder that links out of it is an
    error; a link inside a class folder that leads out is the reject ``outside_source``, never read);
  - each directory is listed once, by its (device, inode): a link or bind mount back to a directory already
    listed (a loop) is skipped with a warning;
  - FIFOs, sockets, devices, broken links and link loops are the reject ``not_regular_file`` (a FIFO would
    block the read for ever);
  - files above ``max_file_bytes`` are the reject ``too_large``, from their size, without being read.
- **ILSVRC2012_img_train.tar**: a tar of per-class tars ``n01440764.tar`` … each holding ``n01440764_*.JPEG``.
- **ILSVRC2012_img_val.tar**: flat ``ILSVRC2012_val_%08d.JPEG`` with ``--labels``: the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of image i; ``meta.mat`` beside it maps
  ILSVRC2012_ID → WNID, and that order is *not* sorted-wnid order) or Kaggle's ``LOC_val_solution.csv``.

Class indices are always the sorted WordNet ids, so train and val agree with each other and with ImageFolder.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import itertools
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from preprocess.images import MAX_FILE_BYTES, Rejected

log = logging.getLogger(__name__)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


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


def read_bytes(item: Item, max_file_bytes: int | None = None) -> bytes:
    """The bytes of one input (a whole file, or a tar member's data read in place)."""
    with ByteReader(max_file_bytes) as reader:
        return reader.read(item)


class ByteReader:
    """Reads many items, keeping one open descriptor per archive (a shard task reads ~1000 members of one tar).

    A whole file is opened without following a final symbolic link and without blocking, and read only if it
    is (still) a regular file of at most ``max_file_bytes``: otherwise :class:`~preprocess.images.Rejected`
    (``not_regular_file``, ``too_large``), as the listing would have said. Any other ``OSError`` is the storage
    failing, not the image, and is left to the caller.
    """

    def __init__(self, max_file_bytes: int | None = None) -> None:
        self._fds: dict[str, int] = {}
        self._max = max_file_bytes

    def read(self, item: Item) -> bytes:
        if item.size < 0:
            return self._read_file(item)
        fd = self._fds.get(item.path)
        if fd is None:
            fd = self._fds[item.path] = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, item.size, item.offset)
        if len(data) != item.size:
            raise OSError(
                f"{item.source}: read {len(data)} of {item.size} bytes (archive changed or truncated?)"
            )
        return data

    def _read_file(self, item: Item) -> bytes:
        try:
            fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Rejected(
                    "not_regular_file", f"{item.path} became a symbolic link after listing"
                ) from None
            raise
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("not_regular_file", f"{_kind(st.st_mode)}, not a regular file")
            limit = self._max if self._max is not None else -1
            data = f.read(limit + 1 if limit >= 0 else -1)
        if limit >= 0 and len(data) > limit:
            raise Rejected("too_large", f"more than {limit:,} bytes (--max-file-bytes)")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ByteReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots (they separate key and extension) and no slashes."""
    return _KEY_UNSAFE.sub("_", text)


def list_source(
    source: str | Path, labels: str | Path | None = None, max_file_bytes: int = MAX_FILE_BYTES
) -> Listing:
    """List an image folder, a train tar-of-tars or a flat val tar (with ``labels``); see the module docstring."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"--source {source} does not exist")
    path = path.resolve()
    if path.is_dir():
        if labels is not None:
            log.warning("--labels is ignored for an image folder: the class is the folder name")
        return list_image_folder(path, max_file_bytes)
    if not path.is_file():
        raise SourceError(f"--source {path} is neither a directory nor a tar archive (a {_kind(path)})")
    if not tarfile.is_tarfile(path):
        raise SourceError(f"--source {path} is neither a directory nor a tar archive")
    try:
        with tarfile.open(path, "r:") as tf:
            first = [m for m in itertools.islice(tf, 50) if m.isfile()]
    except tarfile.ReadError:
        raise SourceError(
            f"--source {path} is a compressed tar; the ILSVRC tars are plain tars — decompress it (e.g. gunzip) first"
        ) from None
    if any(m.name.endswith(".tar") for m in first):
        if labels is not None:
            log.warning("--labels is ignored for a tar of per-class tars: the class is the inner tar's name")
        return list_train_tar(path, max_file_bytes)
    if labels is None:
        raise SourceError(
            f"--source {path} is a flat tar of images: pass --labels (ILSVRC2012_validation_ground_truth.txt "
            "with meta.mat beside it, or LOC_val_solution.csv)"
        )
    return list_val_tar(path, Path(labels).expanduser().resolve(), max_file_bytes)


def _kind(what: Path | int) -> str:
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


@dataclass(frozen=True)
class _Entry:
    """A directory entry as the walk sees it: where it really is (links resolved) and what it is."""

    shown: Path  # the path as found under ROOT (through links), used for keys and `source`
    real: str  # the path with every link resolved (inside ROOT), used for reading
    st: os.stat_result | None  # of `real`; None when it cannot be followed
    problem: tuple[str, str] | None = None  # (reject reason, detail) when it must not be followed


def _entry(shown: Path, root: str) -> _Entry:
    """Follow ``shown`` if it is a link, refusing links that leave ``root``, dangle or loop (nothing is opened)."""
    st = os.lstat(shown)
    if not stat.S_ISLNK(st.st_mode):
        return _Entry(shown, str(shown), st)
    real = os.path.realpath(shown)
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
    """The image-folder walk: one class at a time, each directory once (by device and inode), inside ROOT."""

    def __init__(self, root: Path, max_file_bytes: int) -> None:
        self.root, self.max_file_bytes = str(root), max_file_bytes
        self.items: list[Item] = []
        self.rejects: list[dict] = []
        self.seen: dict[tuple[int, int], Path] = {}
        self.loops = 0

    def first_visit(self, e: _Entry) -> bool:
        ident = (e.st.st_dev, e.st.st_ino)
        if ident in self.seen:
            return False
        self.seen[ident] = e.shown
        return True

    def walk_class(self, class_dir: Path, real: str) -> None:
        """Files of a directory first (sorted), then its sub-directories (sorted), depth first: os.walk's order."""
        stack = [(class_dir, real)]
        while stack:
            shown_dir, real_dir = stack.pop()
            names = sorted(n for n in os.listdir(real_dir) if not n.startswith("."))
            subdirs = []
            for name in names:
                e = _entry(Path(real_dir) / name, self.root)
                e = _Entry(shown_dir / name, e.real, e.st, e.problem)
                if e.st is not None and stat.S_ISDIR(e.st.st_mode):
                    subdirs.append(e)
                else:
                    self._file(class_dir, e)
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

    def _file(self, class_dir: Path, e: _Entry) -> None:
        source = str(e.shown)
        if e.problem is not None:
            self.rejects.append(_reject(source, *e.problem))
        elif not stat.S_ISREG(e.st.st_mode):
            self.rejects.append(_reject(source, "not_regular_file", f"{_kind(e.st.st_mode)}, never opened"))
        elif e.st.st_size > self.max_file_bytes:
            detail = f"{e.st.st_size:,} bytes, above --max-file-bytes {self.max_file_bytes:,}; not read"
            self.rejects.append(_reject(source, "too_large", detail))
        else:
            rel = e.shown.relative_to(class_dir).as_posix()
            stem = rel.rsplit(".", 1)[0] if "." in e.shown.name else rel
            key = sanitize_key(f"{class_dir.name}_{stem}")
            self.items.append(Item(key=key, wnid=class_dir.name, source=source, path=e.real))


def list_image_folder(root: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Listing:
    walk = _Walk(root, max_file_bytes)
    walk.first_visit(_entry(root, str(root)))
    class_dirs, loose = [], []
    for name in sorted(os.listdir(root)):
        if name.startswith("."):
            continue
        e = _entry(root / name, str(root))
        if e.problem is not None and e.problem[0] == "outside_source" and os.path.isdir(e.real):
            raise SourceError(
                f"--source {root}: class folder {name} is a symbolic link to {e.real}, outside --source; links "
                "are not followed out of the source root: pass a directory that holds the class folders "
                "themselves (a bind mount works), or remove the link"
            )
        if e.st is None or not stat.S_ISDIR(e.st.st_mode):
            loose.append(name)
        elif not walk.first_visit(e):
            raise SourceError(
                f"--source {root}: class folders {walk.seen[(e.st.st_dev, e.st.st_ino)].name} and {name} are "
                "the same directory (a link); remove one"
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
        walk.walk_class(e.shown, e.real)
    if walk.loops:
        log.warning(
            "%d directory link(s) led back to directories already listed; each was listed once", walk.loops
        )
    classes = [ClassInfo(e.shown.name, e.shown.name) for e in class_dirs]
    return Listing("image_folder", str(root), classes, _unique_keys(walk.items), walk.rejects)


def _unique_keys(items: list[Item]) -> list[Item]:
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


class _Slice:
    """A read-only window [start, start + size) of an open file, so tarfile can list an inner tar in place."""

    def __init__(self, f, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data


def _too_large(source: str, size: int, max_file_bytes: int) -> dict | None:
    if size <= max_file_bytes:
        return None
    return _reject(
        source, "too_large", f"{size:,} bytes, above --max-file-bytes {max_file_bytes:,}; not read"
    )


def list_train_tar(path: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Listing:
    items: list[Item] = []
    rejects: list[dict] = []
    wnids: set[str] = set()
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
        members = [m for m in outer if not m.isdir()]
        for m in sorted(members, key=lambda m: m.name):
            where = f"{path}/{m.name}"
            if not m.isfile() or not m.name.endswith(".tar"):
                rejects.append(
                    _reject(where, "unexpected_member", "not a per-class .tar inside the train tar")
                )
                continue
            wnid = Path(m.name).name[: -len(".tar")]
            wnids.add(wnid)
            try:
                inner = tarfile.open(fileobj=_Slice(f, m.offset_data, m.size), mode="r:")
                inner_members = [im for im in inner if not im.isdir()]
            except tarfile.TarError as e:
                rejects.append(_reject(where, "undecodable", f"inner tar cannot be read ({e})"))
                continue
            for im in sorted(inner_members, key=lambda im: im.name):
                src = f"{where}/{im.name}"
                if not im.isfile():
                    rejects.append(
                        _reject(src, "not_regular_file", "tar member is a link or device, not a file")
                    )
                    continue
                if (big := _too_large(src, im.size, max_file_bytes)) is not None:
                    rejects.append(big)
                    continue
                stem = Path(im.name).name.rsplit(".", 1)[0]
                items.append(
                    Item(sanitize_key(stem), wnid, src, str(path), m.offset_data + im.offset_data, im.size)
                )
    if not wnids:
        raise SourceError(f"--source {path} holds no per-class .tar members")
    classes = [ClassInfo(w, w) for w in sorted(wnids)]
    return Listing("train_tar", str(path), classes, _unique_keys(items), rejects)


def list_val_tar(path: Path, labels: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Listing:
    classes, label_of = read_val_labels(labels)
    items, rejects = [], []
    with tarfile.open(path, "r:") as tf:
        members = sorted((m for m in tf if not m.isdir()), key=lambda m: m.name)
    for m in members:
        src = f"{path}/{m.name}"
        if not m.isfile():
            rejects.append(_reject(src, "not_regular_file", "tar member is a link or device, not a file"))
            continue
        stem = Path(m.name).name.rsplit(".", 1)[0]
        wnid = label_of.get(stem)
        if wnid is None:
            rejects.append(_reject(src, "no_label", f"{stem} is not in {labels.name}"))
            continue
        if (big := _too_large(src, m.size, max_file_bytes)) is not None:
            rejects.append(big)
            continue
        items.append(Item(sanitize_key(stem), wnid, src, str(path), m.offset_data, m.size))
    return Listing("val_tar", str(path), classes, _unique_keys(items), rejects)


def read_val_labels(labels: Path) -> tuple[list[ClassInfo], dict[str, str]]:
    """(classes sorted by wnid, image stem → wnid) from the devkit ground truth + meta.mat, or LOC_val_solution.csv."""
    if labels.is_dir():  # the unpacked devkit: <dir>/data/… or the files directly in <dir>
        for d in (labels / "data", labels):
            if (d / "ILSVRC2012_validation_ground_truth.txt").is_file():
                labels = d / "ILSVRC2012_validation_ground_truth.txt"
                break
        else:
            raise SourceError(
                f"--labels {labels}: no ILSVRC2012_validation_ground_truth.txt in it or in its data/"
            )
    if not labels.is_file():
        raise SourceError(f"--labels {labels} does not exist")
    if labels.suffix.lower() == ".csv":
        return _read_loc_csv(labels)
    return _read_devkit(labels)


def _read_devkit(ground_truth: Path) -> tuple[list[ClassInfo], dict[str, str]]:
    meta = ground_truth.parent / "meta.mat"
    if not meta.is_file():
        raise SourceError(
            f"--labels {ground_truth}: meta.mat must sit beside it (both are in the devkit's data/)"
        )
    synsets = read_meta_mat(meta)  # ILSVRC2012_ID → (wnid, words)
    label_of = {}
    for number, line in enumerate(ground_truth.read_text().split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in synsets:
            raise SourceError(
                f"{ground_truth} line {number}: ILSVRC2012_ID {ilsvrc_id} is not a class in {meta}"
            )
        label_of[f"ILSVRC2012_val_{number:08d}"] = synsets[ilsvrc_id][0]
    classes = sorted((ClassInfo(w, words) for w, words in synsets.values()), key=lambda c: c.wnid)
    return classes, label_of


def read_meta_mat(meta: Path) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID → (WNID, words) for the leaf classes (num_children == 0) of the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:  # scipy comes with mlflow / scikit-learn; say what to do if it is missing
        raise SourceError(
            "reading meta.mat needs scipy: pip install scipy (or pass LOC_val_solution.csv)"
        ) from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    out = {}
    for s in synsets:
        if "num_children" in synsets.dtype.names and int(s["num_children"]) != 0:
            continue
        out[int(s["ILSVRC2012_ID"])] = (str(s["WNID"]), str(s["words"]))
    return out


def _read_loc_csv(path: Path) -> tuple[list[ClassInfo], dict[str, str]]:
    label_of = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise SourceError(
                f"--labels {path}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)"
            )
        for row in reader:
            tokens = row["PredictionString"].split()
            if tokens:  # "n01751748 x0 y0 x1 y1 n01751748 …": every box has the image's class
                label_of[row["ImageId"]] = tokens[0]
    names = {}
    mapping = path.parent / "LOC_synset_mapping.txt"  # Kaggle's "n01440764 tench, Tinca tinca" lines
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            if line.strip():
                wnid, _, words = line.partition(" ")
                names[wnid] = words.strip()
    wnids = sorted(set(names) | set(label_of.values()))
    return [ClassInfo(w, names.get(w, w)) for w in wnids], label_of


def _reject(source: str, reason: str, detail: str) -> dict:
    return {"source": source, "reason": reason, "detail": detail}
