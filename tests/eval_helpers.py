"""Shared by the evaluation tests: a small VGG with image-dependent posteriors, smooth test images, and the
§3.2 protocols computed the slow, obvious way (one view at a time) to compare the real ones against."""

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from vggdist.evaluate import center_crop, multicrop_boxes, rescale, tencrop_boxes
from vggdist.models import build_vgg
from vggdist.paper import SCALES

CROP = 32  # the networks' crop size
K = 8  # classes
SIZES = [(40, 52), (60, 33), (40, 52), (33, 33), (52, 40)]  # test images (H, W), one size repeated


@cache
def eval_model():
    # A random network whose posteriors differ from image to image (a N(0, 1e-4) or Glorot init gives
    # near-uniform, image-independent posteriors and would make the tests' comparisons vacuous).
    torch.manual_seed(0)
    net = build_vgg("A", K, **SCALES["mini"]).double().eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with torch.no_grad():
        fc8 = net.classifier[6]
        calibration = torch.stack(smooth_images(*[(CROP, CROP)] * 64, seed=99))
        fc8.bias -= net(calibration).mean(0)  # remove the part common to all images
        fc8.weight *= 4
        fc8.bias *= 4
    return net


def smooth_images(*sizes, seed=1):
    # Smooth random images (noise upsampled 4x), so rescaling barely changes their statistics.
    g = torch.Generator().manual_seed(seed)
    return [
        F.interpolate(
            torch.randn(1, 3, h // 4 + 1, w // 4 + 1, generator=g, dtype=torch.float64),
            size=(h, w),
            mode="bilinear",
        )[0]
        for h, w in sizes
    ]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def softmax_row(logits):
    return logits.softmax(dim=1)[0]


def brute_single(model, image, q):
    with torch.no_grad():
        return softmax_row(model(center_crop(rescale(image, q), CROP)[None]))


def brute_multicrop(model, image, q):
    image = rescale(image, q)
    crops = [
        image[:, top : top + CROP, left : left + CROP]
        for top, left in multicrop_boxes(image.shape[1], image.shape[2], CROP)
    ]
    views = torch.stack(crops + [crop.flip(-1) for crop in crops])  # (50, 3, CROP, CROP)
    with torch.no_grad():
        return model(views).softmax(dim=1).mean(0)


def brute_dense(dense, image, q):
    image = rescale(image, q)[None]
    with torch.no_grad():
        return (softmax_row(dense(image).mean((2, 3))) + softmax_row(dense(image.flip(-1)).mean((2, 3)))) / 2


def sample_keys(n, start=0):
    return [f"k{i:03d}" for i in range(start, start + n)]


def brute_tencrop(model, image, q):
    image = rescale(image, q)
    crops = [image[:, t : t + CROP, x : x + CROP] for t, x in tencrop_boxes(*image.shape[1:], CROP)]
    views = torch.stack(crops + [crop.flip(-1) for crop in crops])  # (10, 3, CROP, CROP)
    with torch.no_grad():
        return model(views).softmax(dim=1).mean(0)
