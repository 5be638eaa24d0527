"""vggdist.shardio: the fast tar reader yields exactly what webdataset.tarfile_to_samples yields."""

from __future__ import annotations

import contextlib
import io
import signal
import tarfile

import pytest
import webdataset as wds

from vggdist.shardio import TarError, iter_members, tar_samples


def _add(tar: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def _shard(path, fmt=tarfile.PAX_FORMAT, extra=()) -> str:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(5):
            key = f"n0144_{i:05d}"
            _add(tar, f"{key}.jpg", bytes([i]) * (100 + 700 * i))  # sizes across block boundaries
            _add(tar, f"{key}.cls", str(i).encode())
            _add(tar, f"{key}.JSON", b"{}")  # extension lower-cased, as webdataset does
        for name, data in extra:
            _add(tar, name, data)
    return str(path)


def _wds(url: str) -> list[dict]:
    return list(wds.tarfile_to_samples()([{"url": url}]))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    long_dir = "d" * 120  # needs the ustar prefix, a GNU long name or a pax path, depending on the format
    extra = [
        (f"{long_dir}/n0145_00001.jpg", b"x" * 600),
        (f"{long_dir}/n0145_00001.cls", b"7"),
        ("__index__", b"meta"),  # webdataset skips these
        ("README", b"no extension"),
        ("sub/.hidden", b"key sub/"),  # webdataset's regex makes "sub/" the key here
        ("a.b/.c", b"no key"),
        ("n0146.v2.tar.gz", b"multi-dot extension"),
    ]
    url = _shard(tmp_path / "s.tar", fmt, extra)
    ours = list(tar_samples([{"url": url}]))
    assert ours == _wds(url)
    assert [s["__key__"] for s in ours][-3:] == [f"{long_dir}/n0145_00001", "sub/", "n0146"]
    assert ours[0]["json"] == b"{}" and ours[-1]["v2.tar.gz"] == b"multi-dot extension"


def test_samples_do_not_merge_across_shards_and_non_files_are_skipped(tmp_path):
    a = _shard(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        d = tarfile.TarInfo("n0144_00004")  # a directory whose name equals a key of shard a's last sample
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        _add(tar, "n0144_00004.txt", b"second shard")
        _add(tar, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="n0144_00004.txt")
    b = str(tmp_path / "b.tar")
    ours = list(tar_samples([{"url": a}, {"url": b}]))
    assert ours == _wds(a) + _wds(b)
    assert ours[-1] == {"__key__": "n0144_00004", "__url__": b, "txt": b"second shard"}


def test_corrupt_and_truncated_shards_raise(tmp_path):
    url = _shard(tmp_path / "s.tar")
    raw = bytearray(open(url, "rb").read())
    raw[10] ^= 0xFF  # a name byte of the first header: checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(raw))
    with pytest.raises(TarError, match="checksum mismatch"):
        list(tar_samples([{"url": str(tmp_path / "bad.tar")}]))
    good = open(url, "rb").read()
    (tmp_path / "short.tar").write_bytes(good[:1000])
    with pytest.raises(TarError, match="truncated member"):
        list(tar_samples([{"url": str(tmp_path / "short.tar")}]))
    with pytest.raises(TarError, match="truncated tar header"):
        list(iter_members(io.BytesIO(good[: 512 + 512 + 100]), "x"))  # first member whole, then 100 bytes


def test_duplicate_member_in_a_sample_is_an_error(tmp_path):
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        _add(tar, "k.jpg", b"1")
        _add(tar, "k.jpg", b"2")
    with pytest.raises(TarError, match="appears twice"):
        list(tar_samples([{"url": str(tmp_path / "dup.tar")}]))


def test_non_local_urls_go_to_webdataset(tmp_path):
    url = _shard(tmp_path / "s.tar")
    assert list(tar_samples([{"url": f"pipe:cat {url}"}])) == [
        {**s, "__url__": f"pipe:cat {url}"} for s in _wds(url)
    ]
    assert list(tar_samples([{"url": f"file://{url}"}])) == [
        {**s, "__url__": f"file://{url}"} for s in _wds(url)
    ]


def test_tar_writer_writes_what_tarfile_writes_byte_for_byte(tmp_path):
    from vggdist.shardio import TarWriter

    members = [
        ("n01440764_10026.jpg", b"\xff\xd8" + bytes(range(256)) * 40),  # crosses block boundaries
        ("n01440764_10026.cls", b"0"),
        ("n01440764_10026.json", b'{"wnid": "n01440764"}'),
        ("empty.txt", b""),
        ("exactly512.bin", b"x" * 512),
        ("a" * 100 + ".jpg", b"long name: pax header"),
        ("x" * 96 + ".cls", b"exactly 100 bytes of name"),
        ("caf\u00e9/\u00e9t\u00e9_1.jpg", b"non-ASCII: pax header"),
    ]
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    ours = io.BytesIO()
    with TarWriter(ours) as w:
        for name, data in members:
            w.add(name, data)
    assert ours.getvalue() == ref.getvalue()
    assert len(ours.getvalue()) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue())) as tar:  # and tarfile reads it back
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == members


def _pax_shard() -> bytes:
    """A real shard written by TarWriter whose members need pax headers (long and non-ASCII names)."""
    from vggdist.shardio import TarWriter

    out = io.BytesIO()
    with TarWriter(out) as w:
        for i in range(3):
            key = f"{'k' * 110}_{i}" if i != 1 else f"caf\u00e9_{i}"
            w.add(f"{key}.jpg", bytes([i]) * (300 + 400 * i))
            w.add(f"{key}.cls", str(i).encode())
    return out.getvalue()


def _pax_records(raw: bytes) -> list[tuple[int, int]]:
    """(start, size) of the data of every pax header in ``raw``."""
    spans, pos = [], 0
    while pos + 512 <= len(raw) and raw[pos : pos + 512].count(0) != 512:
        size = int(raw[pos + 124 : pos + 136].split(b"\0")[0] or b"0", 8)
        if raw[pos + 156 : pos + 157] == b"x":
            spans.append((pos + 512, size))
        pos += 512 + size + (-size % 512)
    return spans


def _with_pax_data(raw: bytes, start: int, size: int, records: bytes) -> bytes:
    """``raw`` with the pax data at ``start`` replaced by ``records`` (padded or cut to the member's ``size``)."""
    body = (records + bytes(size))[:size]
    return raw[:start] + body + raw[start + size :]


@contextlib.contextmanager
def _ends_within(seconds: float):
    """Raise TimeoutError in the block if it runs longer than ``seconds`` (SIGALRM; the main thread)."""

    def timeout(*_):
        raise TimeoutError(f"did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "records",
    [
        b"0 mtime=0\n",
        b"0 path=x.jpg\n",
        b"3 path=x.jpg\n",
        b"-5 path=x\n",
        b"99999 path=x\n",
        b"path=x\n",
        b"12 pathxxxx.j\n",
    ],
    ids=["zero-loops", "zero", "too-short", "negative", "past-end", "no-length", "no-equals"],
)
def test_a_malformed_pax_record_raises_naming_the_shard_and_member(records):
    raw = _pax_shard()
    start, size = _pax_records(raw)[0]
    bad = _with_pax_data(raw, start, size, records)
    with (
        _ends_within(2.0),
        pytest.raises(TarError, match=r"shard\.tar: pax header '\./\./@PaxHeader' at byte 0"),
    ):
        list(iter_members(io.BytesIO(bad), "shard.tar"))


def test_fuzzed_pax_headers_and_size_fields_always_end_in_samples_or_tar_error():
    """Random damage to the pax records (not covered by any checksum) and to size fields (checksum fixed up):
    every case ends, quickly, by yielding members or raising TarError; nothing else escapes, nothing loops."""
    import random

    raw = _pax_shard()
    assert list(iter_members(io.BytesIO(raw), "s.tar"))[0][0] == f"{'k' * 110}_0.jpg"
    spans = _pax_records(raw)
    rng = random.Random(0)
    outcomes = {"ok": 0, "TarError": 0}
    for case in range(600):
        data = bytearray(raw)
        start, size = spans[case % len(spans)]
        if case % 3 == 2:  # a size field rewritten with a valid checksum: huge, zero, or off by some
            header = start - 512
            new = rng.choice([0, 1, size - 1, size + 1, 8**11 - 1, rng.randrange(1 << 20)])
            data[header + 124 : header + 136] = b"%011o\0" % new
            data[header + 148 : header + 156] = b"        "
            data[header + 148 : header + 155] = b"%06o\0" % sum(data[header : header + 512])
        else:  # bytes of the records: digits, spaces, '=', newlines, NULs or anything
            for _ in range(rng.randint(1, 4)):
                at = start + rng.randrange(size)
                data[at] = rng.choice([*b"0123456789 =\n\0", rng.randrange(256)])
        try:
            with _ends_within(2.0):
                list(iter_members(io.BytesIO(bytes(data)), "s.tar"))
            outcomes["ok"] += 1
        except TarError:
            outcomes["TarError"] += 1
    assert outcomes["TarError"] > 100 and outcomes["ok"] > 10, outcomes
