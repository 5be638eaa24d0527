"""What bench/loader.py measures vggdist's training input pipeline against: (a) the naive torchvision pipeline,
ablations of ours that each undo one step (crop-before-resize, the DCT draft decode, Pillow's decoder), and
(c) decode-only ceilings; plus the augmentation constants both sides share. Each factory returns a function of
a list of JPEG bytes (one batch)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.io as tvio
import torchvision.transforms as tvt
import torchvision.transforms.functional as tvf
from PIL import Image

try:
    import simplejpeg
except ImportError:  # the PIL decoder then serves both (b) rows
    simplejpeg = None

from vggdist import augment, jpeg

# ImageNet-like statistics (0–255) for the colour shift and normalisation on both sides.
MEAN = [123.7, 116.3, 103.5]
STD = [58.4, 57.1, 57.4]
EIGVAL = [0.2175 * 255**2, 0.0188 * 255**2, 0.0045 * 255**2]
EIGVEC = [[-0.5675, -0.5808, -0.5836], [0.7192, -0.0045, -0.6948], [0.4009, -0.8140, 0.4203]]
JITTER = (256, 512)
CROP = 224


# ---------------------------------------------------------------------------------------------------------
# (a) naive torchvision


class Lighting:
    """AlexNet's PCA lighting on a float (3, H, W) tensor in [0, 1] — the usual per-image torchvision recipe."""

    def __init__(self, std: float = 0.1) -> None:
        self.std = std
        self.eigval = torch.tensor(EIGVAL) / 255**2
        self.eigvec = torch.tensor(EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return img + ((alpha * self.eigval) @ self.eigvec).view(3, 1, 1)


def naive_pipeline():
    after_resize = tvt.Compose(
        [
            tvt.RandomCrop(CROP),
            tvt.RandomHorizontalFlip(),
            tvt.ToTensor(),
            Lighting(),
            tvt.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
        ]
    )
    rng = np.random.default_rng(0)

    def one(data: bytes) -> torch.Tensor:
        im = Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's default_loader
        s = int(rng.integers(JITTER[0], JITTER[1] + 1))  # scale jittering: Resize(S) with S per image
        return after_resize(tvf.resize(im, s))

    return lambda batch: torch.stack([one(d) for d in batch])


# ---------------------------------------------------------------------------------------------------------
# ablations: ours with one step undone


def rescale_then_crop():
    """Ours without crop-before-resize: full decode, whole image resized to S, then crop (uint8)."""
    rng = np.random.default_rng(0)

    def one(data):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        s, left, top, flip = augment.sample_crop(im.width, im.height, JITTER, CROP, rng)
        im = im.resize(augment.scaled_size(im.width, im.height, s), Image.Resampling.BILINEAR)
        im = im.crop((left, top, left + CROP, top + CROP))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)

    return lambda batch: jpeg.collate_images([one(d) for d in batch])


def crop_without_draft(scale):
    """Ours with crop-before-resize but a full-size decode (no DCT-domain downscale)."""
    rng = np.random.default_rng(0)

    def one(data):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        s, left, top, flip = augment.sample_crop(im.width, im.height, scale, CROP, rng)
        sw, sh = augment.scaled_size(im.width, im.height, s)
        fx, fy = im.width / sw, im.height / sh
        box = (left * fx, top * fy, (left + CROP) * fx, (top + CROP) * fy)
        im = im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)

    return lambda batch: jpeg.collate_images([one(d) for d in batch])


def tv_decode_then_crop():
    """Ours with torchvision.io.decode_jpeg as the decoder (no draft), handed to Pillow's box resampling."""
    rng = np.random.default_rng(0)

    def one(data):
        x = tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (3, H, W)
        h, w = x.shape[1:]
        s, left, top, flip = augment.sample_crop(w, h, JITTER, CROP, rng)
        sw, sh = augment.scaled_size(w, h, s)
        fx, fy = w / sw, h / sh
        im = Image.fromarray(x.permute(1, 2, 0).numpy())
        im = im.resize(
            (CROP, CROP),
            Image.Resampling.BILINEAR,
            box=(left * fx, top * fy, (left + CROP) * fx, (top + CROP) * fy),
        )
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)

    return lambda batch: jpeg.collate_images([one(d) for d in batch])


# ---------------------------------------------------------------------------------------------------------
# (c) decode ceilings


def pil_decode():
    def run(batch):
        for d in batch:
            Image.open(io.BytesIO(d)).load()

    return run


def turbo_decode(scale: int = 1, fastdct: bool = False, fastupsample: bool = False):
    """(c') simplejpeg (libjpeg-turbo 3) decode of the whole image at 1/scale, the decoder `ours` uses."""

    def run(batch):
        for d in batch:
            h, w = simplejpeg.decode_jpeg_header(d)[:2]
            simplejpeg.decode_jpeg(
                d,
                min_width=-(-w // scale),
                min_height=-(-h // scale),
                fastdct=fastdct,
                fastupsample=fastupsample,
            )

    return run


def window_decode():
    """The window decoder alone (vggdist._jpegcrop): the stored pixels one jittered training crop reads."""
    rng = np.random.default_rng(0)

    def run(batch):
        for d in batch:
            w, h, _ = jpeg._jpegcrop.header(d)
            s, left, top, _ = augment.sample_crop(w, h, JITTER, CROP, rng)
            sw, sh = augment.scaled_size(w, h, s)
            fx, fy = w / sw, h / sh
            jpeg._jpegcrop.crop(
                d,
                1,
                int(left * fx) - 2,
                int(top * fy) - 2,
                int((left + CROP) * fx) + 3,
                int((top + CROP) * fy) + 3,
            )

    return run


def tv_decode():
    def run(batch):
        for d in batch:
            tvio.decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))

    return run
