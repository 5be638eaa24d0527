"""vggdist.augment: crop geometry (scale jittering, offsets, centre placement) and the device-side colour shift /
normalisation against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_data import fake_stats
from vggdist import augment
from vggdist.config import DataConfig
from vggdist.jpeg import collate_images


def test_scaled_size_matches_torchvision_resize_rule():
    assert augment.scaled_size(500, 375, 256) == (341, 256)
    assert augment.scaled_size(375, 500, 256) == (256, 341)
    assert augment.scaled_size(300, 300, 224) == (224, 224)


def test_center_offsets_round_like_torchvision_center_crop():
    assert augment.center_offsets(500, 375, 256, 224) == (58, 16)  # (341 - 224) / 2 = 58.5 rounds to even
    assert augment.center_offsets(375, 500, 256, 224) == (16, 58)
    assert augment.center_offsets(300, 300, 224, 224) == (0, 0)


def test_jittered_scale_covers_the_range_and_offsets_fit():
    rng = np.random.default_rng(0)
    draws = [augment.sample_crop(500, 375, (256, 512), 224, rng) for _ in range(3000)]
    scales = np.array([d[0] for d in draws])
    assert scales.min() == 256 and scales.max() == 512  # both ends inclusive
    assert abs(scales.mean() - 384) < 5
    for s, left, top, _ in draws:
        sw, sh = augment.scaled_size(500, 375, s)
        assert 0 <= left <= sw - 224 and 0 <= top <= sh - 224
    assert {augment.sample_crop(500, 375, 256, 224, rng)[0] for _ in range(20)} == {256}


def test_pca_color_offset_matches_numpy():
    st = fake_stats()
    rng = np.random.default_rng(0)
    alpha = rng.normal(0, 0.1, (6, 3))
    lam, p = np.array(st["eigenvalues"]), np.array(st["eigenvectors"])
    expected = np.array([sum(a[i] * lam[i] * p[i] for i in range(3)) for a in alpha])
    got = augment.pca_color_offset(torch.tensor(alpha), torch.tensor(lam), torch.tensor(p))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_device_augment_eval_is_mean_subtraction_and_train_adds_pca_shift():
    st = fake_stats()
    aug = augment.DeviceAugment.from_stats(st, DataConfig(color_shift_std=0.1))
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean = np.array(st["mean_rgb"])
    out = aug(x, train=False)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), x.numpy() - mean[None, :, None, None], atol=1e-4)

    g = torch.Generator().manual_seed(7)
    trained = aug(x, train=True, generator=g)
    alpha = torch.randn((4, 3), generator=torch.Generator().manual_seed(7)).double().numpy() * 0.1
    lam, p = np.array(st["eigenvalues"]) / 255.0, np.array(st["eigenvectors"])
    offset = (alpha * lam) @ p  # (N, 3): Σ α λ/255 p, 0–255 units
    expected = x.numpy() + offset[:, :, None, None] - mean[None, :, None, None]
    np.testing.assert_allclose(trained.numpy(), expected, atol=1e-3)
    shift = (trained - out).mean(dim=(2, 3))  # constant per image and channel
    assert shift.abs().min() > 0 and not torch.allclose(shift[0], shift[1])


def test_color_shift_spread_along_each_axis_is_sigma_lambda():
    st = fake_stats()
    aug = augment.DeviceAugment.from_stats(st, DataConfig(color_shift_std=0.2))
    x = torch.zeros((20000, 3, 1, 1), dtype=torch.uint8)
    offset = aug(x, train=True, generator=torch.Generator().manual_seed(0)) - aug(x, train=False)
    proj = offset.view(-1, 3).double() @ torch.tensor(st["eigenvectors"], dtype=torch.float64).T  # along pᵢ
    expected = 0.2 * np.array(st["eigenvalues"]) / 255.0
    np.testing.assert_allclose(proj.std(0).numpy(), expected, rtol=0.05)


def test_mean_std_normalisation_and_no_mutation_of_float_input():
    st = fake_stats()
    aug = augment.DeviceAugment.from_stats(st, DataConfig(normalize="mean_std"))
    x = torch.rand(2, 3, 4, 4) * 255
    before = x.clone()
    out = aug(x, train=False)
    std = np.sqrt(np.diag(np.array(st["cov_rgb"])))
    expected = (x.numpy() - np.array(st["mean_rgb"])[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


def test_device_augment_keeps_channels_last():
    aug = augment.DeviceAugment.from_stats(fake_stats(), DataConfig())
    x = collate_images([torch.zeros(3, 6, 6, dtype=torch.uint8)] * 2)
    assert aug(x, train=True).is_contiguous(memory_format=torch.channels_last)


def test_device_augment_refuses_inconsistent_stats():
    st = fake_stats()
    st["eigenvectors"] = np.array(st["eigenvectors"]).T.tolist()  # columns instead of rows
    with pytest.raises(ValueError, match="transposed"):
        augment.DeviceAugment.from_stats(st, DataConfig())
