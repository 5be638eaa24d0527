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
  The walk never leaves ROOT and never opens anything but regular files (`preprocess.folder`).
- **ILSVRC2012_img_train.tar**: a tar of per-class tars ``n01440764.tar`` … each holding ``n01440764_*.JPEG``.
- **ILSVRC2012_img_val.tar**: flat ``ILSVRC2012_val_%08d.JPEG`` with ``--labels``: the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of image i; ``meta.mat`` beside it maps
  ILSVRC2012_ID → WNID, and that order is *not* sorted-wnid order) or Kaggle's ``LOC_val_solution.csv``.

Class indices are always the sorted WordNet ids, so train and val agree with each other and with ImageFolder.
"""

from __future__ import annotations

import csv
import errno
import itertools
import logging
import os
import re
import stat
import tarfile
from pathlib import Path

from preprocess.folder import list_image_folder
from preprocess.images import MAX_FILE_BYTES, Rejected
from preprocess.listing import (  # noqa: F401 (re-exported: the listing's vocabulary)
    ClassInfo,
    Item,
    Listing,
    SourceError,
    kind,
    reject,
    sanitize_key,
    unique_keys,
)

log = logging.getLogger(__name__)

_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


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
                raise Rejected("not_regular_file", f"{kind(st.st_mode)}, not a regular file")
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
        raise SourceError(f"--source {path} is neither a directory nor a tar archive (a {kind(path)})")
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
    return reject(source, "too_large", f"{size:,} bytes, above --max-file-bytes {max_file_bytes:,}; not read")


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
                    reject(where, "unexpected_member", "not a per-class .tar inside the train tar")
                )
                continue
            wnid = Path(m.name).name[: -len(".tar")]
            wnids.add(wnid)
            try:
                inner = tarfile.open(fileobj=_Slice(f, m.offset_data, m.size), mode="r:")
                inner_members = [im for im in inner if not im.isdir()]
            except tarfile.TarError as e:
                rejects.append(reject(where, "undecodable", f"inner tar cannot be read ({e})"))
                continue
            for im in sorted(inner_members, key=lambda im: im.name):
                src = f"{where}/{im.name}"
                if not im.isfile():
                    rejects.append(
                        reject(src, "not_regular_file", "tar member is a link or device, not a file")
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
    return Listing("train_tar", str(path), classes, unique_keys(items), rejects)


def list_val_tar(path: Path, labels: Path, max_file_bytes: int = MAX_FILE_BYTES) -> Listing:
    classes, label_of = read_val_labels(labels)
    items, rejects = [], []
    with tarfile.open(path, "r:") as tf:
        members = sorted((m for m in tf if not m.isdir()), key=lambda m: m.name)
    for m in members:
        src = f"{path}/{m.name}"
        if not m.isfile():
            rejects.append(reject(src, "not_regular_file", "tar member is a link or device, not a file"))
            continue
        stem = Path(m.name).name.rsplit(".", 1)[0]
        wnid = label_of.get(stem)
        if wnid is None:
            rejects.append(reject(src, "no_label", f"{stem} is not in {labels.name}"))
            continue
        if (big := _too_large(src, m.size, max_file_bytes)) is not None:
            rejects.append(big)
            continue
        items.append(Item(sanitize_key(stem), wnid, src, str(path), m.offset_data, m.size))
    return Listing("val_tar", str(path), classes, unique_keys(items), rejects)


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
