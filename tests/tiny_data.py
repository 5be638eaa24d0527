"""A tiny learnable image dataset for end-to-end tests: real JPEGs in an image folder, sharded by vggdist-preprocess;
and stats.json-shaped statistics for the tests of what reads them.

Class c of 4 is a noisy image whose horizontal band c (of 4, top to bottom) is bright: invariant to the horizontal
flips of training augmentation, so the mini networks learn it within a few epochs.
Images have varied sizes (smallest side 40–72) so rescaling, jitter and dense evaluation see real geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.cli import main as preprocess_main

CLASSES = ("n00000001", "n00000002", "n00000003", "n00000004")


def write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(CLASSES):
        d = root / wnid
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h = int(rng.integers(40, 73))
            w = int(rng.integers(40, 90))
            x = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
            x[c * h // 4 : (c + 1) * h // 4] += 150
            Image.fromarray(x).save(d / f"{wnid}_{i}.JPEG", quality=90)
    return root


def make_shards(tmp: Path, train_per_class: int = 48, val_per_class: int = 10, samples_per_shard: int = 30) -> Path:
    """tmp/data/{train,val} shards (uneven last shard on purpose); returns tmp/data."""
    images = tmp / "images"
    write_image_folder(images / "train", train_per_class, seed=1)
    write_image_folder(images / "val", val_per_class, seed=2)
    data = tmp / "data"
    for split in ("train", "val"):
        rc = preprocess_main(["shard", "--source", str(images / split), "--split", split, "--out", str(data / split),
                              "--samples-per-shard", str(samples_per_shard), "--workers", "1", "--no-progress"])
        assert rc == 0
    return data


def fake_stats(seed: int = 0) -> dict:
    """stats.json-shaped statistics of correlated RGB pixels (0–255), PCA rows sorted by eigenvalue."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 50, (5000, 1))
    px = np.clip(120 + base + rng.normal(0, [20, 10, 5], (5000, 3)), 0, 255)
    cov = np.cov(px, rowvar=False)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1]
    return {
        "mean_rgb": px.mean(0).tolist(),
        "cov_rgb": cov.tolist(),
        "eigenvalues": val[order].tolist(),
        "eigenvectors": vec[:, order].T.tolist(),
        "images": 1,
        "pixels": 5000,
    }
