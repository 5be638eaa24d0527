"""Extension points of a training run: callbacks that run inside the workers, passed to `train(callbacks=...)`.

A callback is any object with one or more of the hook methods of :class:`TrainCallback`; hooks it lacks are not
called. `vggdist.ray_train.train` puts the callbacks into the `WorkerSettings` that Ray pickles to every worker
(and again to a restarted worker group), so a callback must pickle: a frozen dataclass of plain values, defined
at module level in a module the workers can import. A worker process may die and be replaced; state a callback
must keep across that (e.g. "do this once") belongs in a file, not in the object. `run_sweep(callbacks=...)`
hands them to every stage, and `vggdist.cli.main(argv, callbacks=...)` to `train` and `sweep`, so a program
that wraps the CLI (a test, a profiler, a custom logger) can add them without touching the product.

Hooks:

- ``on_epoch_end(event: EpochEnd)``: on every rank after each epoch, once its checkpoint is written and reported
  to Ray Train and its metrics are in the run's spool. Raising here (or ending the process) is a worker failure:
  Ray Train restarts the worker group from that checkpoint.
- ``on_train_sample(key: str, site: SampleSite)``: in the loader process that cut a training crop from sample
  ``key`` (a DataLoader worker process, or the training process with no loader workers), for every sample that
  goes into a batch; skipped (undecodable) samples are not reported. Keep it cheap: it runs per image.

This is how the tests inject faults (kill a worker after an epoch, record the samples each rank trains on); the
product defines no callbacks of its own and reads no environment variable to do either. No ray import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class EpochEnd:
    """What `on_epoch_end` is told: which run, which rank, which epoch (1-based: the number of epochs done)."""

    run_name: str
    epoch: int
    rank: int
    world_size: int
    metrics: Mapping[str, float]  # the epoch's metrics, summed over ranks (the same on every rank)
    checkpoint: str | None  # the epoch's checkpoint in the storage (rank 0), None elsewhere
    local_mode: bool  # True: one worker in the driver's own process (`vggdist.ray_fit`)


@dataclass(frozen=True)
class SampleSite:
    """Where `on_train_sample` runs: the epoch (0-based, as the loader counts), the rank and its loader worker."""

    epoch: int
    rank: int
    loader_worker: int


class TrainCallback(Protocol):
    """The hooks a callback may define (all optional; see the module docstring)."""

    def on_epoch_end(self, event: EpochEnd) -> None: ...

    def on_train_sample(self, key: str, site: SampleSite) -> None: ...


def call_hooks(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Call `hook(*args)` on every callback that defines it, in order."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@dataclass(frozen=True)
class SampleHook:
    """The training loader's per-sample hook for one (epoch, rank): calls `on_train_sample` of every callback that
    has it. Picklable, so a loader started with the spawn method gets it too; None when no callback wants it."""

    callbacks: tuple[Any, ...]
    epoch: int
    rank: int

    @classmethod
    def of(cls, callbacks: Sequence[Any], epoch: int, rank: int) -> SampleHook | None:
        wanted = tuple(cb for cb in callbacks if getattr(cb, "on_train_sample", None) is not None)
        return cls(wanted, epoch, rank) if wanted else None

    def __call__(self, key: str, loader_worker: int) -> None:
        site = SampleSite(self.epoch, self.rank, loader_worker)
        for cb in self.callbacks:
            cb.on_train_sample(key, site)
