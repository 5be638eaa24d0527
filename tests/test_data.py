"""vggdist.data on real tiny shards (real JPEGs, real webdataset reads): exact training steps on every rank with
uneven shards, independent rank streams, exactly-once evaluation over ranks × loader workers, clear errors."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vggdist import data as D
from vggdist import loader as loader_mod
from vggdist.config import DataConfig
from vggdist.shardformat import DataError

CFG = DataConfig(crop_size=32, train_scale=37, shuffle_buffer=8, loader_workers=0)


def tiny_jpeg(i: int) -> bytes:
    """A small real JPEG; sizes vary (landscape, portrait, square) and the colour encodes i."""
    w, h = [(48, 40), (40, 52), (44, 44)][i % 3]
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 5 % 256, y * 4 % 256, np.full_like(x, i % 256)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_split(
    d: Path,
    split: str,
    sizes: list[int],
    manifest_sizes: list[int] | None = None,
    corrupt: frozenset = frozenset(),
) -> list[str]:
    """Shards `{split}-{i:06d}.tar` with sum(sizes) samples; `cls` is the global sample number (so labels
    identify samples); the samples numbered in `corrupt` hold a JPEG cut after its header (undecodable).
    Returns all keys in order."""
    d.mkdir(parents=True, exist_ok=True)
    keys, shards, n = [], [], 0
    for s, size in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(d / name)) as sink:
            for _ in range(size):
                key = f"{split}_{n:06d}"
                meta = {"wnid": f"n{n:08d}", "source": f"x/{key}.JPEG", "width": 1, "height": 1}
                jpg = tiny_jpeg(n)[:40] if n in corrupt else tiny_jpeg(n)
                sink.write({"__key__": key, "jpg": jpg, "cls": str(n).encode(), "json": meta})
                keys.append(key)
                n += 1
        shards.append({"name": name, "samples": size, "bytes": (d / name).stat().st_size, "sha256": "-"})
    if manifest_sizes is not None:
        for entry, m in zip(shards, manifest_sizes, strict=True):
            entry["samples"] = m
    manifest = {
        "format_version": 1,
        "split": split,
        "classes": [{"index": i, "wnid": f"n{i:08d}", "name": str(i)} for i in range(n)],
        "num_samples": sum(e["samples"] for e in shards),
        "shards": shards,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """DIR/train and DIR/val with deliberately uneven shards of 5, 17 and 40 samples."""
    root = tmp_path_factory.mktemp("shards")
    return (
        root,
        write_split(root / "train", "train", [5, 17, 40]),
        write_split(root / "val", "val", [5, 17, 40]),
    )


def run_train(root, *, rank, world_size=2, workers=0, steps=7, batch=4, epoch=0, cfg=CFG):
    loader = D.train_loader(
        root,
        cfg,
        batch_size=batch,
        steps=steps,
        rank=rank,
        world_size=world_size,
        seed=0,
        epoch=epoch,
        num_workers=workers,
    )
    assert len(loader) == steps
    batches = list(loader)
    for images, labels in batches:
        assert images.shape == (batch, 3, cfg.crop_size, cfg.crop_size) and images.dtype == torch.uint8
        assert labels.shape == (batch,) and labels.dtype == torch.int64
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_runs_exactly_the_steps_with_uneven_shards(uneven, workers):
    root = uneven[0]
    steps = D.steps_per_epoch(62, global_batch_size=8)  # 2 ranks x 4
    assert steps == 7
    per_rank = [run_train(root, rank=r, workers=workers, steps=steps) for r in range(2)]
    assert [len(b) for b in per_rank] == [steps, steps]
    seen = torch.cat([lab for b in per_rank for _, lab in b])
    assert seen.min() >= 0 and seen.max() < 62
    # 2 workers over 5 steps: shares 3 and 2 still add up
    assert len(run_train(root, rank=0, workers=2, steps=5)) == 5


def test_more_steps_than_one_pass_and_jittered_scale(uneven):
    cfg = DataConfig(crop_size=32, train_scale=37, scale_jitter=(32, 64), shuffle_buffer=16)
    batches = run_train(uneven[0], rank=1, workers=2, steps=20, batch=8, cfg=cfg)  # 160 > 62 samples
    labels = torch.cat([lab for _, lab in batches])
    assert len(set(labels.tolist())) > 40  # resampling reaches (nearly) everything, every shard
    assert {0 <= v < 5 for v in labels.tolist()} == {True, False}


def test_rank_streams_differ_and_replay(uneven):
    root = uneven[0]

    def labels(**kw):
        return torch.cat([lab for _, lab in run_train(root, **kw)]).tolist()

    r0, r1 = labels(rank=0), labels(rank=1)
    assert r0 != r1
    assert labels(rank=0) == r0  # same (seed, epoch, rank): same stream
    assert labels(rank=0, epoch=1) != r0
    batches = [lab.tolist() for _, lab in run_train(root, rank=0, workers=2, steps=8)]
    assert batches[0::2] != batches[1::2]  # batches alternate between the two loader workers


def test_train_batches_are_real_crops(uneven):
    images, labels = run_train(uneven[0], rank=0, steps=1, batch=6)[0]
    # blue channel of sample n is n (JPEG rounding aside): the label and the pixels travel together
    blue = images[:, 2].float().mean(dim=(1, 2))
    assert torch.allclose(blue, labels.float(), atol=3)


def collect_eval(root, world_size, workers, **kw):
    keys, total, batches = [], 0, 0
    for rank in range(world_size):
        loader = D.eval_loader(root, "val", rank=rank, world_size=world_size, num_workers=workers, **kw)
        n = 0
        for images, labels, k in loader:
            assert len(images) == len(labels) == len(k)
            assert labels.tolist() == [int(x.split("_")[1]) for x in k]
            keys += k
            n += 1
        assert n == len(loader) and loader.samples_seen == loader.num_samples
        total += loader.samples_seen
        batches += n
    return keys, total


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (2, 2), (3, 2), (8, 2)])
def test_eval_sees_every_sample_exactly_once(uneven, world_size, workers):
    root, _, val_keys = uneven
    keys, total = collect_eval(root, world_size, workers, batch_size=4)
    assert sorted(keys) == val_keys  # exactly once, even with 16 slots for 3 shards
    D.check_eval_count(total, D.expected_eval_count(root, "val"))


def test_eval_slots_are_balanced():
    sizes = [D._slot_range(62, k, 6) for k in range(6)]
    assert [hi - lo for lo, hi in sizes] == [10, 10, 11, 10, 10, 11]
    assert sizes[0][0] == 0 and sizes[-1][1] == 62


def test_eval_images_full_rescaled_and_centre_cropped(uneven):
    root = uneven[0]
    images, _, _ = next(iter(D.eval_loader(root, rank=0, world_size=1, batch_size=3)))
    assert [tuple(im.shape) for im in images] == [(3, 40, 48), (3, 52, 40), (3, 44, 44)]  # stored size
    images, _, _ = next(iter(D.eval_loader(root, rank=0, world_size=1, batch_size=3, q=64)))
    assert [tuple(im.shape) for im in images] == [(3, 64, 76), (3, 83, 64), (3, 64, 64)]
    loader = D.center_crop_loader(root, rank=1, world_size=2, q=37, crop=32, batch_size=8, num_workers=2)
    shapes = [tuple(b[0].shape) for b in loader]
    assert all(s[1:] == (3, 32, 32) for s in shapes) and sum(s[0] for s in shapes) == 31


def test_shard_shorter_or_longer_than_manifest_is_an_error(tmp_path):
    write_split(tmp_path / "short", "val", [4, 6], manifest_sizes=[4, 7])
    with pytest.raises(DataError, match="ends after 6 samples"):
        collect_eval(tmp_path / "short", 1, 0)
    write_split(tmp_path / "long", "val", [4, 6], manifest_sizes=[3, 7])
    with pytest.raises(DataError, match="more than the 3 samples"):
        collect_eval(tmp_path / "long", 2, 0)


def test_counts_and_steps():
    assert D.steps_per_epoch(1_281_167, 256) == 5004
    assert D.steps_per_epoch(10, 256) == 1
    D.check_eval_count(50_000, 50_000)
    with pytest.raises(D.EvalCountError, match="counted 49999 images but the manifest lists 50000"):
        D.check_eval_count(49_999, 50_000)


def test_decoder_choice_reaches_the_crops_and_a_missing_extension_is_said(uneven, monkeypatch, caplog):
    from vggdist import jpeg

    runs = {
        name: torch.cat(
            [im for im, _ in run_train(uneven[0], rank=0, steps=3, cfg=replace(CFG, decoder=name))]
        )
        for name in ("auto", "window", "simplejpeg", "pil")
    }
    for name in ("window", "simplejpeg", "pil"):  # same draws, same pixels up to the documented rounding
        assert (runs[name].int() - runs["auto"].int()).abs().max() <= 2
    monkeypatch.setattr(jpeg, "_jpegcrop", None)
    with caplog.at_level("WARNING", logger="vggdist.data"):
        run_train(uneven[0], rank=0, steps=1)
    assert "window JPEG decoder) is not built" in caplog.text and "pip install --no-deps -e ." in caplog.text


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """DIR/train and DIR/val (shards of 5, 17 and 40) whose samples 3 and 30 do not decode."""
    root = tmp_path_factory.mktemp("damaged")
    for split in ("train", "val"):
        write_split(root / split, split, [5, 17, 40], corrupt=frozenset({3, 30}))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_training_samples_are_skipped_counted_and_replaced(damaged, workers, caplog):
    loader = D.train_loader(
        damaged, CFG, batch_size=4, steps=20, rank=0, world_size=1, seed=0, epoch=0, num_workers=workers
    )
    with caplog.at_level("WARNING", logger="vggdist.data"):
        batches = list(loader)  # every batch full (checked by run_train's shapes too): the next draw fills in
    assert len(batches) == 20 and all(len(labels) == 4 for _, labels in batches)
    labels = torch.cat([lab for _, lab in batches]).tolist()
    assert 3 not in labels and 30 not in labels
    assert loader.skipped > 0 and set(loader.skipped_keys) <= {"train_000003", "train_000030"}
    if workers == 0:  # loader processes log in their own process
        assert (
            "skipping sample 'train_000003'" in caplog.text or "skipping sample 'train_000030'" in caplog.text
        )


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_undecodable_eval_images_are_reported_as_skipped_not_as_a_mismatch(damaged, world_size, workers):
    keys, total, skipped = [], 0, []
    for rank in range(world_size):
        loader = D.eval_loader(
            damaged, "val", rank=rank, world_size=world_size, num_workers=workers, batch_size=4
        )
        keys += [k for _, _, batch_keys in loader for k in batch_keys]
        total += loader.samples_seen
        skipped += loader.skipped_keys
    assert total == 60 and sorted(skipped) == ["val_000003", "val_000030"] and len(set(keys)) == 60
    count = D.check_eval_count(total, D.expected_eval_count(damaged, "val"), skipped)
    assert count == (
        "60 counted + 2 skipped (undecodable: keys val_000003, val_000030) = 62 listed; "
        "error rates are over the 60 counted images"
    )
    with pytest.raises(D.EvalCountError, match="counted 59 images \\+ 2 skipped but the manifest lists 62"):
        D.check_eval_count(59, 62, skipped)


class _FifoShard(torch.utils.data.IterableDataset):
    """Reads one shard that is a FIFO: the open blocks until a writer comes, a read that never returns (as on a
    hung NFS mount)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def __iter__(self):
        from vggdist.shardio import tar_samples

        for _sample in tar_samples([{"url": self.path}]):
            yield torch.zeros(1), torch.zeros(1), []


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stuck_shard_read_times_out_instead_of_hanging(tmp_path, workers):
    import os
    import threading

    shard = tmp_path / "train-000000.tar"
    os.mkfifo(shard)
    try:
        loader = loader_mod.Batches(loader_mod.data_loader(_FifoShard(str(shard)), workers, 1.5), 1, timeout_s=1.5)
        with pytest.raises(D.LoaderTimeout, match="no batch from the data loader in 1.5 s"):
            list(loader)
    finally:  # release the blocked reader (a thread of this process, or a loader process that is ending)
        threading.Thread(target=lambda: os.close(os.open(shard, os.O_WRONLY)), daemon=True).start()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_malformed_tar_member_fails_the_loader_with_the_shard_named(tmp_path, workers):
    """A shard whose pax header is malformed (e.g. a record length of 0) raises TarError through the loader,
    in-process and from a loader process, instead of looping: a damaged shard is a clear error, not a hang."""
    from tests.test_shardio import _pax_records, _pax_shard, _with_pax_data
    from vggdist.shardio import TarError

    write_split(tmp_path / "train", "train", [3])
    raw = _pax_shard()
    start, size = _pax_records(raw)[0]
    (tmp_path / "train" / "train-000000.tar").write_bytes(_with_pax_data(raw, start, size, b"0 mtime=0\n"))
    loader = D.train_loader(
        tmp_path, CFG, batch_size=2, steps=2, rank=0, world_size=1, seed=0, epoch=0, num_workers=workers,
        timeout_s=30,
    )  # fmt: skip
    with pytest.raises(TarError, match=r"train-000000\.tar: pax header"):
        list(loader)
