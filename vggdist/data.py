"""WebDataset input pipelines over the shards of `vggdist-preprocess` (`vggdist.shardformat`): §3.1 training, §3.2 testing.

Training (`train_loader`): every rank runs exactly the same number of steps, whatever the shard sizes, because
shards are drawn *with replacement* — each (rank, loader worker) draws shards from its own random stream, reads
them into an in-memory shuffle buffer and cuts exactly its share of the steps. Nothing waits for a shard to
end, so uneven shards cannot make one rank run out before another (the usual DDP hang).

Evaluation (`eval_loader`, `center_crop_loader`): every sample exactly once across all ranks and loader
workers. The samples, in manifest order, are numbered 0 … N−1 and cut into world_size × workers contiguous
ranges of ⌊N/slots⌋ or ⌈N/slots⌉ samples; slot k = rank × workers + worker reads only the shards overlapping
its range and decodes only its samples. This balances the work to ±1 sample per slot whatever the number or
size of the shards (round-robin whole shards would leave up to a shard of imbalance, and with fewer shards
than slots idle slots); a slot whose range starts inside a shard reads, without decoding, that shard's head.
Every slot checks the shard lengths it sees against manifest.json and raises on a mismatch, and the summed
count is checked against the manifest by `check_eval_count` before an error rate is reported.

Undecodable samples (a corrupt JPEG that preprocessing let through, a shard damaged since): training skips the
sample and draws the next one, so the batch keeps its size and every rank its step count; evaluation skips the
image. Both count what they skipped (`Batches.skipped`, the keys for evaluation); the caller decides how many
are too many (`DataConfig.max_skipped_fraction`) and reports them. A malformed tar member raises
(`vggdist.shardio.TarError`, naming the shard): a shard that cannot be parsed is not skipped silently.

A loader never waits for ever on a stuck read (a hung NFS mount): loader processes run under DataLoader's
`timeout` and the in-process path under a watchdog thread with the same bound (`DataConfig.loader_timeout_s`,
default 600 s: longer than any healthy shard read, short enough that a stuck job ends in the same shift);
either raises `LoaderTimeout`, a worker failure that Ray Train retries from the last checkpoint.

Shards are read by `vggdist.shardio.tar_samples` (the same samples as ``webdataset.tarfile_to_samples``, ~5x
cheaper per sample on local files); shuffling uses webdataset's buffer.

Data directories: a directory holding one split (its manifest.json says which) or a parent with `train/`
and `val/` split directories; `vggdist.shardformat.split_dir` resolves either. No ray or mlflow imports here.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from vggdist import jpeg
from vggdist.config import DataConfig
from vggdist.loader import DEFAULT_TIMEOUT_S, Batches, LoaderTimeout, data_loader, worker_slot
from vggdist.shardformat import DataError, read_manifest, shard_files
from vggdist.shardio import tar_samples

logger = logging.getLogger(__name__)

__all__ = [
    "Batches",
    "EvalCountError",
    "LoaderTimeout",
    "center_crop_loader",
    "check_eval_count",
    "eval_loader",
    "expected_eval_count",
    "steps_per_epoch",
    "train_loader",
]


class EvalCountError(DataError):
    """An evaluation saw a different number of images than the manifest lists."""


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps in one pass worth of samples: ⌊num_samples / global_batch_size⌋, at least 1."""
    if num_samples <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"need num_samples > 0 and global_batch_size > 0, got {num_samples}, {global_batch_size}"
        )
    return max(1, num_samples // global_batch_size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")


# ----------------------------------------------------------------------------------------------------------
# training


class _TrainStream(IterableDataset):
    """Yields this (rank, worker)'s share of `steps` batches: (uint8 (B, 3, crop, crop), int64 (B,))."""

    def __init__(
        self, urls, cfg: DataConfig, batch_size, steps, rank, world_size, seed, epoch, on_sample
    ) -> None:
        super().__init__()
        self.urls, self.cfg = urls, cfg
        self.batch_size, self.steps = batch_size, steps
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.on_sample = on_sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = worker_slot()
        my_steps = self.steps // num_workers + (worker < self.steps % num_workers)
        if my_steps == 0:
            return
        # One random stream per (seed, epoch, rank, worker): ranks and workers never share shard draws,
        # shuffles or crops, and a rerun of the same epoch draws the same.
        ss = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker])
        shard_ss, crop_ss, shuffle_ss = ss.spawn(3)
        shard_rng, crop_rng = np.random.default_rng(shard_ss), np.random.default_rng(crop_ss)
        shuffle_rng = random.Random(int(shuffle_ss.generate_state(1)[0]))  # wds.shuffle wants random.Random
        urls = self.urls

        def shard_draws() -> Iterator[dict]:  # endless: {"url": shard} with replacement
            while True:
                yield {"url": urls[int(shard_rng.integers(len(urls)))]}

        samples = tar_samples(shard_draws())  # {"__key__", "__url__", "jpg", "cls", "json"}
        bufsize = self.cfg.shuffle_buffer
        if bufsize > 1:  # raw samples (JPEG bytes) are buffered; decoding happens after the shuffle
            samples = wds.shuffle(bufsize, initial=bufsize, rng=shuffle_rng)(samples)
        scale = self.cfg.scale_jitter or self.cfg.train_scale
        crop, decoder = self.cfg.crop_size, self.cfg.decoder
        on_sample = self.on_sample
        for _ in range(my_steps):
            images, labels, skipped = [], [], []
            for sample in samples:
                image = _decode(sample, lambda b: jpeg.train_crop_jpeg(b, scale, crop, crop_rng, decoder))
                if image is None:  # undecodable: counted, and the next sample takes its place
                    skipped.append(sample["__key__"])
                    continue
                images.append(image)
                labels.append(int(sample["cls"]))
                if on_sample is not None:
                    on_sample(sample["__key__"], worker)
                if len(images) == self.batch_size:
                    break
            yield jpeg.collate_images(images), torch.tensor(labels, dtype=torch.int64), skipped


def _decode(sample: dict, fn):
    """`fn(jpeg bytes)`, or None (logged with the shard, the key and the fix) when the sample does not decode."""
    try:
        return fn(sample["jpg"])
    except Exception as e:  # a content problem of this one sample (a corrupt or truncated image, no "jpg")
        url = sample.get("__url__", "?")
        logger.warning(
            "%s: skipping sample %r, it does not decode (%s: %s); check the shards with "
            "`vggdist-preprocess verify %s`",
            url,
            sample.get("__key__"),
            type(e).__name__,
            e,
            Path(url).parent,
        )
        return None


def train_loader(
    data_dir: str | Path,
    cfg: DataConfig,
    *,
    batch_size: int,
    steps: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    num_workers: int | None = None,
    on_sample: Callable[[str, int], None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Batches:
    """§3.1 training batches for one rank: exactly `steps` of (uint8 (B, 3, crop, crop), int64 (B,)).

    What an epoch is: `steps` (use `steps_per_epoch(num_samples, global_batch_size)`) × the global batch,
    i.e. one pass worth of samples, but drawn with replacement at the shard level: each (rank, loader worker)
    draws shards uniformly from its own stream seeded by (seed, epoch, rank, worker), reads them whole into a
    `cfg.shuffle_buffer`-sample shuffle buffer, and crops with S fixed or jittered (cfg). In expectation every
    sample is seen once per epoch; there is no guarantee that each is (some shards are read twice, some not
    at all, and a shard read partly at the end of an epoch is not resumed). In exchange every rank runs
    exactly `steps` steps whatever the shard sizes, and ranks draw from independent streams (no collisions
    beyond chance). Steps are split over the `num_workers` loader workers (default cfg.loader_workers) so
    they add up exactly. Images are channels_last uint8; convert them on the device with
    `vggdist.augment.DeviceAugment`. `on_sample(key, loader_worker)` is called for every sample that goes into a
    batch, in the loader process (`vggdist.callbacks.SampleHook`; it must pickle where loaders are spawned).
    Undecodable samples are skipped and replaced by the next draw (`.skipped` counts them); no batch within
    `timeout_s` raises LoaderTimeout.
    """
    _check_rank(rank, world_size)
    if batch_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1 and steps >= 0, got {batch_size}, {steps}")
    urls = shard_files(data_dir, "train")[0]
    workers = cfg.loader_workers if num_workers is None else num_workers
    ds = _TrainStream(urls, cfg, batch_size, steps, rank, world_size, seed, epoch, on_sample)
    decoder = jpeg.available_decoder() if cfg.decoder == "auto" else cfg.decoder
    if decoder != "window" and cfg.decoder in ("auto", "window") and rank == 0 and epoch == 0:
        logger.warning(
            "vggdist._jpegcrop (the window JPEG decoder) is not built, training crops decode ~1.6x slower with "
            "%s; install libjpeg headers + a C compiler and run `pip install --no-deps -e .`",
            decoder,
        )
    logger.debug(
        "train loader rank %d/%d: %d steps of %d, %d shards, %d workers, %s decoder",
        rank,
        world_size,
        steps,
        batch_size,
        len(urls),
        workers,
        decoder,
    )
    return Batches(data_loader(ds, workers, timeout_s), steps, timeout_s=timeout_s)


# ----------------------------------------------------------------------------------------------------------
# evaluation


def _slot_range(total: int, slot: int, slots: int) -> tuple[int, int]:
    """Samples [lo, hi) of slot `slot` out of `slots`: contiguous, sizes ⌊total/slots⌋ or ⌈total/slots⌉."""
    return total * slot // slots, total * (slot + 1) // slots


class _EvalStream(IterableDataset):
    """This (rank, worker) slot's samples, once: (images, int64 labels (B,), keys)."""

    def __init__(self, urls, counts, rank, world_size, batch_size, q, crop) -> None:
        super().__init__()
        self.urls, self.counts = urls, counts
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.q, self.crop = q, crop

    def _image(self, data: bytes) -> torch.Tensor:
        if self.crop is not None:
            return jpeg.center_crop_jpeg(data, self.q, self.crop)  # (3, crop, crop)
        return jpeg.decode_rescaled(data, self.q)  # (3, H, W), smallest side Q (or as stored)

    def _batch(self, images, labels, keys, skipped):
        if self.crop is not None:
            imgs = (
                jpeg.collate_images(images)
                if images
                else torch.empty(0, 3, self.crop, self.crop, dtype=torch.uint8)
            )
        else:
            imgs = images
        return imgs, torch.tensor(labels, dtype=torch.int64), keys, skipped

    def __iter__(self):
        worker, num_workers = worker_slot()
        lo, hi = _slot_range(
            sum(self.counts), self.rank * num_workers + worker, self.world_size * num_workers
        )
        images, labels, keys, skipped = [], [], [], []
        start = 0
        for url, count in zip(self.urls, self.counts, strict=True):
            first, start = start, start + count
            if start <= lo or first >= hi:
                continue  # no sample of this shard is ours
            n = 0
            for i, sample in enumerate(tar_samples([{"url": url}])):
                if i >= count:
                    raise DataError(
                        f"{url} holds more than the {count} samples manifest.json lists; "
                        f"run `vggdist-preprocess verify {Path(url).parent}`"
                    )
                n = i + 1
                g = first + i  # global sample number
                if g < lo:
                    continue  # read, not decoded
                if g >= hi:
                    break
                image = _decode(sample, self._image)
                if image is None:
                    skipped.append(sample["__key__"])
                else:
                    images.append(image)
                    labels.append(int(sample["cls"]))
                    keys.append(sample["__key__"])
                if len(images) + len(skipped) == self.batch_size:  # batch boundaries by sample, as planned
                    yield self._batch(images, labels, keys, skipped)
                    images, labels, keys, skipped = [], [], [], []
            else:
                if n < count:
                    raise DataError(
                        f"{url} ends after {n} samples but manifest.json lists {count}; "
                        f"run `vggdist-preprocess verify {Path(url).parent}`"
                    )
        if images or skipped:  # the partial last batch is kept: every image counts
            yield self._batch(images, labels, keys, skipped)


def eval_loader(
    data_dir: str | Path,
    split: str = "val",
    *,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    q: int | None = None,
    crop: int | None = None,
    batch_size: int = 32,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Batches:
    """§3.2 test images, each exactly once across all ranks × loader workers (see the module docstring).

    Yields (images, labels int64 (B,), keys list[str]). Without `crop`: images is a list of uint8 (3, H, W),
    rescaled to smallest side `q` (or as stored when q is None; multi-scale evaluation rescales the tensors
    in vggdist.evaluate). With `crop`: a uint8 (B, 3, crop, crop) channels_last batch of centre crops at Q.
    Batches hold up to `batch_size` images; the last of each slot may be smaller (nothing dropped or padded).
    `len()` is this rank's batch count and `.num_samples` its image count; sum the images seen (and the keys
    skipped as undecodable, `.skipped_keys`) over ranks and pass them to `check_eval_count`. No batch within
    `timeout_s` raises LoaderTimeout.
    """
    _check_rank(rank, world_size)
    if crop is not None and q is None:
        raise ValueError("a centre crop needs the test scale q (Q >= crop)")
    if crop is not None and q < crop:
        raise ValueError(f"test scale q={q} must be >= crop={crop}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    urls, counts = shard_files(data_dir, split)
    ds = _EvalStream(urls, counts, rank, world_size, batch_size, q, crop)
    slots = max(1, num_workers)
    sizes = [
        hi - lo
        for lo, hi in (_slot_range(sum(counts), rank * slots + w, world_size * slots) for w in range(slots))
    ]
    return Batches(
        data_loader(ds, num_workers, timeout_s),
        sum(math.ceil(n / batch_size) for n in sizes),
        num_samples=sum(sizes),
        timeout_s=timeout_s,
    )


def center_crop_loader(
    data_dir: str | Path,
    split: str = "val",
    *,
    rank: int,
    world_size: int,
    q: int,
    crop: int,
    batch_size: int = 64,
    num_workers: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Batches:
    """Per-epoch single-scale validation: (uint8 (B, 3, crop, crop), labels, keys), centre crops at Q, exactly once."""
    return eval_loader(
        data_dir,
        split,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        q=q,
        crop=crop,
        batch_size=batch_size,
        timeout_s=timeout_s,
    )


def expected_eval_count(data_dir: str | Path, split: str = "val") -> int:
    """How many images an evaluation of `split` must count: manifest.json's num_samples."""
    return int(read_manifest(data_dir, split)["num_samples"])


def check_eval_count(seen: int, expected: int, skipped_keys: list[str] | tuple[str, ...] = ()) -> str:
    """Raise unless an evaluation accounted for every image exactly once: `seen` counted (summed over all ranks)
    plus the `skipped_keys` (undecodable) make the manifest's `expected`. Returns the count as a sentence, e.g.
    "9,998 counted + 2 skipped (undecodable: keys a, b) = 10,000 listed", whose error rates are over the counted."""
    skipped = len(skipped_keys)
    if seen + skipped != expected:
        extra = f" + {skipped:,} skipped" if skipped else ""
        raise EvalCountError(
            f"evaluation counted {seen} images{extra} but the manifest lists {expected}: no error rate is "
            f"reported; check the shards with `vggdist-preprocess verify DIR` and that every rank evaluated its share"
        )
    if not skipped:
        return f"{seen:,} counted = {expected:,} listed"
    shown = ", ".join(sorted(skipped_keys)[:10]) + (", …" if skipped > 10 else "")
    return (
        f"{seen:,} counted + {skipped:,} skipped (undecodable: keys {shown}) = {expected:,} listed; "
        f"error rates are over the {seen:,} counted images"
    )
