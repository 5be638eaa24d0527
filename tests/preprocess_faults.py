"""Faults for the preprocessing tests, injected through `preprocess.shards.ShardHooks` (the product never
imports this module).

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
