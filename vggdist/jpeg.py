"""JPEG bytes → uint8 image tensors (3, H, W): §3.1 training crops and §3.2 test images, decoding no more than
they need; and their channels_last batch (`collate_images`).

`train_crop_jpeg` draws the crop (`vggdist.augment.sample_crop`) and produces exactly rescale-to-S-then-crop
(then flip) without building the rescaled image: the window, chosen in S-space, is mapped back to the stored
image and only that box is resampled (``Image.resize(size, box=...)``). Pillow's box resampling places every
output pixel and its filter support exactly where a full resize followed by a crop would, so this is the same
operation, not an approximation (tests check it). When the stored image is at least 2× larger than S-space, the
JPEG is decoded directly at 1/2, 1/4 or 1/8 size in the DCT domain, never below S-space, so resampling only ever
downsizes. Three decoders produce the same crop from the same random draws (`data.decoder`; "auto" takes the
first that applies to the file):

1. **window** (`vggdist._jpegcrop`, a small C extension over the system libjpeg-turbo, built at install time):
   decodes only the pixels the resampling reads, the box plus the bilinear filter's support. Rows above the
   window are entropy-decoded but skip the inverse DCT and colour conversion (``jpeg_skip_scanlines``), rows
   below it are never read, and columns outside it skip IDCT, upsampling and colour conversion
   (``jpeg_crop_scanline``). A jittered crop needs about a third of a stored image's pixels, so this is the
   cheapest route; what no libjpeg option skips is the entropy decoding of the rows above the window's bottom.
   Its decoded pixels are a full decode's bit for bit (tests); the box, moved into the window's coordinates,
   rounds differently in the last bit, which changes ~0.1 % of output values by 1–2 grey levels.
2. **simplejpeg** (a dependency; libjpeg-turbo bundled): the whole image at the same DCT scale, as RGBX
   (Pillow's own RGB layout) into a reused buffer Pillow resamples in place: the PIL route's pixels exactly.
3. **pil**: ``Image.draft`` + Pillow's decoder. It also serves every file the others decline (CMYK, PNG,
   anything libjpeg warns about, e.g. truncated data, where Pillow's own policy then applies).

libjpeg-turbo's faster but inexact options (IFAST IDCT, replicated chroma, M/8 scales) are not used: they move
pixels by about a grey level on average, and the M/8 scales are slower than a full decode.

`center_crop_jpeg` (per-epoch single-scale validation at Q) and `decode_rescaled` (whole image, smallest side
Q, for dense and multi-crop evaluation in `vggdist.evaluate`) decode through the window decoder when it applies
(the central box; the whole image, bit-identical to the PIL route), else through PIL.

Crops leave Pillow packed as RGB in a fresh contiguous array: `collate_images` copies contiguous rows, which is
much cheaper than gathering 4-byte-strided RGBX pixels. Benchmarks: bench/loader.py, docs/performance.md.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vggdist.augment import center_offsets, check_window, sample_crop, scaled_size
from vggdist.config import JPEG_DECODERS

try:  # the window decoder (C, system libjpeg-turbo): optional, built at install time when headers exist
    from vggdist import _jpegcrop
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _jpegcrop = None
try:  # libjpeg-turbo straight into numpy for the training crop; PIL when missing
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where the package is absent
    simplejpeg = None

_TURBO_BUFFER = threading.local()  # the decoders' output, reused image to image (one per thread)

__all__ = [
    "available_decoder",
    "center_crop_jpeg",
    "collate_images",
    "decode_for_size",
    "decode_rescaled",
    "rescaled_crop",
    "train_crop_jpeg",
    "turbo_crop",
    "window_crop",
]

_BILINEAR = Image.Resampling.BILINEAR  # torchvision's Resize default for PIL images (antialiased)


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
    packer straight from its 4-byte pixels (one copy, where ``convert("RGB")`` + ``np.array`` make two). Packed
    RGB matters: `collate_images` copies contiguous rows, far cheaper than gathering a 4-byte-strided view."""
    w, h = im.size
    hwc = np.empty((h, w, 3), dtype=np.uint8)
    hwc[...] = np.frombuffer(im.tobytes("raw", "RGB"), dtype=np.uint8).reshape(h, w, 3)
    return torch.from_numpy(hwc).permute(2, 0, 1)


def _crop(im: Image.Image, s: int, left: int, top: int, crop: int, flip: bool) -> torch.Tensor:
    """Window (left, top, crop × crop) of opened image `im` rescaled to smallest side `s`, as uint8 (3, crop, crop)."""
    w, h = im.size
    sw, sh = scaled_size(w, h, s)
    check_window(sw, sh, s, left, top, crop)
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


def _draft_denom(w: int, h: int, sw: int, sh: int) -> int:
    """The DCT scale PIL's draft picks: 1/k, k the largest of 8, 4, 2 with k · S-space ≤ stored size (else 1)."""
    return next((k for k in (8, 4, 2) if w >= k * sw and h >= k * sh), 1)


def _decode_plan(
    w: int, h: int, s: int, left: int, top: int, crop: int
) -> tuple[int, tuple[float, float, float, float]]:
    """For a crop of the w × h stored image at scale S: the DCT scale 1/k to decode at, and the crop's box in
    decoded coordinates (decoded = stored / k). Raises when the window does not fit."""
    sw, sh = scaled_size(w, h, s)
    check_window(sw, sh, s, left, top, crop)
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
    if decoder not in JPEG_DECODERS:
        raise ValueError(f"decoder must be one of {JPEG_DECODERS}, got {decoder!r}")
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
        out = _window_crop(data, *size, q, *center_offsets(*size, q, crop), crop, False)
        if out is not None:
            return out
    im = Image.open(io.BytesIO(data))
    return _crop(im, q, *center_offsets(im.width, im.height, q, crop), crop, False)


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
    np.stack(arrays, out=hwc)  # one copy of contiguous rows (torch.stack of the strided views is slower)
    return torch.from_numpy(hwc).permute(0, 3, 1, 2)
