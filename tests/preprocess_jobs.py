"""A shard job the preprocessing tests share: a train tar holding every image kind, the job over it, a reference
to compare against, and the command line as a real process (optionally through tests.preprocess_faults)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from preprocess.images import ImageLimits
from preprocess.shards import ShardJob
from preprocess.verify import verify
from vggdist.shardformat import read_manifest, read_stats

try:
    from tests import preprocess_fixtures as fx
except ImportError:
    import preprocess_fixtures as fx

REPO = Path(__file__).resolve().parent.parent
WNIDS = ["n03000000", "n01000000", "n02000000"]
LIMITS = ImageLimits(max_side=64)
PER_SHARD = 5


def train_tar(path: Path) -> Path:
    """3 classes × 8 plain JPEGs, plus every special kind spread over the classes (24 + 15 inputs, 8 shards)."""
    per_class = {
        w: {f"{w}_{i}.JPEG": fx.rgb_jpeg(60 + 7 * i, 50 + 5 * i, c * 10 + i) for i in range(8)}
        for c, w in enumerate(WNIDS)
    }
    for i, (kind, data) in enumerate(sorted(fx.image_kinds().items())):
        w = WNIDS[i % 3]
        per_class[w][f"{w}_{kind}.JPEG"] = data
    return fx.make_train_tar(path, per_class)


def job(source: Path, out: Path, **kw) -> ShardJob:
    return ShardJob(
        str(source), "train", str(out), limits=kw.pop("limits", LIMITS), samples_per_shard=PER_SHARD, **kw
    )


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for s in read_manifest(out)["shards"]:
        with tarfile.open(out / s["name"]) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = t.extractfile(m).read()
    return found


def assert_same_result(out: Path, reference: Path) -> None:
    a, b = read_manifest(out), read_manifest(reference)
    assert a["shards"] == b["shards"]  # same samples, same bytes (sha256), same shards
    assert samples(out).keys() == samples(reference).keys()
    assert read_stats(out) == read_stats(reference)
    assert (out / "rejects.jsonl").read_text() == (reference / "rejects.jsonl").read_text()
    assert not list(out.glob(".*.tmp-*")) and verify(out) == []


def cli(source: Path, out: Path, *faults: str, extra: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    """`vggdist-preprocess shard` over ``source`` as a real process; with ``faults`` (tests.preprocess_faults
    options), through that test-only driver, which hands them to the job as ShardHooks."""
    args = [
        "shard",
        "--source",
        str(source),
        "--split",
        "train",
        "--out",
        str(out),
        "--max-side",
        "64",
        "--samples-per-shard",
        str(PER_SHARD),
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]
    entry = ["-m", "tests.preprocess_faults", *faults, "--"] if faults else ["-m", "preprocess"]
    return subprocess.Popen(
        [sys.executable, *entry, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )
