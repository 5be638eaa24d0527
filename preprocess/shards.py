"""WebDataset shards, manifest, stats, rejects: planned up front, written by Ray tasks, resumable (format: `vggdist.shardformat`).

How a job runs (``run_shard_job``)
1. The source is listed (``sources.list_source``): every input becomes an :class:`~preprocess.sources.Item`
   with a byte range, or a reject (no label, not a file).
2. **The whole assignment of inputs to shards is planned before anything is decoded**, deterministically from
   the listing and ``--seed``: train inputs are shuffled with ``random.Random(seed)`` over the *whole* listing
   (so every shard mixes all classes even though the train tar is grouped by class), val inputs keep source
   order; then consecutive runs of ``samples_per_shard`` inputs form shard ``{split}-{index:06d}.tar``. Inputs
   rejected while decoding simply leave their shard a little short. Nothing has been written yet: the
   arguments, the source, ``--out`` (`preprocess.outdir`) and the Ray address (`vggdist.cluster`'s rule) are
   all checked before ``--out`` is created, so bad input leaves nothing behind.
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
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess import outdir, runner
from preprocess.failures import TRANSIENT_ERRNOS, JobError, JobFailed, OutputError, RetryPolicy
from preprocess.images import ImageLimits
from preprocess.manifest import JobSummary, finalize
from preprocess.shard_writer import ShardHooks, write_shard
from preprocess.sources import Item, Listing, list_source
from vggdist import cluster
from vggdist.shardformat import PARTS, SPLITS, shard_name

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


_DEFAULT_RETRY = RetryPolicy()


def run_shard_job(
    job: ShardJob,
    *,
    workers: int | None = None,
    address: str | cluster.Target | None = None,
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
    target = _target(address)
    runner.check_address(target)  # a typo fails in seconds, not after listing a 150 GB tar
    listing = _list_source(job, retry)
    if not listing.items and not listing.rejects:
        raise JobError(f"--source {job.source} holds no inputs")
    tasks = plan_shards(listing, job.split, job.seed, job.samples_per_shard)
    identity = {**job.identity(), "plan": _fingerprint(listing, tasks)}
    outdir.check_out(out, job.source)
    outdir.check_claim(out, identity, overwrite)
    in_process = target.local and (workers or os.cpu_count() or 1) == 1
    with contextlib.nullcontext(None) if in_process else runner.ray_pool(target, workers) as ray_workers:
        with outdir.writing(out):  # from here on, an OSError is --out failing
            out.mkdir(parents=True, exist_ok=True)
            (out / PARTS).mkdir(exist_ok=True)
            with outdir.exclusive_lock(out):
                outdir.claim(out, identity, overwrite)
                for stale in out.glob(f".{job.split}-*.tar.tmp-*"):  # left by a killed run
                    stale.unlink()
                markers = {t.name: outdir.done_marker(out, t) for t in tasks}
                pending = [t for t in tasks if markers[t.name] is None]
                done = len(listing.rejects) + sum(len(t.items) for t in tasks if markers[t.name] is not None)
                log.info(
                    "%d inputs in %d shards: %d shards to write", listing.num_inputs, len(tasks), len(pending)
                )
                bar = _progress_bar(f"shard {job.split}", listing.num_inputs, done, progress)
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
                outdir.check_shards_present(out, tasks, markers)
                summary = finalize(out, job, identity, listing, tasks, markers)
    summary.elapsed_s = time.perf_counter() - t0
    summary.processed = sum(len(t.items) for t in pending)
    summary.resumed_shards = len(tasks) - len(pending)
    return summary


def _target(address: str | cluster.Target | None) -> cluster.Target:
    """Where the shard tasks run: a `cluster.Target` as resolved by the command line, else `address` itself
    (None: a private local Ray, or this process for one worker)."""
    if isinstance(address, cluster.Target):
        return address
    try:
        return cluster.resolve(address, environ={})
    except cluster.AddressError as e:
        raise JobError(str(e)) from None


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


def _progress_bar(desc: str, total: int, initial: int, enabled: bool):
    """A bar on a terminal, a plain line every 30 s elsewhere (`vggdist.progress`)."""
    from vggdist.progress import Progress

    return Progress(desc, total, "img", initial=initial, enabled=enabled)


def _fingerprint(listing: Listing, tasks: list[ShardTask]) -> str:
    h = hashlib.sha256()
    for c in listing.classes:
        h.update(f"{c.wnid}\0{c.name}\n".encode())
    for r in listing.rejects:
        h.update(json.dumps(r, sort_keys=True).encode())
    for t in tasks:
        h.update(t.plan_hash.encode())
    return h.hexdigest()
