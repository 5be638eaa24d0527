"""WebDataset shards, manifest, stats, rejects: planned up front, written by Ray tasks, resumable (format: `vggdist.shardformat`).

How a job runs (``run_shard_job``)
1. The source is listed (``sources.list_source``): every input becomes an :class:`~preprocess.sources.Item`
   with a byte range, or a reject (no label, not a file).
2. **The whole assignment of inputs to shards is planned before anything is decoded**, deterministically from
   the listing and ``--seed``: train inputs are shuffled with ``random.Random(seed)`` over the *whole* listing
   (so every shard mixes all classes even though the train tar is grouped by class), val inputs keep source
   order; then consecutive runs of ``samples_per_shard`` inputs form shard ``{split}-{index:06d}.tar``. Inputs
   rejected while decoding simply leave their shard a little short.
   Nothing has been written yet: the arguments, the source, ``--out`` (`_check_claim`) and the Ray connection
   (`runner.ray_pool`) are all checked before ``--out`` is created, so bad input leaves nothing behind.
3. One task per shard (a Ray task, or in-process when ``workers == 1`` and no cluster address): it reads its
   inputs in place with ``pread``, writes the tar under a hidden temporary name, fsyncs, renames it to its final
   name, then atomically writes a done-marker ``.parts/<shard>.json`` (keys, rejects, exact RGB moments, bytes,
   sha256, and the hash of the inputs it was planned with). A task whose input cannot be *read* (I/O error,
   memory) fails as a whole, removes its temporary file and is retried (`preprocess.runner`); only content
   problems become rejects (`preprocess.failures` says which failure is which).
4. When every shard is done and present in ``--out`` with its recorded size (a non-shared ``--out`` on a
   multi-node cluster is refused here), ``rejects.jsonl``, ``stats.json`` and last ``manifest.json`` are
   assembled from the markers (`preprocess.manifest`).

Extension points: :class:`ShardHooks` (called while a shard is written, where the task runs) is how tests slow a
job down, kill it between the rename and the marker, or make the source storage fail.

Resume: a rerun of the same command re-lists, re-plans (same plan), skips shards whose marker matches the plan
and whose file has the recorded size, and redoes the rest from scratch — so a kill -9 at any moment (mid-tar,
between rename and marker, during the final assembly) ends with exactly the samples of an uninterrupted run, and
since tar headers carry no timestamps or owners, with byte-identical shards. The command's identity (source,
split, labels, image limits, shard size, seed and a fingerprint of the plan) is kept in ``.parts/job.json``; a
different command over the same ``--out`` is refused unless ``overwrite=True``. A lock file stops two drivers
writing one directory at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess import runner
from preprocess import stats as stats_mod
from preprocess.failures import (
    TRANSIENT_ERRNOS,
    InputUnavailable,
    JobError,
    JobFailed,
    OutputError,
    RetryPolicy,
    is_output_error,
)
from preprocess.images import ImageLimits, Rejected, to_jpeg
from preprocess.manifest import JobSummary, finalize, write_json_atomic
from preprocess.sources import ByteReader, Item, Listing, list_source
from vggdist.shardformat import (
    MANIFEST,
    PARTS,
    REJECTS,
    SHARD_NAME_RE,
    SPLITS,
    STATS,
    TOOL,
    shard_name,
)
from vggdist.shardio import TarWriter

__all__ = ["JobError", "JobFailed", "ShardHooks", "ShardJob", "run_shard_job", "write_shard"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1280  # × ~110 kB per ImageNet sample at max side 512 ≈ 140 MB per shard


@dataclass(frozen=True)
class ShardJob:
    """One `vggdist-preprocess shard` command: everything that decides the output (and nothing that does not)."""

    source: str
    split: str
    out: str
    labels: str | None = None
    limits: ImageLimits = ImageLimits()
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise JobError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.samples_per_shard < 1:
            raise JobError(f"--samples-per-shard must be ≥ 1, got {self.samples_per_shard}")

    def identity(self) -> dict:
        return {
            "source": str(Path(self.source).expanduser().resolve()),
            "split": self.split,
            "labels": str(Path(self.labels).expanduser().resolve()) if self.labels else None,
            **asdict(self.limits),
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ShardTask:
    """The inputs planned for one shard, with their class indices."""

    index: int
    name: str
    items: tuple[tuple[Item, int], ...]

    @property
    def plan_hash(self) -> str:
        h = hashlib.sha256()
        for it, cls in self.items:
            h.update(f"{it.key}\0{cls}\0{it.wnid}\0{it.source}\0{it.offset}\0{it.size}\n".encode())
        return h.hexdigest()


def plan_shards(listing: Listing, split: str, seed: int, samples_per_shard: int) -> list[ShardTask]:
    """Assign every listed input to a shard, deterministically (train: seeded shuffle of all inputs)."""
    index = listing.class_index
    items = list(listing.items)
    if split == "train":
        random.Random(seed).shuffle(items)
    tasks = []
    for start in range(0, len(items), samples_per_shard):
        chunk = tuple((it, index[it.wnid]) for it in items[start : start + samples_per_shard])
        i = len(tasks)
        tasks.append(ShardTask(i, shard_name(split, i), chunk))
    return tasks


# ---------------------------------------------------------------------------------------------- one shard


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
_DEFAULT_RETRY = RetryPolicy()


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


# ---------------------------------------------------------------------------------------------- the job


def run_shard_job(
    job: ShardJob,
    *,
    workers: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    hooks: ShardHooks | None = None,
    retry: RetryPolicy = _DEFAULT_RETRY,
) -> JobSummary:
    """List, plan, write every missing shard (Ray tasks, or in-process for ``workers == 1`` without an
    ``address``), then assemble rejects.jsonl, stats.json and manifest.json. Rerunning resumes.

    Raises :class:`JobError` (the command cannot run as given; nothing was written) or :class:`JobFailed`
    (it ran and stopped: an input the storage would not give, an ``--out`` that is full, read-only or not
    shared; a rerun resumes). ``hooks`` run inside every shard task; ``retry`` says how often and how patiently
    a shard whose inputs could not be read is tried again.
    """
    t0 = time.perf_counter()
    out = Path(job.out).expanduser().resolve()
    if address is not None:
        runner.check_address(address)  # a typo fails in seconds, not after listing a 150 GB tar
    listing = _list_source(job, retry)
    if not listing.items and not listing.rejects:
        raise JobError(f"--source {job.source} holds no inputs")
    tasks = plan_shards(listing, job.split, job.seed, job.samples_per_shard)
    identity = {**job.identity(), "plan": _fingerprint(listing, tasks)}
    _check_out(out, job)
    _check_claim(out, identity, overwrite)
    in_process = address is None and (workers or os.cpu_count() or 1) == 1
    with contextlib.nullcontext(None) if in_process else runner.ray_pool(address, workers) as ray_workers:
        with _writing(out):  # from here on, an OSError is --out failing
            out.mkdir(parents=True, exist_ok=True)
            (out / PARTS).mkdir(exist_ok=True)
            with _exclusive_lock(out):
                _claim_output(out, identity, overwrite)
                for stale in out.glob(f".{job.split}-*.tar.tmp-*"):  # left by a killed run
                    stale.unlink()
                markers = {t.name: _done_marker(out, t) for t in tasks}
                pending = [t for t in tasks if markers[t.name] is None]
                done = len(listing.rejects) + sum(len(t.items) for t in tasks if markers[t.name] is not None)
                log.info(
                    "%d inputs in %d shards: %d shards to write", listing.num_inputs, len(tasks), len(pending)
                )
                bar = _progress_bar(listing.num_inputs, done, progress)
                try:
                    if ray_workers is None:
                        results = runner.run_in_process(
                            pending, _in_process_writer(out, job, hooks, bar), retry
                        )
                    else:
                        args = (str(out), job.limits, None, hooks)
                        results = runner.run_on_ray(pending, write_shard, args, ray_workers, retry)
                    for marker in results:
                        markers[marker["name"]] = marker
                        if ray_workers is not None:
                            bar.update(marker["inputs"])
                except OutputError as e:
                    raise _with_estimate(e, out, tasks, markers) from e
                finally:
                    bar.close()
                _check_shards_present(out, tasks, markers)
                summary = finalize(out, job, identity, listing, tasks, markers)
    summary.elapsed_s = time.perf_counter() - t0
    summary.processed = sum(len(t.items) for t in pending)
    summary.resumed_shards = len(tasks) - len(pending)
    return summary


def _list_source(job: ShardJob, retry: RetryPolicy) -> Listing:
    """``list_source`` (reads only), tried again like a shard when the source storage fails transiently."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return list_source(job.source, job.labels, job.limits.max_file_bytes)
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS and attempt < retry.attempts:
                log.warning("listing --source: %s; retrying in %.1f s", e, retry.delay(attempt))
                time.sleep(retry.delay(attempt))
                continue
            raise JobFailed(
                f"listing --source failed: {e}; rerun the same command once the source storage is readable"
            ) from e
    raise AssertionError("unreachable")


def _check_out(out: Path, job: ShardJob) -> None:
    """Refuse an --out that cannot hold shards (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} exists and is not a directory; choose a directory")
    source = Path(job.source).expanduser().resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise JobError(
            f"--out {out} lies inside --source {source}: its shards would become inputs; choose an --out "
            "outside the source"
        )


def _in_process_writer(out: Path, job: ShardJob, hooks: ShardHooks | None, bar) -> Callable:
    """``write_shard`` for the in-process path, moving the progress bar per image (and back on a retry)."""

    def write(task: ShardTask) -> dict:
        count = 0

        def on_image() -> None:
            nonlocal count
            count += 1
            bar.update(1)

        try:
            return write_shard(str(out), task, job.limits, on_image=on_image, hooks=hooks)
        except BaseException:
            bar.update(-count)
            raise

    return write


@contextlib.contextmanager
def _writing(out: Path):
    """Turn an ``OSError`` about writing --out (no space, read-only, permission, I/O) into an OutputError."""
    try:
        yield
    except OSError as e:
        if not is_output_error(e):
            raise
        raise OutputError.from_oserror(e, out) from e


def _with_estimate(e: OutputError, out: Path, tasks: list[ShardTask], markers: dict) -> OutputError:
    """``e`` saying how much space the failing shard and the rest of the plan need (bytes per input so far)."""
    done = [m for m in markers.values() if m is not None]
    bytes_done = sum(m["bytes"] for m in done) + e.written
    inputs_done = sum(m["inputs"] for m in done) + e.inputs_done
    if not inputs_done:
        return e
    per_input = bytes_done / inputs_done
    shard = next((t for t in tasks if t.name == e.shard), None)
    shard_bytes = per_input * len(shard.items) if shard is not None else 0
    remaining = per_input * sum(len(t.items) for t in tasks if markers[t.name] is None)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return e
    return e.with_estimate(int(shard_bytes), int(remaining), free)


def _check_shards_present(out: Path, tasks: list[ShardTask], markers: dict) -> None:
    """Every shard a task reported is in ``out`` with the size it recorded: a task on another node whose --out
    is a local directory writes shards this driver never sees, and the manifest must not list them."""
    wrong = []
    for t in tasks:
        try:
            size = (out / t.name).stat().st_size
        except FileNotFoundError:
            wrong.append(f"{t.name} (missing)")
            continue
        if size != markers[t.name]["bytes"]:
            wrong.append(f"{t.name} ({size:,} bytes, written as {markers[t.name]['bytes']:,})")
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise JobFailed(
            f"{len(wrong)} of {len(tasks)} shards are not in {out} as their tasks wrote them: "
            f"{', '.join(wrong[:5])}{more}. --out must be shared storage that every Ray node sees at the same "
            "path (NFS, EFS, a parallel filesystem); rerun with such an --out"
        )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="shard",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


class _exclusive_lock:
    """flock on DIR/.parts/lock for the driver's lifetime (released by the kernel if the driver is killed)."""

    def __init__(self, out: Path) -> None:
        self._path = out / PARTS / "lock"

    def __enter__(self):
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise JobError(
                    f"another {TOOL} is writing {self._path.parent.parent}; wait for it or use another --out"
                ) from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _fingerprint(listing: Listing, tasks: list[ShardTask]) -> str:
    h = hashlib.sha256()
    for c in listing.classes:
        h.update(f"{c.wnid}\0{c.name}\n".encode())
    for r in listing.rejects:
        h.update(json.dumps(r, sort_keys=True).encode())
    for t in tasks:
        h.update(t.plan_hash.encode())
    return h.hexdigest()


def _check_claim(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse (reading only) an --out holding another command's output or files this tool did not write,
    unless ``overwrite``; the same command's output is resumed."""
    if not out.is_dir():
        return
    job_file = out / PARTS / "job.json"
    if job_file.is_file():
        previous = json.loads(job_file.read_text())
        if previous == identity or overwrite:
            return
        diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        what = "the source content changed" if diff == ["plan"] else f"{', '.join(diff)} differ"
        raise JobError(
            f"{out} holds the output of a different command ({what}); pass --overwrite to replace it or use another --out"
        )
    if any(p.name != PARTS for p in out.iterdir()) and not overwrite:
        raise JobError(
            f"{out} is not empty and was not written by this command; pass --overwrite or use another --out"
        )


def _claim_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Resume only the same command; replace another's output only with ``overwrite`` (under the lock)."""
    _check_claim(out, identity, overwrite)
    job_file = out / PARTS / "job.json"
    if job_file.is_file() and json.loads(job_file.read_text()) == identity:
        return
    if overwrite:
        _remove_outputs(out)
    write_json_atomic(job_file, identity)


def _remove_outputs(out: Path) -> None:
    """Delete what this tool writes (shards, temp files, manifest, stats, rejects, markers); nothing else."""
    for p in out.iterdir():
        if p.is_file() and (
            SHARD_NAME_RE.match(p.name) or ".tar.tmp-" in p.name or p.name in (MANIFEST, REJECTS)
        ):
            p.unlink()
        elif p.is_file() and p.name == STATS:
            p.unlink()
    for p in (out / PARTS).glob("*.json"):
        p.unlink()


def _done_marker(out: Path, task: ShardTask) -> dict | None:
    path = out / PARTS / f"{task.name}.json"
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shard = out / task.name
    if (
        marker.get("plan_hash") != task.plan_hash
        or not shard.is_file()
        or shard.stat().st_size != marker["bytes"]
    ):
        return None
    return marker
