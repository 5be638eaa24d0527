"""preprocess.stats: exact integer moments, exact merge, covariance and PCA against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocess import stats as S
from preprocess.stats import RGBMoments, format_stats, pca, stats_dict
from vggdist.shardformat import read_stats

needs_c = pytest.mark.skipif(S._rgb_moments is None, reason="preprocess._moments was not built")


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (rng.integers(5, 40), rng.integers(5, 40), 3), dtype=np.uint8) for _ in range(n)
    ]


def test_moments_are_exact_integers_and_match_numpy():
    imgs = _images()
    m = RGBMoments()
    for im in imgs:
        m.add_image(im)
    x = np.concatenate([im.reshape(-1, 3) for im in imgs]).astype(np.int64)
    assert m.images == len(imgs) and m.pixels == len(x)
    assert m.sum_rgb == x.sum(0).tolist()
    assert m.sum_outer == (x.T @ x).tolist()
    np.testing.assert_allclose(m.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(x.T, bias=True), rtol=1e-10, atol=1e-9)


@needs_c
def test_c_and_numpy_moments_agree_exactly_also_across_the_32_bit_blocks(monkeypatch):
    # the C loop sums blocks of 66,051 pixels in uint32: an all-255 image of 3 blocks and a bit, plus a
    # non-contiguous view (the C path makes it contiguous first)
    rng = np.random.default_rng(3)
    images = [
        np.full((7, 30_000, 3), 255, np.uint8),
        rng.integers(0, 256, (301, 700, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)[::2, ::3],
    ]
    c = RGBMoments()
    for im in images:
        c.add_image(im)
    monkeypatch.setattr(S, "_rgb_moments", None)
    ref = RGBMoments()
    for im in images:
        ref.add_image(im)
    assert c == ref
    assert c.sum_outer[0][0] == 210_000 * 255 * 255 + int((images[1][..., 0].astype(np.int64) ** 2).sum()) + int(
        (images[2][..., 0].astype(np.int64) ** 2).sum()
    )


@needs_c
def test_c_moments_refuse_what_is_not_interleaved_uint8():
    with pytest.raises(ValueError, match="multiple of 3"):
        S._rgb_moments(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        S._rgb_moments(np.zeros((4, 4, 3), np.float32))


def test_merge_is_exact_in_any_order_and_survives_json():
    imgs = _images(8, seed=1)
    whole = RGBMoments()
    for im in imgs:
        whole.add_image(im)
    parts = [RGBMoments(), RGBMoments(), RGBMoments()]
    for i, im in enumerate(imgs):
        parts[i % 3].add_image(im)
    merged = RGBMoments()
    for p in reversed(parts):
        merged.merge(RGBMoments.from_json(json.loads(json.dumps(p.to_json()))))
    assert merged == whole


def test_pca_rows_are_unit_eigenvectors_in_descending_order():
    cov = np.array([[300.0, 50, 20], [50, 200, 10], [20, 10, 100]])
    values, vectors = pca(cov)
    assert list(values) == sorted(values, reverse=True)
    for lam, v in zip(values, vectors, strict=True):
        np.testing.assert_allclose(cov @ v, lam * v, atol=1e-9)
        assert abs(np.linalg.norm(v) - 1) < 1e-12


def test_stats_dict_load_and_format(tmp_path):
    m = RGBMoments()
    m.add_image(_images(1)[0])
    d = stats_dict(m, "train")
    assert d["format_version"] == 1 and d["split"] == "train" and len(d["eigenvectors"]) == 3
    (tmp_path / "stats.json").write_text(json.dumps(d))
    assert read_stats(tmp_path) == d
    assert "mean RGB" in format_stats(d)
    with pytest.raises(FileNotFoundError, match="vggdist-preprocess shard"):
        read_stats(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="uint8"):
        m.add_image(np.zeros((2, 2, 3), np.float32))
