"""Faults for the preprocessing tests (the product never imports this module): hooks injected through
`preprocess.shards.ShardHooks`, and `SmallFilesystem`, a real small filesystem to fill up or make read-only.

The hooks are small frozen dataclasses, so they pickle into Ray workers. State shared across processes and
retries (how often a read was failed) lives in a counter file.

Run as a driver, it is ``vggdist-preprocess`` with hooks, for tests that kill or watch a real process::

    python -m tests.preprocess_faults [--sleep-per-image S] [--exit-after-rename SHARD]
        [--fail-reads MATCH:ERRNO_NAME:TIMES:COUNTER_FILE] [--attempts N] [--backoff S] -- shard ARGS...

``TIMES`` is how many reads fail (-1: all of them); ``ERRNO_NAME`` is e.g. ``EIO`` or ``MemoryError``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SleepPerImage:
    """after_image: a slow input, so a test can kill the job in the middle of a shard."""

    seconds: float

    def __call__(self, item) -> None:
        time.sleep(self.seconds)


@dataclass(frozen=True)
class ExitAfterRename:
    """after_rename: die like kill -9 once ``shard`` has its final name, before its done-marker is written."""

    shard: str

    def __call__(self, name: str) -> None:
        if name == self.shard:
            os._exit(137)


@dataclass(frozen=True)
class FailReads:
    """before_read: the source storage fails on inputs whose source contains ``match``: the first ``times``
    reads (all if -1) raise ``OSError(code)``, or ``MemoryError`` when ``code`` is 0."""

    match: str
    code: int
    times: int
    counter: str  # a file: one byte appended per matching read, in any process

    def __call__(self, item) -> None:
        if self.match not in item.source:
            return
        with open(self.counter, "ab") as f:
            f.write(b"x")
            n = f.tell()
        if self.times < 0 or n <= self.times:
            if self.code == 0:
                raise MemoryError
            raise OSError(self.code, os.strerror(self.code), item.path)

    def calls(self) -> int:
        return os.path.getsize(self.counter) if os.path.exists(self.counter) else 0


def fail_reads(spec: str) -> FailReads:
    match, name, times, counter = spec.split(":")
    return FailReads(match, 0 if name == "MemoryError" else getattr(errno, name), int(times), counter)


def main(argv: list[str]) -> int:
    from preprocess.cli import main as cli_main
    from preprocess.failures import RetryPolicy
    from preprocess.shards import ShardHooks

    split = argv.index("--")
    p = argparse.ArgumentParser(prog="preprocess_faults")
    p.add_argument("--sleep-per-image", type=float)
    p.add_argument("--exit-after-rename")
    p.add_argument("--fail-reads", type=fail_reads)
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--backoff", type=float, default=0.05)
    a = p.parse_args(argv[:split])
    hooks = ShardHooks(
        before_read=a.fail_reads,
        after_image=SleepPerImage(a.sleep_per_image) if a.sleep_per_image else None,
        after_rename=ExitAfterRename(a.exit_after_rename) if a.exit_after_rename else None,
    )
    return cli_main(argv[split + 1 :], hooks=hooks, retry=RetryPolicy(a.attempts, a.backoff))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@dataclass(frozen=True)
class MoveShardAway:
    """after_rename: the shard lands where the driver does not look, as on a node whose --out is a local disk."""

    out: str
    elsewhere: str

    def __call__(self, name: str) -> None:
        os.replace(os.path.join(self.out, name), os.path.join(self.elsewhere, name))


class SmallFilesystem:
    """A real, small filesystem mounted for one test (tmpfs, else a loop-mounted ext4 image; root only), which a
    test fills, frees, or remounts read-only."""

    def __init__(self, base) -> None:
        import subprocess

        self.path = base / "mnt"
        self.path.mkdir(parents=True)
        self._image = None
        tmpfs = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(self.path)]
        if subprocess.run(tmpfs, capture_output=True).returncode != 0:
            self._image = base / "fs.img"
            with open(self._image, "wb") as f:
                f.truncate(32 * 2**20)
            made = subprocess.run(["mkfs.ext4", "-q", "-F", str(self._image)], capture_output=True)
            loop = ["mount", "-o", "loop", str(self._image), str(self.path)]
            if made.returncode != 0 or subprocess.run(loop, capture_output=True).returncode != 0:
                raise OSError("neither a tmpfs nor a loop-mounted image can be mounted here (needs root)")
        self._filler = self.path / "filler"

    def leave_free(self, nbytes: int) -> None:
        """Fill the filesystem so that about ``nbytes`` stay free."""
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(self._filler, "ab") as f:
            f.write(bytes(max(0, free - nbytes)))
            f.flush()
            os.fsync(f.fileno())

    def free_space(self) -> None:
        self._filler.unlink(missing_ok=True)

    def remount(self, option: str) -> None:
        import subprocess

        subprocess.run(["mount", "-o", f"remount,{option}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        import subprocess

        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
