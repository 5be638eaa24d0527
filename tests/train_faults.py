"""Faults and probes for the training tests (the product never imports this module), injected through
`vggdist.callbacks`: `train(callbacks=...)`, `run_sweep(callbacks=...)`, `vggdist.cli.main(argv, callbacks=...)`.

The callbacks are frozen dataclasses of plain values, so they pickle into Ray Train workers (which import this
module by name: the tests' PYTHONPATH reaches them). State that must outlive a worker process ("only once") lives
in a file.

Run as a driver, it is ``vggdist`` with callbacks, for tests that kill or watch a real process::

    python -m tests.train_faults [--kill-worker EPOCH:RANK:MARKER[:RUN_NAME_PART]]
                                 [--hold EPOCH:RANK:MARKER[:RUN_NAME_PART]] [--record-keys DIR] -- ARGS...
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vggdist.callbacks import EpochEnd, SampleSite


@dataclass(frozen=True)
class KillWorker:
    """on_epoch_end: the worker of `rank` dies like kill -9 (os._exit) after epoch `epoch`, once (the `marker`
    file records that it happened), in runs whose name contains `run_name_part` (every run when empty)."""

    epoch: int
    rank: int
    marker: str
    run_name_part: str = ""

    def on_epoch_end(self, event: EpochEnd) -> None:
        if event.epoch != self.epoch or event.rank != self.rank or self.run_name_part not in event.run_name:
            return
        if event.local_mode:
            raise RuntimeError(
                "KillWorker would kill the driver: it needs Ray Train workers (run.workers >= 2)"
            )
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # killed once already
        os.write(fd, f"{event.run_name}: rank {event.rank} died after epoch {event.epoch}\n".encode())
        os.close(fd)
        time.sleep(3)  # let Ray Train's controller (2 s poll) register the checkpoint just reported
        os._exit(1)


@dataclass(frozen=True)
class Hold:
    """on_epoch_end: the worker of `rank` stops for `seconds` after epoch `epoch` (its checkpoint whole, its
    metrics spooled), once (the `marker` file, written first, says it is holding), in runs whose name contains
    `run_name_part`: a test kills the driver while it holds, at a known point of the run instead of a race."""

    epoch: int
    rank: int
    marker: str
    run_name_part: str = ""
    seconds: float = 120.0

    def on_epoch_end(self, event: EpochEnd) -> None:
        if event.epoch != self.epoch or event.rank != self.rank or self.run_name_part not in event.run_name:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # held once already
        os.write(fd, f"{event.run_name}: rank {event.rank} holds after epoch {event.epoch}\n".encode())
        os.close(fd)
        time.sleep(self.seconds)


@dataclass(frozen=True)
class RecordKeys:
    """on_train_sample: append every training sample's key to DIR/keys-e<epoch>-r<rank>-w<loader worker>.txt."""

    directory: str

    def on_train_sample(self, key: str, site: SampleSite) -> None:
        name = f"keys-e{site.epoch}-r{site.rank}-w{site.loader_worker}.txt"
        with open(Path(self.directory) / name, "a") as f:
            f.write(key + "\n")


def _kill_worker(spec: str) -> KillWorker:
    epoch, rank, marker, *part = spec.split(":", 3)
    return KillWorker(int(epoch), int(rank), marker, part[0] if part else "")


def _hold(spec: str) -> Hold:
    epoch, rank, marker, *part = spec.split(":", 3)
    return Hold(int(epoch), int(rank), marker, part[0] if part else "")


def main(argv: list[str]) -> int:
    from vggdist.cli import main as cli_main

    p = argparse.ArgumentParser(prog="python -m tests.train_faults")
    p.add_argument("--kill-worker", type=_kill_worker, action="append", default=[])
    p.add_argument("--hold", type=_hold, action="append", default=[])
    p.add_argument("--record-keys", type=RecordKeys)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    callbacks = [*args.kill_worker, *args.hold, *([args.record_keys] if args.record_keys else [])]
    return cli_main(rest, callbacks=callbacks)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
