"""One shard task: read its inputs, write the tar under a temporary name, fsync, rename, write its done-marker.

Runs wherever the task runs (this process, or a Ray worker). Only content problems become rejects; an input the
storage will not give is `failures.InputUnavailable` (the shard is retried by `preprocess.runner`), a failure
writing ``--out`` is `failures.OutputError`, and either way the temporary file is removed and no marker is
written. :class:`ShardHooks` are the documented extension points called along the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from preprocess import stats as stats_mod
from preprocess.failures import InputUnavailable, OutNotShared, OutputError
from preprocess.images import ImageLimits, Rejected, to_jpeg
from preprocess.manifest import write_json_atomic
from preprocess.sources import ByteReader, Item
from vggdist.shardformat import PARTS
from vggdist.shardio import TarWriter

if TYPE_CHECKING:
    from preprocess.shards import ShardTask


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f) -> None:
        self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes


@dataclass(frozen=True)
class ShardHooks:
    """Optional callables run while a shard is written, where its task runs (a Ray worker process when Ray is
    used: they must pickle). They are the documented way to inject faults and delays (the tests do).

    - ``before_read(item)``: just before an input's bytes are read. An ``OSError`` (or ``MemoryError``) it raises
      is handled exactly as the source storage failing on that read.
    - ``after_image(item)``: after each input is written or rejected.
    - ``after_rename(shard_name)``: once the shard file has its final name, before its done-marker is written.
    """

    before_read: Callable[[Item], None] | None = None
    after_image: Callable[[Item], None] | None = None
    after_rename: Callable[[str], None] | None = None


_NO_HOOKS = ShardHooks()


def write_shard(
    out_dir: str,
    task: ShardTask,
    limits: ImageLimits,
    on_image: Callable[[], None] | None = None,
    hooks: ShardHooks | None = None,
) -> dict:
    """Write one shard (temp name → fsync → rename) and its done-marker; return the marker.

    Raises :class:`~preprocess.failures.InputUnavailable` when an input cannot be read (I/O error, memory; the
    caller retries the whole shard) and :class:`~preprocess.failures.OutputError` when ``out_dir`` cannot be
    written; either way the temporary file is removed and no marker is written.
    """
    hooks = hooks or _NO_HOOKS
    out = Path(out_dir)
    if not (out / PARTS).is_dir():  # the driver made it: this task runs on a node that does not see --out
        raise OutNotShared(str(out), socket.gethostname())
    final = out / task.name
    tmp = out / f".{task.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    moments = stats_mod.RGBMoments()
    keys, rejects, reencoded, done = [], [], 0, 0
    hw = None
    try:
        with open(tmp, "wb") as raw, ByteReader(limits.max_file_bytes) as reader:
            hw = _HashingWriter(raw)
            # what tarfile (PAX format) would write, byte for byte, ~10x cheaper per member (vggdist.shardio)
            with TarWriter(hw) as tar:
                for item, cls in task.items:
                    try:
                        enc = to_jpeg(_read_input(reader, item, task.name, hooks), limits)
                    except Rejected as r:
                        rejects.append({"source": item.source, "reason": r.reason, "detail": r.detail})
                    except InputUnavailable:
                        raise
                    except MemoryError as e:  # says nothing about the image: retry the shard
                        raise InputUnavailable.from_error(item.source, e, task.name) from e
                    except (
                        Exception
                    ) as e:  # a decoder bug must cost one image, not the job, and never silently
                        detail = f"{type(e).__name__}: {e}"
                        rejects.append(
                            {"source": item.source, "reason": "processing_error", "detail": detail}
                        )
                    else:
                        meta = {
                            "wnid": item.wnid,
                            "source": item.source,
                            "width": enc.width,
                            "height": enc.height,
                        }
                        tar.add(f"{item.key}.jpg", enc.jpeg)
                        tar.add(f"{item.key}.cls", str(cls).encode())
                        tar.add(f"{item.key}.json", json.dumps(meta, sort_keys=True).encode())
                        moments.add_image(enc.pixels)
                        keys.append(item.key)
                        reencoded += enc.reencoded
                    done += 1
                    if on_image is not None:
                        on_image()
                    if hooks.after_image is not None:
                        hooks.after_image(item)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # reads are handled above: this is writing out_dir
            written = hw.bytes if hw is not None else 0
            raise OutputError.from_oserror(e, tmp, shard=task.name, written=written, inputs_done=done) from e
        raise
    if hooks.after_rename is not None:
        hooks.after_rename(task.name)
    marker = {
        "name": task.name,
        "plan_hash": task.plan_hash,
        "inputs": len(task.items),
        "samples": len(keys),
        "reencoded": reencoded,
        "bytes": hw.bytes,
        "sha256": hw.sha256.hexdigest(),
        "keys": keys,
        "rejects": rejects,
        "moments": moments.to_json(),
    }
    marker_path = out / PARTS / f"{task.name}.json"
    try:
        write_json_atomic(marker_path, marker)
    except OSError as e:
        raise OutputError.from_oserror(
            e, marker_path, shard=task.name, written=hw.bytes, inputs_done=done
        ) from e
    return marker


def _read_input(reader: ByteReader, item: Item, shard: str, hooks: ShardHooks) -> bytes:
    """The input's bytes; :class:`Rejected` for what the listing would have refused (not a regular file, too
    large); an ``OSError`` is the source storage failing, not the image: :class:`InputUnavailable`."""
    try:
        if hooks.before_read is not None:
            hooks.before_read(item)
        return reader.read(item)
    except OSError as e:
        raise InputUnavailable.from_error(item.source, e, shard) from e
