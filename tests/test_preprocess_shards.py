"""preprocess.shards: the shard job end to end — contract, accounting, exact stats, verify, refusal, resume, Ray."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess.images import ImageLimits
from preprocess.shards import JobError, plan_shards, run_shard_job
from preprocess.sources import list_source
from preprocess.verify import verify
from vggdist.shardformat import read_manifest, read_stats

try:
    from tests import preprocess_fixtures as fx
    from tests import preprocess_jobs as jobs
except ImportError:
    import preprocess_fixtures as fx
    import preprocess_jobs as jobs

LIMITS, PER_SHARD, REPO, WNIDS = jobs.LIMITS, jobs.PER_SHARD, jobs.REPO, jobs.WNIDS
_train_tar, _job, _samples, _assert_same_result = (
    jobs.train_tar,
    jobs.job,
    jobs.samples,
    jobs.assert_same_result,
)
_cli = jobs.cli


@pytest.fixture(scope="module")
def train_tar(tmp_path_factory) -> Path:
    return _train_tar(tmp_path_factory.mktemp("src") / "ILSVRC2012_img_train.tar")


@pytest.fixture(scope="module")
def reference(train_tar, tmp_path_factory) -> Path:
    """One uninterrupted serial run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    run_shard_job(_job(train_tar, out), workers=1, progress=False)
    return out


def test_every_input_is_written_or_rejected_with_its_reason(reference, train_tar):
    m = read_manifest(reference)
    assert m["format_version"] == 1 and m["tool"] == "vggdist-preprocess" and m["split"] == "train"
    assert m["source"] == str(train_tar) and m["max_side"] == 64 and m["seed"] == 0
    assert m["samples_per_shard"] == PER_SHARD and m["tool_version"]
    assert [c["wnid"] for c in m["classes"]] == sorted(WNIDS) and [c["index"] for c in m["classes"]] == [
        0,
        1,
        2,
    ]
    assert m["num_inputs"] == 24 + 15
    assert m["num_samples"] == 24 + 10 and m["num_rejected"] == 5
    assert m["rejected_by_reason"] == {
        "aspect_ratio": 1,
        "empty": 1,
        "too_many_pixels": 1,
        "truncated": 1,
        "undecodable": 1,
    }
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    got = {Path(r["source"]).stem.split("_", 1)[1]: r["reason"] for r in rejects}
    assert got == fx.REFUSED and all(r["detail"] for r in rejects)
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(8)]
    for s in m["shards"]:
        assert 0 < s["samples"] <= PER_SHARD
        assert (reference / s["name"]).stat().st_size == s["bytes"]
    assert sum(s["samples"] for s in m["shards"]) == m["num_samples"]
    assert verify(reference) == []


def test_samples_follow_the_contract_and_small_rgb_jpegs_keep_their_bytes(reference, train_tar):
    m = read_manifest(reference)
    index = {c["wnid"]: c["index"] for c in m["classes"]}
    originals = {}
    with tarfile.open(train_tar) as outer:
        for inner_m in outer:
            with tarfile.open(fileobj=outer.extractfile(inner_m)) as inner:
                for f in inner:
                    originals[f.name.rsplit(".", 1)[0]] = inner.extractfile(f).read()
    samples = _samples(reference)
    assert len(samples) == m["num_samples"]
    kept = 0
    for key, mem in samples.items():
        assert sorted(mem) == ["cls", "jpg", "json"]
        meta = json.loads(mem["json"])
        im = Image.open(io.BytesIO(mem["jpg"]))
        assert (im.format, im.mode) == ("JPEG", "RGB") and im.size == (meta["width"], meta["height"])
        assert min(im.size) <= 64
        assert int(mem["cls"].decode("ascii")) == index[meta["wnid"]] and key.startswith(meta["wnid"])
        assert meta["source"] == f"{train_tar}/{meta['wnid']}.tar/{key}.JPEG"
        kept += mem["jpg"] == originals[key]
    assert kept == 3 * 3 + 1  # plain JPEGs with height 50, 55, 60 and rgb_small (80x60): stored untouched


def test_shards_read_with_webdataset_and_tar(reference):
    import webdataset as wds

    names = [s["name"] for s in read_manifest(reference)["shards"]]
    urls = [str(reference / n) for n in names]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == read_manifest(reference)["num_samples"]
    assert {"__key__", "jpg", "cls", "json"} <= set(got[0])
    listed = subprocess.run(
        ["tar", "-tf", urls[0]], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listed) == 3 * read_manifest(reference)["shards"][0]["samples"]


def test_stats_are_exact_over_the_decoded_stored_pixels(reference):
    pixels = [
        np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).reshape(-1, 3)
        for s in _samples(reference).values()
    ]
    x = np.concatenate(pixels).astype(np.float64)
    st = read_stats(reference)
    assert st["format_version"] == 1 and st["split"] == "train"
    assert st["images"] == len(pixels) and st["pixels"] == len(x)
    np.testing.assert_allclose(st["mean_rgb"], x.mean(0), rtol=1e-12)
    cov = np.cov(x.T, bias=True)
    np.testing.assert_allclose(st["cov_rgb"], cov, rtol=1e-9)
    values, vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(st["eigenvalues"], values[::-1], rtol=1e-9)
    for lam, v in zip(st["eigenvalues"], st["eigenvectors"], strict=True):
        np.testing.assert_allclose(cov @ np.array(v), lam * np.array(v), rtol=1e-7, atol=1e-6)


def test_training_order_is_seeded_and_mixes_classes_while_val_keeps_source_order(train_tar):
    listing = list_source(train_tar)
    a, b = plan_shards(listing, "train", 0, 8), plan_shards(listing, "train", 0, 8)
    assert [t.plan_hash for t in a] == [t.plan_hash for t in b]
    assert [t.plan_hash for t in plan_shards(listing, "train", 1, 8)] != [t.plan_hash for t in a]
    assert all(len({cls for _, cls in t.items}) >= 2 for t in a[:-1])  # every full shard mixes classes
    val = [it.key for t in plan_shards(listing, "val", 0, 8) for it, _ in t.items]
    assert val == [it.key for it in listing.items]


def test_verify_catches_corruption_missing_and_extra_shards(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    assert verify(out) == []
    first = out / "train-000000.tar"
    data = bytearray(first.read_bytes())
    data[1500] ^= 0xFF  # inside the first sample's JPEG data
    first.write_bytes(bytes(data))
    problems = verify(out, workers=2)
    assert any("sha256" in p for p in problems)
    (out / "train-000099.tar").write_bytes(b"")
    (out / "train-000003.tar").unlink()
    problems = verify(out)
    assert any("train-000099.tar" in p for p in problems) and any(
        "train-000003.tar: missing" in p for p in problems
    )


def test_a_different_command_over_existing_output_is_refused_unless_overwrite(reference, train_tar, tmp_path):
    out = tmp_path / "o"
    run_shard_job(_job(train_tar, out), workers=1, progress=False)
    with pytest.raises(JobError, match="--overwrite") as e:
        run_shard_job(_job(train_tar, out, limits=ImageLimits(max_side=32)), workers=1, progress=False)
    assert "max_side" in str(e.value) and "\n" not in str(e.value)
    summary = run_shard_job(
        _job(train_tar, out, limits=ImageLimits(max_side=32)), workers=1, progress=False, overwrite=True
    )
    assert read_manifest(out)["max_side"] == 32 and summary.resumed_shards == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="not empty"):
        run_shard_job(_job(train_tar, foreign), workers=1, progress=False)
    # the same command again is a no-op resume
    again = run_shard_job(_job(train_tar, out, limits=ImageLimits(max_side=32)), workers=1, progress=False)
    assert again.processed == 0 and again.resumed_shards == 8


def test_crash_between_shard_rename_and_marker_then_rerun_equals_uninterrupted(
    reference, train_tar, tmp_path
):
    out = tmp_path / "crash"
    proc = _cli(train_tar, out, "--exit-after-rename", "train-000002.tar")
    assert proc.wait(timeout=60) == 137
    assert (out / "train-000002.tar").exists() and not (out / ".parts" / "train-000002.tar.json").exists()
    proc = _cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert "2 shards resumed" in stdout and "rejected           5" in stdout
    _assert_same_result(out, reference)


def test_kill_9_mid_run_then_rerun_equals_uninterrupted(reference, train_tar, tmp_path):
    out = tmp_path / "killed"
    proc = _cli(train_tar, out, "--sleep-per-image", "0.05")
    deadline = time.monotonic() + 60
    while not list((out / ".parts").glob("train-*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # now somewhere inside a later shard
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    done = len(list((out / ".parts").glob("train-*.json")))
    assert 1 <= done < 8
    proc = _cli(train_tar, out)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert f"{done} shards resumed" in stdout
    _assert_same_result(out, reference)


@pytest.mark.slow
def test_ray_tasks_write_the_same_shards_as_the_serial_path(reference, train_tar, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray_tmp = Path(f"/tmp/rpp{os.getpid()}")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    out = tmp_path / "ray"
    try:
        summary = run_shard_job(_job(train_tar, out), workers=2, progress=False)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    assert summary.written == 34 and sum(summary.rejected.values()) == 5
    _assert_same_result(out, reference)


def test_output_of_a_version_without_max_file_bytes_resumes_as_the_same_command(
    reference, train_tar, tmp_path
):
    import shutil

    out = tmp_path / "older"
    shutil.copytree(reference, out)
    job_file = out / ".parts" / "job.json"
    recorded = json.loads(job_file.read_text())
    del recorded["max_file_bytes"]  # what a job written before the cap existed recorded
    job_file.write_text(json.dumps(recorded))
    again = run_shard_job(_job(train_tar, out), workers=1, progress=False)
    assert again.processed == 0 and again.resumed_shards == 8
    assert json.loads(job_file.read_text())["max_file_bytes"] == ImageLimits().max_file_bytes
    _assert_same_result(out, reference)
