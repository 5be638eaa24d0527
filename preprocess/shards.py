"""WebDataset shards, manifest, stats, rejects: planned up front, written by Ray tasks, resumable (format: `vggdist.shardformat`).

How a job runs (``run_shard_job``)
1. The source is listed (``sources.list_source``): every input becomes an :class:`~preprocess.sources.Item`
   with a byte range, or a reject (no label, not a file).
2. **The whole assignment of inputs to shards is planned before anything is decoded**, deterministically from
   the listing and ``--seed``: train inputs are shuffled with ``random.Random(seed)`` over the *whole* listing
   (so every shard mixes all classes even though the train tar is grouped by class), val inputs keep source
   order; then consecutive runs of ``samples_per_shard`` inputs form shard ``{split}-{index:06d}.tar``. Inputs
   rejected while decoding simply leave their shard a little short.
3. One task per shard (a Ray task, or in-process when ``workers == 1`` and no cluster address): it reads its
   inputs in place with ``pread``, writes the tar under a hidden temporary name, fsyncs, renames it to its final
   name, then atomically writes a done-marker ``.parts/<shard>.json`` (keys, rejects, exact RGB moments, bytes,
   sha256, and the hash of the inputs it was planned with).
4. When every shard is done, ``rejects.jsonl``, ``stats.json`` and last ``manifest.json`` are assembled from the
   markers (`preprocess.manifest`).

Resume: a rerun of the same command re-lists, re-plans (same plan), skips shards whose marker matches the plan
and whose file has the recorded size, and redoes the rest from scratch — so a kill -9 at any moment (mid-tar,
between rename and marker, during the final assembly) ends with exactly the samples of an uninterrupted run, and
since tar headers carry no timestamps or owners, with byte-identical shards. The command's identity (source,
split, labels, image limits, shard size, seed and a fingerprint of the plan) is kept in ``.parts/job.json``; a
different command over the same ``--out`` is refused unless ``overwrite=True``. A lock file stops two drivers
writing one directory at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess import stats as stats_mod
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

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1280  # × ~110 kB per ImageNet sample at max side 512 ≈ 140 MB per shard
_TEST_SLEEP_ENV = "VGGDIST_PREPROCESS_TEST_SLEEP_S"  # test hook: seconds to sleep per image
_TEST_EXIT_ENV = "VGGDIST_PREPROCESS_TEST_EXIT_AFTER_RENAME"  # test hook: os._exit after renaming this shard


class JobError(Exception):
    """A shard command that cannot run as given (exit code 2); the message names the fix."""


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


def write_shard(
    out_dir: str, task: ShardTask, limits: ImageLimits, on_image: Callable[[], None] | None = None
) -> dict:
    """Write one shard (temp name → fsync → rename) and its done-marker; return the marker."""
    out = Path(out_dir)
    final = out / task.name
    tmp = out / f".{task.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    moments = stats_mod.RGBMoments()
    keys, rejects, reencoded = [], [], 0
    sleep_s = float(os.environ.get(_TEST_SLEEP_ENV, "0") or 0)
    with open(tmp, "wb") as raw, ByteReader() as reader:
        hw = _HashingWriter(raw)
        # what tarfile (PAX format) would write, byte for byte, ~10x cheaper per member (vggdist.shardio)
        with TarWriter(hw) as tar:
            for item, cls in task.items:
                if sleep_s:
                    time.sleep(sleep_s)
                try:
                    enc = to_jpeg(reader.read(item), limits)
                except Rejected as r:
                    rejects.append({"source": item.source, "reason": r.reason, "detail": r.detail})
                except OSError as e:
                    rejects.append({"source": item.source, "reason": "unreadable", "detail": str(e)})
                except Exception as e:  # a decoder bug must cost one image, not the job, and never silently
                    detail = f"{type(e).__name__}: {e}"
                    rejects.append({"source": item.source, "reason": "processing_error", "detail": detail})
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
                if on_image is not None:
                    on_image()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    if os.environ.get(_TEST_EXIT_ENV) == task.name:
        os._exit(137)  # test hook: die like kill -9 between the rename and the marker
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
    write_json_atomic(out / PARTS / f"{task.name}.json", marker)
    return marker


# ---------------------------------------------------------------------------------------------- the job


def run_shard_job(
    job: ShardJob,
    *,
    workers: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> JobSummary:
    """List, plan, write every missing shard (Ray tasks, or in-process for ``workers == 1`` without an
    ``address``), then assemble rejects.jsonl, stats.json and manifest.json. Rerunning resumes."""
    t0 = time.perf_counter()
    out = Path(job.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    with _exclusive_lock(out):
        listing = list_source(job.source, job.labels)
        if not listing.items and not listing.rejects:
            raise JobError(f"--source {job.source} holds no inputs")
        tasks = plan_shards(listing, job.split, job.seed, job.samples_per_shard)
        identity = {**job.identity(), "plan": _fingerprint(listing, tasks)}
        _claim_output(out, identity, overwrite)
        for stale in out.glob(f".{job.split}-*.tar.tmp-*"):  # left by a killed run
            stale.unlink()
        markers = {t.name: _done_marker(out, t) for t in tasks}
        pending = [t for t in tasks if markers[t.name] is None]
        done_inputs = len(listing.rejects) + sum(len(t.items) for t in tasks if markers[t.name] is not None)
        log.info("%d inputs in %d shards: %d shards to write", listing.num_inputs, len(tasks), len(pending))
        bar = _progress_bar(listing.num_inputs, done_inputs, progress)
        try:
            if address is None and (workers or os.cpu_count() or 1) == 1:
                for t in pending:
                    markers[t.name] = write_shard(str(out), t, job.limits, on_image=lambda: bar.update(1))
            else:
                for marker in _run_on_ray(str(out), pending, job.limits, workers, address):
                    markers[marker["name"]] = marker
                    bar.update(marker["inputs"])
        finally:
            bar.close()
        summary = finalize(out, job, identity, listing, tasks, markers)
    summary.elapsed_s = time.perf_counter() - t0
    summary.processed = sum(len(t.items) for t in pending)
    summary.resumed_shards = len(tasks) - len(pending)
    return summary


def _run_on_ray(
    out: str, pending: list[ShardTask], limits: ImageLimits, workers: int | None, address: str | None
):
    """Yield markers as shard tasks finish, with at most ``workers`` tasks in flight."""
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
        started = True
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        queue, in_flight = list(pending), []
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                in_flight.append(remote.remote(out, queue.pop(0), limits))
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()


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


def _claim_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Resume only the same command; refuse anything else over existing output unless ``overwrite``."""
    job_file = out / PARTS / "job.json"
    if job_file.is_file():
        previous = json.loads(job_file.read_text())
        if previous == identity:
            return
        diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        what = "the source content changed" if diff == ["plan"] else f"{', '.join(diff)} differ"
        if not overwrite:
            raise JobError(
                f"{out} holds the output of a different command ({what}); pass --overwrite to replace it or use another --out"
            )
    elif any(p.name not in (PARTS,) for p in out.iterdir()) and not overwrite:
        raise JobError(
            f"{out} is not empty and was not written by this command; pass --overwrite or use another --out"
        )
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
