"""§3.1 training augmentation and §3.2 test-image rescaling, split between the CPU (uint8) and the device (float).

CPU side, one JPEG at a time, producing uint8 tensors (3, H, W) and nothing bigger than what is asked for:

- `train_crop_jpeg`: isotropic rescale so the smallest side is S (fixed, or drawn per image uniformly from the
  integers of [S_min, S_max] — scale jittering), a uniformly placed crop × crop window, a horizontal flip with
  probability 1/2. It never builds the rescaled image: the crop window is chosen in S-space, mapped back to
  the stored image, and only that box is resampled (`Image.resize(size, box=...)`). Pillow's resampling with
  a box places every output pixel and its filter support exactly where a full resize followed by a crop
  would, so this is the same operation as rescale-then-crop, not an approximation (tests check it).
  When the stored image is at least 2× larger than S-space, the JPEG is decoded directly at 1/2, 1/4 or 1/8
  size in the DCT domain (`Image.draft`), never below the S-space size, so resampling only ever downsizes.
  Three decoders produce the same crop from the same random draws (`decoder=` / `data.decoder`; "auto" takes
  the first that applies to the file):
  1. **window** (`vggdist._jpegcrop`, a small C extension over the system libjpeg-turbo, built at install
     time): decodes only the pixels the resampling reads — the box plus the bilinear filter's support. Rows
     above the window are entropy-decoded but skip IDCT and colour conversion (``jpeg_skip_scanlines``), rows
     below it are never read, and columns outside it skip IDCT / upsampling / colour conversion
     (``jpeg_crop_scanline``); the same 1/2–1/8 DCT scale as the draft. Its decoded pixels are a full decode's
     bit for bit (tests); the box, moved into the window's coordinates, rounds differently in the last bit,
     which changes ~0.1 % of output values by 1–2 grey levels.
  2. **simplejpeg** (a dependency; libjpeg-turbo 3 bundled): the whole image at the same DCT scale, as RGBX
     (Pillow's own RGB layout) into a reused buffer Pillow resamples in place: the PIL route's pixels.
  3. **pil**: `Image.draft` + Pillow's decoder. It also serves every file the others decline (CMYK, PNG,
     anything libjpeg warns about, e.g. truncated data, where Pillow's own policy then applies).
- `center_crop_jpeg` (per-epoch single-scale validation at Q) and `decode_rescaled` (whole image, smallest side
  Q, for dense / multi-crop evaluation in vggdist.evaluate). Both decode with the window decoder when it
  applies (the central box; the whole image, bit-identical to the PIL route), else with PIL.

Decoder choices for the training crop (bench/loader.py; jitter [256, 512], 224 crop, photo-like q90 JPEGs of
500×375 … 683×512, one core, CPU time; naive torchvision ≈ 280–340 img/s on the same runs):

- window decoder (kept, the default): 1.6–1.7× the PIL route, ~780–800 img/s ≈ 2.5–2.8× naive. The
  window decode alone runs at ~1,050 img/s (1.65–1.9× a full PIL decode): a jittered 224 crop needs ~30 % of
  a stored image's pixels on average and ends ~80 % of the way down. What is left is the entropy decoding of
  the rows down to the window's bottom, which no libjpeg option skips, plus ~0.3 ms of box resampling,
  packing and collation per image.
- simplejpeg, exact: 1.07–1.17× the PIL route (its decode alone: 1.11–1.13× PIL's `load()`).
- fastdct (IFAST IDCT): +3%, but a −0.8 grey-level mean bias and 1.0 mean |Δ| against rescale-then-crop
  (the exact route: 0.45 mean |Δ|, no bias; on bench/loader.py's images); fastupsample (replicated
  chroma): +0–3%, 2.3 mean |Δ|, up to 62 on colour edges; both: +7%. Not equivalent enough: not used.
- libjpeg-turbo's fractional M/8 scales (7/8 … 3/8, i.e. decoding right at S-space): 0.85× — slower than
  a full decode (the non-power-of-2 inverse DCTs and upsamplers have no SIMD) and 2.1 mean |Δ|: not used.
- Output packing: the crop leaves Pillow packed to RGB (``tobytes("raw", "RGB")``) into a fresh contiguous
  array; a 4-byte-strided RGBX view looked cheaper but made `collate_images` 30× slower (0.37 vs 0.012 ms per
  image).

Device side, batched (`DeviceAugment`): uint8 → float, the PCA colour shift (training only) and mean-RGB
subtraction (optionally /std), with the statistics of `stats.json`. Doing this on the accelerator keeps the
CPU → device copy at 1 byte per value and costs the CPU nothing.

Colour shift, precisely (AlexNet, Krizhevsky et al. 2012 §4.1; VGG §3.1 follows it): per image draw
α ~ N(0, σ)³ (σ = `DataConfig.color_shift_std`) and add to every pixel the RGB offset Σᵢ αᵢ λᵢ pᵢ, with pᵢ, λᵢ
the eigenvectors / eigenvalues of the 3×3 RGB covariance. The scheme is not scale-invariant (λ is a squared
value, the offset a value), so the pixel scale matters: we use the widely reproduced convention of pixel
values in [0, 1] (fb.resnet.torch, timm's ``eigval ≈ (0.2175, 0.0188, 0.0045)``). stats.json holds λ of
0–255 values, i.e. 255² × the [0, 1] eigenvalues, so the offset in 0–255 units is
``255 · Σ αᵢ (λᵢ / 255²) pᵢ = Σ αᵢ (λᵢ / 255) pᵢ`` (`EIGVAL_TO_PIXELS` = 1/255). On ImageNet this gives a
typical shift of ~5 grey levels along the first axis at σ = 0.1. No clipping afterwards, as in AlexNet.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from vggdist.config import JPEG_DECODERS, DataConfig
from vggdist.shardformat import check_stats

try:  # the window decoder (C, system libjpeg-turbo): optional, built at install time when headers exist
    from vggdist import _jpegcrop
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _jpegcrop = None
try:  # libjpeg-turbo straight into numpy for the training crop; PIL when missing
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where the package is absent
    simplejpeg = None

logger = logging.getLogger(__name__)
_TURBO_BUFFER = threading.local()  # the decoders' output, reused image to image (one per thread)

__all__ = [
    "DECODER_CHOICES",
    "EIGVAL_TO_PIXELS",
    "DeviceAugment",
    "available_decoder",
    "center_crop_jpeg",
    "collate_images",
    "decode_for_size",
    "decode_rescaled",
    "normalize",
    "pca_color_offset",
    "rescaled_crop",
    "sample_crop",
    "scaled_size",
    "train_crop_jpeg",
    "turbo_crop",
    "window_crop",
]

# λ of stats.json (variances of 0–255 values) → the factor that makes Σ α λ p an offset in 0–255 units under
# the [0, 1]-pixel convention (see the module docstring).
EIGVAL_TO_PIXELS = 1.0 / 255.0
_BILINEAR = Image.Resampling.BILINEAR  # torchvision's Resize default for PIL images (antialiased)


# ----------------------------------------------------------------------------------------------------------
# CPU side: JPEG bytes → uint8 (3, H, W)


def scaled_size(width: int, height: int, s: int) -> tuple[int, int]:
    """(width, height) after an isotropic rescale to smallest side `s` (torchvision's ``Resize(s)`` rounding)."""
    if width <= height:
        return s, int(s * height / width)
    return int(s * width / height), s


def decode_for_size(data: bytes, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """Decode a JPEG at the smallest DCT scale (1, 1/2, 1/4, 1/8) that stays ≥ `size` in both dimensions.

    Returns the decoded RGB image and the factor from stored to decoded pixel coordinates (1.0, 0.5, ...).
    """
    return _decode_at(Image.open(io.BytesIO(data)), size)


def _decode_at(im: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """`decode_for_size` for an opened, not yet loaded image."""
    factor = 1.0
    if im.format == "JPEG":
        stored_w = im.width
        # draft() decodes at 1/k, k the largest of 8, 4, 2 with both sides still ≥ `size`; its box is the
        # whole image in decoded coordinates, (0, 0, W/k, H/k)
        res = im.draft("RGB", (max(1, size[0]), max(1, size[1])))
        if res is not None:
            factor = res[1][2] / stored_w
    if im.mode != "RGB":  # the shard contract says RGB; stay correct for grayscale / CMYK anyway
        return im.convert("RGB"), factor
    im.load()
    return im, factor


def _to_chw(im: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 (3, H, W): a permuted view of the HWC pixels (channels_last strides, no transpose)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def _rgbx_to_chw(im: Image.Image) -> torch.Tensor:
    """Pillow RGB/RGBX image → contiguous uint8 (H, W, 3) pixels seen as (3, H, W); packed to RGB by Pillow's
    packer straight from its 4-byte pixels (~2x cheaper than ``convert("RGB")`` + ``np.array``). Packed RGB
    matters: `collate_images` copies contiguous rows ~30x faster than a 4-byte-strided view."""
    w, h = im.size
    hwc = np.empty((h, w, 3), dtype=np.uint8)
    hwc[...] = np.frombuffer(im.tobytes("raw", "RGB"), dtype=np.uint8).reshape(h, w, 3)
    return torch.from_numpy(hwc).permute(2, 0, 1)


def _crop(im: Image.Image, s: int, left: int, top: int, crop: int, flip: bool) -> torch.Tensor:
    """Window (left, top, crop × crop) of opened image `im` rescaled to smallest side `s`, as uint8 (3, crop, crop)."""
    w, h = im.size
    sw, sh = scaled_size(w, h, s)
    _check_window(sw, sh, s, left, top, crop)
    im, factor = _decode_at(im, (sw, sh))
    # S-space → decoded coordinates per axis (scaled_size rounds the long side, so the two ratios differ a bit)
    fx, fy = w * factor / sw, h * factor / sh
    out = im.resize((crop, crop), _BILINEAR, box=(left * fx, top * fy, (left + crop) * fx, (top + crop) * fy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_chw(out)


def rescaled_crop(data: bytes, s: int, left: int, top: int, crop: int, flip: bool = False) -> torch.Tensor:
    """The crop × crop window at (left, top) of the image rescaled to smallest side `s`: uint8 (3, crop, crop).

    Same result as ``Resize(s)`` → ``crop((left, top, left + crop, top + crop))`` (→ horizontal flip), computed
    from the stored pixels of that window only.
    """
    return _crop(Image.open(io.BytesIO(data)), s, left, top, crop, flip)


def sample_crop(
    width: int, height: int, scale: int | Sequence[int], crop: int, rng: np.random.Generator
) -> tuple[int, int, int, bool]:
    """Draw (S, left, top, flip) for a stored width × height image: the random part of §3.1's augmentation.

    `scale` is S or (S_min, S_max); S is then uniform over the integers S_min … S_max. The window offset is
    uniform over every position inside the S-rescaled image (torchvision's RandomCrop); flip with p = 1/2.
    """
    if isinstance(scale, (int, np.integer)):
        s = int(scale)
    else:
        s = int(rng.integers(scale[0], scale[1] + 1))
    sw, sh = scaled_size(width, height, s)
    left = int(rng.integers(0, sw - crop + 1))
    top = int(rng.integers(0, sh - crop + 1))
    return s, left, top, bool(rng.random() < 0.5)


def _draft_denom(w: int, h: int, sw: int, sh: int) -> int:
    """The DCT scale PIL's draft picks: 1/k, k the largest of 8, 4, 2 with k · S-space ≤ stored size (else 1)."""
    return next((k for k in (8, 4, 2) if w >= k * sw and h >= k * sh), 1)


def _check_window(sw: int, sh: int, s: int, left: int, top: int, crop: int) -> None:
    if not (0 <= left <= sw - crop and 0 <= top <= sh - crop):
        raise ValueError(f"a {crop}x{crop} crop at ({left}, {top}) does not fit the {sw}x{sh} image at S={s}")


def _decode_plan(
    w: int, h: int, s: int, left: int, top: int, crop: int
) -> tuple[int, tuple[float, float, float, float]]:
    """For a crop of the w × h stored image at scale S: the DCT scale 1/k to decode at, and the crop's box in
    decoded coordinates (decoded = stored / k). Raises when the window does not fit."""
    sw, sh = scaled_size(w, h, s)
    _check_window(sw, sh, s, left, top, crop)
    k = _draft_denom(w, h, sw, sh)
    fx, fy = w / (k * sw), h / (k * sh)  # S-space → decoded coordinates (per axis: scaled_size rounds)
    return k, (left * fx, top * fy, (left + crop) * fx, (top + crop) * fy)


def _buffer(name: str, size: int) -> np.ndarray:
    """This thread's reused uint8 decode buffer `name`, at least `size` bytes (grown, never shrunk)."""
    buf = getattr(_TURBO_BUFFER, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.uint8)
        setattr(_TURBO_BUFFER, name, buf)
    return buf


def _resample(im: Image.Image, crop: int, box: tuple[float, ...], flip: bool) -> torch.Tensor:
    """Box `box` of the decoded RGBX image → crop × crop (antialiased bilinear), mirrored when `flip`."""
    out = im.resize((crop, crop), _BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _rgbx_to_chw(out)


def _window_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) when the window decoder can decode `data` to RGB, else None (not built, CMYK, not a JPEG)."""
    if _jpegcrop is None or (header := _jpegcrop.header(data)) is None:
        return None
    return header[0], header[1]


def _window_crop(
    data: bytes, w: int, h: int, s: int, left: int, top: int, crop: int, flip: bool
) -> torch.Tensor | None:
    """`_crop` through vggdist._jpegcrop: decode only the pixels the resampling reads; None when it cannot."""
    k, box = _decode_plan(w, h, s, left, top, crop)
    # Pillow's bilinear filter reads up to max(1, box side / crop) pixels either side of an output pixel's
    # centre (it is widened when downsizing); decode the box plus that margin, plus one for rounding
    mx, my = max(1.0, (box[2] - box[0]) / crop), max(1.0, (box[3] - box[1]) / crop)
    window = (
        math.floor(box[0] - mx) - 1,
        math.floor(box[1] - my) - 1,
        math.ceil(box[2] + mx) + 1,
        math.ceil(box[3] + my) + 1,
    )
    # decoded straight into this thread's reused buffer (sized for the whole decoded image, so always enough)
    buf = _buffer("window", -(-w // k) * -(-h // k) * 4)
    try:
        _, x0, y0, ww, wh, _, _ = _jpegcrop.crop(data, k, *window, buf)
    except ValueError:  # damaged data (libjpeg warnings included): Pillow's route decides what happens
        return None
    # the same resampling as the full-image routes, with the box moved into the window's coordinates; the
    # window holds every pixel the filter reads, and the image's own edges are the window's edges there
    im = Image.frombuffer("RGBX", (ww, wh), buf[: ww * wh * 4], "raw", "RGBX", 0, 1)
    return _resample(im, crop, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), flip)


def window_crop(
    data: bytes, s: int, left: int, top: int, crop: int, flip: bool = False
) -> torch.Tensor | None:
    """`rescaled_crop` through the window decoder (vggdist._jpegcrop); None where that path does not apply."""
    size = _window_header(data)
    return None if size is None else _window_crop(data, *size, s, left, top, crop, flip)


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) when simplejpeg can decode `data` to RGB, else None (package missing, CMYK, not a JPEG)."""
    if simplejpeg is None:
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB") or min(w, h) < 16:
        return None
    return w, h


def _turbo_crop(
    data: bytes, w: int, h: int, s: int, left: int, top: int, crop: int, flip: bool
) -> torch.Tensor | None:
    """`_crop` with simplejpeg as the decoder (w × h from `_turbo_header`); None when it cannot decode."""
    k, box = _decode_plan(w, h, s, left, top, crop)
    dw, dh = -(-w // k), -(-h // k)
    buf = _buffer("array", dw * dh * 4)
    try:
        arr = simplejpeg.decode_jpeg(data, "RGBX", min_width=dw, min_height=dh, buffer=buf[: dw * dh * 4])
    except ValueError:
        return None
    if arr.shape != (dh, dw, 4):  # a scale other than 1/k: stay exact through PIL instead
        return None
    # RGBX is Pillow's own layout for RGB: the image is a view of `buf` (no copy), resampled exactly as the
    # PIL route does (same decoded pixels, same box)
    return _resample(Image.frombuffer("RGBX", (dw, dh), arr, "raw", "RGBX", 0, 1), crop, box, flip)


def turbo_crop(
    data: bytes, s: int, left: int, top: int, crop: int, flip: bool = False
) -> torch.Tensor | None:
    """`rescaled_crop` through simplejpeg; None where that path does not apply."""
    size = _turbo_header(data)
    return None if size is None else _turbo_crop(data, *size, s, left, top, crop, flip)


# the training-crop decoders, fastest first: (header → (w, h) | None, crop → tensor | None)
_DECODERS = {
    "window": (_window_header, _window_crop),
    "simplejpeg": (_turbo_header, _turbo_crop),
}
DECODER_CHOICES = JPEG_DECODERS


def available_decoder() -> str:
    """The decoder ``train_crop_jpeg(decoder="auto")`` tries first here: window, simplejpeg or pil."""
    if _jpegcrop is not None:
        return "window"
    return "simplejpeg" if simplejpeg is not None else "pil"


def train_crop_jpeg(
    data: bytes,
    scale: int | Sequence[int],
    crop: int,
    rng: np.random.Generator,
    decoder: str = "auto",
) -> torch.Tensor:
    """§3.1 training crop of one JPEG: rescale to S (fixed or jittered), random crop, flip → uint8 (3, crop, crop).

    `decoder`: "auto" tries the window decoder (vggdist._jpegcrop), then simplejpeg, then PIL, using the first
    that applies to this file; "window" / "simplejpeg" try only that one before PIL; "pil" is PIL's route only.
    All give the same pixels (within 1 grey level) from the same random draws.
    """
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {DECODER_CHOICES}, got {decoder!r}")
    names = ("window", "simplejpeg") if decoder == "auto" else () if decoder == "pil" else (decoder,)
    for name in names:
        header, crop_fn = _DECODERS[name]
        size = header(data)
        if size is None:
            continue
        s, left, top, flip = sample_crop(*size, scale, crop, rng)
        out = crop_fn(data, *size, s, left, top, crop, flip)
        return out if out is not None else rescaled_crop(data, s, left, top, crop, flip)
    im = Image.open(io.BytesIO(data))
    s, left, top, flip = sample_crop(im.width, im.height, scale, crop, rng)
    return _crop(im, s, left, top, crop, flip)


def center_crop_jpeg(data: bytes, q: int, crop: int) -> torch.Tensor:
    """§3.2 single-scale test crop: rescale to smallest side Q, central crop × crop window → uint8 (3, crop, crop).

    The window is placed like torchvision's CenterCrop (offset rounded from (size − crop) / 2). Decoded by the
    window decoder when it applies (only the central box is decoded), else by PIL.
    """
    size = _window_header(data)
    if size is not None:
        sw, sh = scaled_size(*size, q)
        left, top = int(round((sw - crop) / 2.0)), int(round((sh - crop) / 2.0))
        out = _window_crop(data, *size, q, left, top, crop, False)
        if out is not None:
            return out
    im = Image.open(io.BytesIO(data))
    sw, sh = scaled_size(im.width, im.height, q)
    return _crop(im, q, int(round((sw - crop) / 2.0)), int(round((sh - crop) / 2.0)), crop, False)


def decode_rescaled(data: bytes, q: int | None = None) -> torch.Tensor:
    """The whole image rescaled to smallest side Q (or as stored when `q` is None): uint8 (3, H, W).

    For dense and multi-crop evaluation (§3.2), which work on whole images; DCT-domain decoding applies here too.
    Decoded by vggdist._jpegcrop (the whole window) when it applies, else by PIL: the same pixels either way.
    """
    size = _window_header(data)
    if size is not None:
        w, h = size
        sw, sh = (w, h) if q is None else scaled_size(w, h, q)
        k = _draft_denom(w, h, sw, sh)
        dw, dh = -(-w // k), -(-h // k)
        buf = _buffer("window", dw * dh * 4)
        try:
            _jpegcrop.crop(data, k, 0, 0, -1, -1, buf)
        except ValueError:
            pass  # Pillow's route below decides
        else:
            im = Image.frombuffer("RGBX", (dw, dh), buf[: dw * dh * 4], "raw", "RGBX", 0, 1)
            if (dw, dh) != (sw, sh):  # the same box as the PIL route's draft (w / k, h / k)
                im = im.resize((sw, sh), _BILINEAR, box=(0, 0, w / k, h / k))
            return _rgbx_to_chw(im)  # a copy: never a view of the reused buffer
    im = Image.open(io.BytesIO(data))
    if q is None:
        return _to_chw(_decode_at(im, im.size)[0])
    w, h = im.size
    sw, sh = scaled_size(w, h, q)
    im, factor = _decode_at(im, (sw, sh))
    if im.size != (sw, sh):
        # box = the whole stored image in decoded coordinates (draft may add a partial last pixel)
        im = im.resize((sw, sh), _BILINEAR, box=(0, 0, w * factor, h * factor))
    return _to_chw(im)


def collate_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack same-size uint8 (3, H, W) images → (B, 3, H, W), stored channels_last (one copy, no transpose).

    Channels-last is how the pixels come out of the decoder and what the convolutions prefer on a GPU; the
    device copy (``.to(device)``) and DeviceAugment keep that layout.
    """
    arrays = [im.permute(1, 2, 0).numpy() for im in images]  # (H, W, 3) views
    hwc = np.empty((len(arrays), *arrays[0].shape), dtype=np.uint8)  # C-order whatever the inputs' strides
    np.stack(arrays, out=hwc)  # ~3x faster than torch.stack here
    return torch.from_numpy(hwc).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------
# Device side: batched float maths, with the statistics of stats.json


def pca_color_offset(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor) -> torch.Tensor:
    """AlexNet's colour shift: offset[n] = Σᵢ alpha[n, i] · eigval[i] · eigvec[i] → (N, 3) RGB.

    alpha (N, 3); eigval (3,); eigvec (3, 3) with row i the unit eigenvector of eigval[i]. The offset is in the
    units of eigval (pass λ · EIGVAL_TO_PIXELS for 0–255 pixels, see the module docstring).
    """
    return (alpha * eigval) @ eigvec  # (N, 3) @ (3, 3): Σᵢ (αᵢ λᵢ) pᵢ


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None = None) -> torch.Tensor:
    """(x − mean) / std per channel for float (N, 3, H, W); `std` None is the paper's mean-only subtraction."""
    x = x - mean.view(1, 3, 1, 1)
    if std is not None:
        x = x / std.view(1, 3, 1, 1)
    return x


class DeviceAugment(nn.Module):
    """uint8 (N, 3, H, W) → float32 (N, 3, H, W): PCA colour shift (train only), mean subtraction, optional /std.

    Runs on whatever device its buffers and input are on; the statistics travel as buffers with ``.to()`` and
    the state dict. Colour shifts are drawn with torch's RNG (or `generator`): seed it per rank.
    """

    def __init__(
        self,
        mean_rgb: Sequence[float],
        eigenvalues: Sequence[float],
        eigenvectors: Sequence[Sequence[float]],
        color_shift_std: float = 0.1,
        std_rgb: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.color_shift_std = float(color_shift_std)
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(3))
        self.register_buffer("eigval", torch.tensor(eigenvalues, dtype=torch.float32).view(3))
        self.register_buffer("eigvec", torch.tensor(eigenvectors, dtype=torch.float32).view(3, 3))
        self.register_buffer(
            "std", None if std_rgb is None else torch.tensor(std_rgb, dtype=torch.float32).view(3)
        )

    @classmethod
    def from_stats(cls, stats: dict, cfg: DataConfig) -> DeviceAugment:
        """Build from a stats.json dict and the data config (σ of the colour shift, normalisation choice)."""
        check_stats(stats)
        eigval = np.asarray(stats["eigenvalues"], dtype=np.float64)
        eigvec = np.asarray(stats["eigenvectors"], dtype=np.float64)
        std = None
        if cfg.normalize == "mean_std":
            if "cov_rgb" not in stats:
                raise ValueError("data.normalize=mean_std needs cov_rgb in stats.json; re-run preprocessing")
            std = np.sqrt(np.diag(np.asarray(stats["cov_rgb"], dtype=np.float64))).tolist()
        return cls(
            stats["mean_rgb"],
            (eigval * EIGVAL_TO_PIXELS).tolist(),
            eigvec.tolist(),
            cfg.color_shift_std,
            std,
        )

    def forward(
        self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.to(self.mean.device, non_blocking=True)  # (N, 3, H, W), memory format kept
        x = x.float() if x.dtype != torch.float32 else x.clone()  # a fresh tensor: the ops below are in place
        shift = -self.mean.view(1, 3)  # (1, 3): mean subtraction …
        if train and self.color_shift_std > 0:
            alpha = torch.randn((x.shape[0], 3), device=x.device, generator=generator) * self.color_shift_std
            shift = shift + pca_color_offset(
                alpha, self.eigval, self.eigvec
            )  # … plus the (N, 3) colour shift
        x = x.add_(shift.view(-1, 3, 1, 1))  # one pass over the pixels: x + offset − mean
        if self.std is not None:
            x = x.div_(self.std.view(1, 3, 1, 1))
        return x

    def extra_repr(self) -> str:
        return f"color_shift_std={self.color_shift_std}, std={'on' if self.std is not None else 'off'}"
