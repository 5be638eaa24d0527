"""DataLoader plumbing shared by the training and evaluation streams of `vggdist.data`: the loader (batches made
in its worker processes), which worker slot a stream runs in, `Batches` (a known length, skipped samples counted,
the count checked) and the bound on a stuck read (`LoaderTimeout` after `data.loader_timeout_s`: DataLoader's
own timeout with worker processes, a watchdog thread in-process). No ray or mlflow imports here.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vggdist.shardformat import DataError


class LoaderTimeout(DataError):
    """No batch came from the loader within its timeout: a read is stuck (a hung network filesystem)."""


DEFAULT_TIMEOUT_S = 600.0


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def data_loader(ds: IterableDataset, num_workers: int, timeout_s: float) -> DataLoader:
    """Batches are made in the workers (batch_size=None); pinned host memory when a GPU will take them.
    A loader process that delivers no batch within `timeout_s` fails the loader (DataLoader's `timeout`)."""
    kw: dict = {}
    if num_workers > 0:
        kw["prefetch_factor"] = 4
        kw["timeout"] = timeout_s
        if sys.platform.startswith("linux"):
            kw["multiprocessing_context"] = (
                "fork"  # cheap start, the dataset object is inherited, not pickled
            )
    return DataLoader(
        ds, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(), **kw
    )


_DONE = object()


def _stuck(timeout_s: float) -> LoaderTimeout:
    return LoaderTimeout(
        f"no batch from the data loader in {timeout_s:g} s: a shard read is stuck (a hung network filesystem?); "
        f"check the data mount, or raise data.loader_timeout_s"
    )


def _timed(loader: DataLoader, timeout_s: float) -> Iterator:
    """The loader processes' batches; DataLoader's own timeout error said as LoaderTimeout."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader timed out" in str(e):
            raise _stuck(timeout_s) from e
        raise


def _watched(iterable, timeout_s: float) -> Iterator:
    """`iterable` produced by a daemon thread, each item awaited at most `timeout_s`: the in-process loader's
    bound on a stuck read (a thread blocked in the kernel cannot be stopped; the caller stops waiting for it)."""
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(entry: tuple) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))

    threading.Thread(target=produce, name="vggdist-loader", daemon=True).start()
    try:
        while True:
            try:
                item, error = items.get(timeout=timeout_s)
            except queue.Empty:
                raise _stuck(timeout_s) from None
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()


class Batches:
    """An iterable of batches with a known length (for progress bars) that checks it yields exactly that many.

    The loader's items carry, last, the keys of the samples skipped while making them (undecodable); Batches
    strips them off, adds them up in `skipped` (count) and `skipped_keys`, and passes on only batches with images
    (an evaluation batch whose images were all skipped is counted, not yielded)."""

    def __init__(
        self,
        loader: DataLoader,
        num_batches: int,
        num_samples: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.num_samples = num_samples  # samples this rank will see (evaluation), None for training
        self.timeout_s = timeout_s
        self.samples_seen = 0
        self.skipped_keys: list[str] = []

    @property
    def skipped(self) -> int:
        return len(self.skipped_keys)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator:
        n = 0
        self.samples_seen = 0
        self.skipped_keys = []
        items = (
            _timed(self.loader, self.timeout_s)
            if self.loader.num_workers > 0
            else _watched(self.loader, self.timeout_s)
        )
        for *batch, skipped in items:
            n += 1
            self.skipped_keys.extend(skipped)
            if len(batch[1]) == 0:
                continue
            self.samples_seen += len(batch[1])
            yield tuple(batch)
        if n != self.num_batches:  # internal invariant: the per-worker shares add up
            raise RuntimeError(f"loader yielded {n} batches, expected {self.num_batches}")
