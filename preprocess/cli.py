"""The ``vggdist-preprocess`` console script: ``shard``, ``verify``, ``stats`` (paper §3.1 data).

Exit codes: 0 done; 2 a usage or input error, before anything is written (one line naming the fix); 1 the job
ran and stopped (one line saying why and that rerunning the same command resumes; ``--verbose`` adds the
traceback), ``verify`` found problems, or an internal error (its traceback). See `preprocess.failures`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback

from preprocess.failures import JobFailed, RetryPolicy
from preprocess.images import ImageLimits
from preprocess.shards import DEFAULT_SAMPLES_PER_SHARD, JobError, ShardHooks, ShardJob, run_shard_job
from preprocess.sources import SourceError
from preprocess.stats import format_stats
from preprocess.verify import verify
from vggdist import cluster
from vggdist.shardformat import SPLITS, DataError, read_stats

log = logging.getLogger(__name__)
_D = ImageLimits()
_FLAGS = {  # ImageLimits field → its flag, for messages
    "max_side": "--max-side",
    "quality": "--quality",
    "max_pixels": "--max-pixels",
    "max_aspect": "--max-aspect",
    "max_file_bytes": "--max-file-bytes",
}


def byte_count(text: str) -> int:
    """``67108864``, ``64M``, ``64MiB``, ``1.5G`` → bytes (K, M, G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 67108864, 64M, 1G)")
    return int(float(match[1]) * 1024 ** " KMG".index((match[2] or " ").upper()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vggdist-preprocess", description="ImageNet → WebDataset shards + exact RGB stats"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "shard", help="write shards, manifest.json, stats.json, rejects.jsonl (rerun to resume)"
    )
    s.add_argument(
        "--source",
        required=True,
        help="image-folder root, ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar",
    )
    s.add_argument("--split", required=True, choices=SPLITS)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--labels",
        help="val tar labels: ILSVRC2012_validation_ground_truth.txt (meta.mat beside it), "
        "the devkit directory, or LOC_val_solution.csv",
    )
    s.add_argument(
        "--max-side", type=int, default=_D.max_side, help="smallest side stored at most (default %(default)s)"
    )
    s.add_argument(
        "--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD, help="(default %(default)s)"
    )
    s.add_argument("--seed", type=int, default=0, help="training-order shuffle seed (default %(default)s)")
    s.add_argument(
        "--quality",
        type=int,
        default=_D.quality,
        help="JPEG quality of re-encoded images (default %(default)s)",
    )
    s.add_argument(
        "--max-pixels", type=int, default=_D.max_pixels, help="header pixel limit (default %(default)s)"
    )
    s.add_argument(
        "--max-aspect",
        type=float,
        default=_D.max_aspect,
        help="longest/shortest side limit (default %(default)s)",
    )
    s.add_argument(
        "--max-file-bytes",
        type=byte_count,
        default=_D.max_file_bytes,
        help="larger input files are rejected (too_large) without being read; accepts 64M, 1G "
        "(default %(default)s = 64 MiB)",
    )
    s.add_argument(
        "--workers", type=int, help="parallel tasks (default: all CPUs); 1 without --address runs without Ray"
    )
    s.add_argument(
        "--address",
        help="Ray cluster (GCS) address HOST:PORT, or auto for the cluster started on this machine "
        "(default: $RAY_ADDRESS, else a private local Ray started for this job)",
    )
    s.add_argument(
        "--overwrite", action="store_true", help="replace the output of a different command in --out"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("-v", "--verbose", action="store_true", help="show the traceback of a failure")

    v = sub.add_parser("verify", help="check every shard against manifest.json; exit 1 on any mismatch")
    v.add_argument("dir")
    v.add_argument("--workers", type=int, default=1, help="processes decoding shards in parallel (default 1)")

    st = sub.add_parser("stats", help="print stats.json readably")
    st.add_argument("dir")
    return p


def main(
    argv: list[str] | None = None, *, hooks: ShardHooks | None = None, retry: RetryPolicy | None = None
) -> int:
    """Run the command line; return its exit code. ``hooks`` and ``retry`` reach `run_shard_job` (extension
    points for tests and embedding; the command line itself has no hidden switches)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    try:
        if args.command == "shard":
            return _shard(args, hooks, retry or RetryPolicy())
        if args.command == "verify":
            return _verify(args)
        print(format_stats(_existing(read_stats, args.dir)))
        return 0
    except (JobError, SourceError, DataError) as e:
        print(f"vggdist-preprocess: error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"vggdist-preprocess: error: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("vggdist-preprocess: internal error (traceback above)", file=sys.stderr)
        return 1


def _existing(read, directory: str):
    """``read(directory)``; a missing manifest.json / stats.json is a usage error (the wrong directory)."""
    try:
        return read(directory)
    except FileNotFoundError as e:
        raise JobError(str(e)) from None


def _shard(args: argparse.Namespace, hooks: ShardHooks | None, retry: RetryPolicy) -> int:
    if args.workers is not None and args.workers < 1:
        raise JobError(f"--workers must be ≥ 1, got {args.workers}")
    try:
        limits = ImageLimits(
            args.max_side, args.quality, args.max_pixels, args.max_aspect, args.max_file_bytes
        )
    except ValueError as e:
        text = str(e)
        for field, flag in _FLAGS.items():
            text = re.sub(rf"\b{field}\b", flag, text)
        raise JobError(text) from None
    job = ShardJob(args.source, args.split, args.out, args.labels, limits, args.samples_per_shard, args.seed)
    try:
        target = cluster.resolve(args.address)  # --address, else RAY_ADDRESS, else a private local Ray
    except cluster.AddressError as e:
        raise JobError(str(e)) from None
    summary = run_shard_job(
        job,
        workers=args.workers,
        address=target,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        hooks=hooks,
        retry=retry,
    )
    print(summary.format())
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems = _existing(lambda d: verify(d, workers=args.workers), args.dir)
    for p in problems:
        print(p)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"verify: {args.dir} OK")
    return 0
