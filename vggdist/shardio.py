"""Reading and writing WebDataset tar shards, fast: the first stage of every loader in vggdist.data, and the
shard writer of `vggdist-preprocess`.

``webdataset.tarfile_to_samples`` goes through Python's `tarfile`, which parses each 512-byte header field by
field, a visible share of a training worker's time once JPEG decoding is cheap (bench/loader.py measures it).
Shards are plain uncompressed tars, so `tar_samples` reads local shard files itself: one ``read`` per header,
the numeric fields parsed straight from the header bytes, the header checksum verified, and the same grouping
rule as webdataset (members with the same key in a row form one sample; key = the path up to the first dot of
the file name, extension lower-cased). It yields exactly what ``webdataset.tarfile_to_samples`` yields for
the same shard (`{"__key__", "__url__", ext: bytes, ...}`; tests compare the two), understands the ustar name
prefix, pax ``path`` records and GNU long names, and skips directories, other non-file members and
webdataset's ``__…__`` metadata members.
Anything that is not a local file (``pipe:…``, ``s3://…``, ``http…``) goes to webdataset unchanged.

`TarWriter` writes what ``tarfile.open(mode="w", format=tarfile.PAX_FORMAT)`` writes for the same members (mode
0644, mtime 0, no owners), byte for byte (tests compare), at ~10 µs instead of ~120 µs per member: short ASCII
names fill a header template; anything else (long or non-ASCII names) gets tarfile's own pax header.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator

__all__ = ["TarError", "TarWriter", "iter_members", "tar_samples"]

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (old, ustar, contiguous)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members (e.g. __index__)


class TarError(ValueError):
    """A shard that is not a well-formed tar (bad checksum, truncated member, bad size field)."""


def _number(field: bytes, what: str, url: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"{url}: bad {what} field {field!r} in a tar header") from None


def iter_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in an uncompressed tar stream, in order.

    Whatever the bytes, this ends: every header advances the stream by at least one block, member data is read in
    bounded chunks (a corrupt size field cannot make it allocate more than the stream holds), and a malformed
    pax record raises `TarError` naming the shard and the member.
    """
    long_name: str | None = None
    offset = 0  # of the current header in the stream, for messages
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            if header:
                raise TarError(
                    f"{url}: truncated tar header; re-run preprocessing or `vggdist-preprocess verify`"
                )
            return
        if header.count(0) == _BLOCK:  # end-of-archive marker
            return
        stored = _number(header[148:156], "checksum", url)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # checksum field counted as spaces
            raise TarError(
                f"{url}: tar header checksum mismatch; the shard is corrupt (`vggdist-preprocess verify`)"
            )
        size = _number(header[124:136], "size", url)
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise TarError(f"{url}: truncated member ({len(data)} of {size} bytes)")
        pad = -size % _BLOCK
        if pad and len(stream.read(pad)) < pad:
            raise TarError(f"{url}: truncated member (its padding is cut short)")
        kind = header[156:157]
        if kind in _FILE_TYPES:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and header[345] != 0:
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}"
            yield name, data
        elif kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header for the next member: "<len> <key>=<value>\n" records
            where = f"{url}: pax header {_header_name(header)!r} at byte {offset}"
            long_name = _pax_path(data, where) or long_name
        # directories, links, global pax headers ("g") and the rest carry no sample data
        offset += _BLOCK + size + pad


_CHUNK = 1 << 24  # member data is read in pieces of at most 16 MiB: a corrupt size cannot allocate more


def _read_exactly(stream, size: int) -> bytes:
    """``size`` bytes, or fewer at the end of the stream (never a buffer larger than what the stream holds)."""
    if size <= _CHUNK:
        return stream.read(size)
    parts, left = [], size
    while left:
        part = stream.read(min(left, _CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _header_name(header: bytes) -> str:
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_path(data: bytes, where: str) -> str | None:
    """The ``path`` record of a pax extended header (None if it has none). Records are ``"<len> <key>=<value>\n"``
    with ``<len>`` counting the whole record; anything else raises `TarError` (never loops: each record must
    advance past its own ``<len> k=\n``)."""
    pos, path = 0, None
    while pos < len(data) and data[pos] != 0:  # NUL bytes after the last record are padding
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarError(
                f"{where}: malformed pax record (no length before byte {pos}); the shard is corrupt"
            )
        end = pos + int(digits)
        if end < space + 4 or end > len(data) or data[end - 1] != 0x0A:  # "<len> " + "k=" + "\n" at least
            raise TarError(
                f"{where}: malformed pax record (length {int(digits)} at byte {pos} does not fit the "
                f"{len(data)}-byte header); the shard is corrupt"
            )
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise TarError(
                f"{where}: malformed pax record (no key=value at byte {pos}); the shard is corrupt"
            )
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos = end
    return path


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext, edge cases included


def _split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) by webdataset's rule (key = the path up to the first dot of the file name);
    None for a name it does not split (no extension)."""
    match = _KEY.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    return url if "://" not in url and not url.startswith("pipe:") and os.path.isfile(url) else None


def tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """Samples of each shard in `sources` (dicts with a "url", as webdataset's shard lists): one dict per key."""
    for source in sources:
        url = source["url"]
        path = _local_path(url)
        if path is None:
            import webdataset as wds  # pipe:, s3://, http…; imported here: webdataset loads torch

            yield from wds.tarfile_to_samples()([source])
            continue
        sample: dict | None = None
        with open(path, "rb", buffering=1 << 20) as stream:
            for name, data in iter_members(stream, url):
                split = None if name.startswith("__") and _META.match(name) else _split_key(name)
                if split is None:
                    continue
                key, ext = split
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise TarError(f"{url}: member {name} appears twice in sample {key}")
                sample[ext] = data
        if sample is not None:
            yield sample


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, no owner names: identical bytes on every run
    info.size = size
    info.mode = 0o644
    return info


# tarfile's own header for a short ASCII name; `TarWriter.add` changes only name, size and checksum
_TEMPLATE = _member_info("", 0).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class TarWriter:
    """Regular-file members into an uncompressed tar stream `f` (anything with ``write``)."""

    def __init__(self, f) -> None:
        self._f, self._offset = f, 0

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii", "replace")
        if name.isascii() and len(raw) <= 100 and len(data) < 8**11:
            header = bytearray(_TEMPLATE)
            header[: len(raw)] = raw
            header[124:136] = b"%011o\0" % len(data)
            header[148:156] = b"        "
            header[148:155] = b"%06o\0" % sum(header)
        else:  # a pax header carries the name (or a size of 8 GiB and more), exactly as tarfile writes it
            header = _member_info(name, len(data)).tobuf(
                tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"
            )
        pad = -len(data) % _BLOCK
        self._f.write(header)
        self._f.write(data)
        if pad:
            self._f.write(bytes(pad))
        self._offset += len(header) + len(data) + pad

    def close(self) -> None:
        """The end-of-archive blocks, padded to tarfile's 10 kB record size as tarfile does."""
        end = 2 * _BLOCK + (-(self._offset + 2 * _BLOCK) % tarfile.RECORDSIZE)
        self._f.write(bytes(end))
        self._offset += end

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
