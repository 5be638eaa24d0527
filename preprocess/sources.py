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
- **ILSVRC2012_img_train.tar**: a tar of per-class tars ``n01440764.tar`` … each holding ``n01440764_*.JPEG``.
- **ILSVRC2012_img_val.tar**: flat ``ILSVRC2012_val_%08d.JPEG`` with ``--labels``: the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of image i; ``meta.mat`` beside it maps
  ILSVRC2012_ID → WNID, and that order is *not* sorted-wnid order) or Kaggle's ``LOC_val_solution.csv``.

Class indices are always the sorted WordNet ids, so train and val agree with each other and with ImageFolder.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

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


def read_bytes(item: Item) -> bytes:
    """The bytes of one input (a whole file, or a tar member's data read in place)."""
    with open(item.path, "rb") as f:
        if item.size < 0:
            return f.read()
        return os.pread(f.fileno(), item.size, item.offset)


class ByteReader:
    """Reads many items, keeping one open descriptor per archive (a shard task reads ~1000 members of one tar)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, item: Item) -> bytes:
        if item.size < 0:
            with open(item.path, "rb") as f:
                return f.read()
        fd = self._fds.get(item.path)
        if fd is None:
            fd = self._fds[item.path] = os.open(item.path, os.O_RDONLY)
        data = os.pread(fd, item.size, item.offset)
        if len(data) != item.size:
            raise OSError(
                f"{item.source}: read {len(data)} of {item.size} bytes (archive changed or truncated?)"
            )
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


def list_source(source: str | Path, labels: str | Path | None = None) -> Listing:
    """List an image folder, a train tar-of-tars or a flat val tar (with ``labels``); see the module docstring."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"--source {source} does not exist")
    path = path.resolve()
    if path.is_dir():
        if labels is not None:
            log.warning("--labels is ignored for an image folder: the class is the folder name")
        return list_image_folder(path)
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
        return list_train_tar(path)
    if labels is None:
        raise SourceError(
            f"--source {path} is a flat tar of images: pass --labels (ILSVRC2012_validation_ground_truth.txt "
            "with meta.mat beside it, or LOC_val_solution.csv)"
        )
    return list_val_tar(path, Path(labels).expanduser().resolve())


def list_image_folder(root: Path) -> Listing:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SourceError(f"--source {root} has no class sub-folders (expected ROOT/<class>/<images>)")
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning(
            "%d file(s) directly in %s belong to no class folder and are not inputs", len(loose), root
        )
    items = []
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(class_dir).as_posix()
                stem = rel.rsplit(".", 1)[0] if "." in name else rel
                items.append(
                    Item(
                        key=sanitize_key(f"{class_dir.name}_{stem}"),
                        wnid=class_dir.name,
                        source=str(full),
                        path=str(full),
                    )
                )
    classes = [ClassInfo(d.name, d.name) for d in class_dirs]
    return Listing("image_folder", str(root), classes, _unique_keys(items))


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


def list_train_tar(path: Path) -> Listing:
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
                stem = Path(im.name).name.rsplit(".", 1)[0]
                items.append(
                    Item(sanitize_key(stem), wnid, src, str(path), m.offset_data + im.offset_data, im.size)
                )
    if not wnids:
        raise SourceError(f"--source {path} holds no per-class .tar members")
    classes = [ClassInfo(w, w) for w in sorted(wnids)]
    return Listing("train_tar", str(path), classes, _unique_keys(items), rejects)


def list_val_tar(path: Path, labels: Path) -> Listing:
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
