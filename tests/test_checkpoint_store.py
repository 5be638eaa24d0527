"""Checkpoint integrity (`vggdist.checkpoint` manifest) and checkpoints in a run's storage
(`vggdist.checkpoint_store`): a partial copy never loads, a full or read-only storage is one clear error with
nothing left behind (on a real small filesystem), the newest whole checkpoint is found, pruning keeps what Ray
Train keeps."""

import errno
import os
import pickle
import shutil

import pytest
import torch

from tests import preprocess_faults as faults
from vggdist import checkpoint as ckpt
from vggdist import checkpoint_store as store
from vggdist.config import preset


def _write(d, epoch=1, top1=50.0, width=8):
    cfg = preset("mini", model="A")
    model = torch.nn.Sequential(torch.nn.Linear(width, width))
    return ckpt.save(d, model=model, config=cfg, meta={"epoch": epoch, "metrics": {"val/top1_err": top1}})


def test_a_checkpoint_records_what_its_writer_wrote_and_loads_only_whole(tmp_path):
    d = _write(tmp_path / "c")
    manifest = ckpt.verify(d)
    assert set(manifest["files"]) == {ckpt.CHECKPOINT_FILE, ckpt.CONFIG_FILE, ckpt.META_FILE}
    assert ckpt.load(d)["model"]["0.weight"].shape == (8, 8)

    cut = tmp_path / "cut"
    shutil.copytree(d, cut)
    f = cut / ckpt.CHECKPOINT_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short by a full disk
    with pytest.raises(ckpt.InvalidCheckpoint, match="checkpoint.pt has .* bytes, its writer wrote"):
        ckpt.load(cut)
    with pytest.raises(ckpt.InvalidCheckpoint, match="checkpoint.pt has"):
        ckpt.load(cut / ckpt.CHECKPOINT_FILE)  # the .pt alone is checked against its directory's manifest

    (cut / ckpt.MANIFEST_FILE).unlink()  # the manifest is copied last: without it, the copy did not finish
    with pytest.raises(ckpt.InvalidCheckpoint, match="has no manifest.json"):
        ckpt.load(cut)

    altered = tmp_path / "altered"
    shutil.copytree(d, altered)
    raw = bytearray((altered / ckpt.CHECKPOINT_FILE).read_bytes())
    raw[-20] ^= 0xFF  # same size, other bytes
    (altered / ckpt.CHECKPOINT_FILE).write_bytes(bytes(raw))
    ckpt.verify(altered, hashes=False)  # the cheap scan looks at sizes ...
    with pytest.raises(ckpt.InvalidCheckpoint, match="differs from what its writer wrote"):
        ckpt.load(altered)  # ... loading checks the hashes


def test_persist_copies_whole_and_latest_finds_the_newest_whole_one(tmp_path):
    run = tmp_path / "storage" / "run"
    for epoch in (1, 2, 3):
        store.persist(_write(tmp_path / f"local{epoch}", epoch), str(run / store.epoch_dir(epoch)))
    assert ckpt.verify(run / "epoch_003")
    (run / "epoch_003" / ckpt.MANIFEST_FILE).unlink()  # epoch 3's copy did not finish
    (run / "epoch_004").mkdir()  # nor did epoch 4's start
    found = store.latest(str(run))
    assert found.epoch == 2 and found.path == str(run / "epoch_002") and found.meta["epoch"] == 2
    assert [f.epoch for f in store.whole_checkpoints(str(run))] == [1, 2]
    assert store.latest(str(tmp_path / "nothing")) is None


def test_prune_keeps_the_best_and_the_latest(tmp_path):
    run = tmp_path / "run"
    for epoch, err in ((1, 60.0), (2, 40.0), (3, 45.0), (4, 70.0)):
        store.persist(_write(tmp_path / f"l{epoch}", epoch, err), str(run / store.epoch_dir(epoch)))
    best = store.prune(str(run), keep=2)
    assert best.epoch == 2
    assert sorted(p.name for p in run.iterdir()) == ["epoch_002", "epoch_003", "epoch_004"]


def test_the_write_error_travels_and_reads_as_one_line(tmp_path):
    e = store.CheckpointWriteError(
        "/s/run/epoch_002", errno.ENOSPC, "x", needed_bytes=5_400_000, free_bytes=1_000_000
    )
    again = pickle.loads(pickle.dumps(e))
    assert again == e and store.CheckpointWriteError.from_dict(e.to_dict()) == e
    text = str(e)
    assert "\n" not in text and "/s/run/epoch_002" in text and "No space left on device" in text
    assert "needs 5.4 MB, 1.0 MB free there" in text and "--storage-path" in text
    assert store.non_retryable_errno(OSError(errno.EROFS, "ro")) == errno.EROFS
    assert store.non_retryable_errno(OSError("AWS Error ACCESS_DENIED: AccessDenied")) == errno.EACCES
    assert store.non_retryable_errno(OSError(errno.EIO, "io")) is None
    assert store.non_retryable_errno(ValueError("no space left on device")) is None


@pytest.fixture
def small_fs(tmp_path):
    try:
        fs = faults.SmallFilesystem(tmp_path)
    except OSError as e:
        pytest.skip(str(e))
    yield fs
    fs.unmount()


def test_a_full_or_read_only_storage_is_one_error_and_leaves_nothing(tmp_path, small_fs):
    local = _write(tmp_path / "local", width=600)  # ~1.4 MB of weights
    need = store.checkpoint_bytes(local)
    dest = small_fs.path / "run" / "epoch_001"
    small_fs.leave_free(need // 2)
    with pytest.raises(store.CheckpointWriteError) as e:
        store.persist(local, str(dest))
    assert e.value.code == errno.ENOSPC and e.value.needed_bytes == need
    assert 0 <= e.value.free_bytes < need and str(dest) in str(e.value)
    assert not dest.exists() and store.latest(str(dest.parent)) is None  # the partial copy is gone

    small_fs.free_space()
    store.persist(local, str(dest))  # space freed: the same copy goes through
    assert store.latest(str(dest.parent)).epoch == 1 and ckpt.load(dest)

    small_fs.remount("ro")
    try:
        with pytest.raises(store.CheckpointWriteError) as e:
            store.persist(local, str(small_fs.path / "run" / "epoch_002"))
        assert e.value.code == errno.EROFS and "make it writable" in str(e.value)
    finally:
        small_fs.remount("rw")
    assert os.listdir(small_fs.path / "run") == ["epoch_001"]
