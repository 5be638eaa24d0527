"""One input file → one RGB JPEG sample, or a reasoned refusal (paper §3.1 "Training image size").

The paper trains on isotropically rescaled images with smallest side S ∈ [256, 512] and tests at Q ≤ 512, so
nothing is lost by storing every image with its smallest side at most ``max_side`` (512). Decoding goes by
content, never by file extension: JPEG, PNG named ``.JPEG``, CMYK JPEG, grayscale, palette / alpha, 16-bit,
EXIF-rotated and progressive inputs all become an RGB JPEG.

- **Kept as is**: an RGB (baseline or progressive) JPEG whose smallest side is already ≤ ``max_side`` and that has
  no EXIF rotation to apply. Its original bytes are stored untouched (no generation loss, no encode cost). It is
  still decoded in full, to prove it is not truncated and to measure its pixels for the statistics.
- **Re-encoded** otherwise, at ``quality`` (default 90, 4:2:0 chroma, baseline): the original ImageNet JPEGs
  are mostly q75–q95, the images re-encoded here are almost all being downscaled (which averages away the
  earlier artifacts), and q90 is visually lossless at about 60 % of the bytes of q95, which the training
  loader then decodes faster. Colour profiles are not applied (values are taken as sRGB, as torchvision's
  loader does); alpha is composited onto white.
- **Refused** (:class:`Rejected` with a short machine-readable reason): ``empty``, ``unsupported_format``
  (a format outside :data:`FORMATS`, e.g. EPS or PDF: never handed to its decoder, so Ghostscript never runs),
  ``undecodable``, ``truncated``, ``too_many_pixels`` (decompression bomb, checked from the header before any
  decoding), ``aspect_ratio`` (longest / shortest side above ``max_aspect``), ``unsupported_mode``.

Only a content problem is a refusal. ``MemoryError`` is not caught here: running out of memory says nothing
about the image, so it reaches the shard task, which is retried (`preprocess.runner`).

Big JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT (``Image.draft``) when that still leaves at least the
target size, so no single file costs more than tens of milliseconds.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:  # libjpeg-turbo straight into numpy / Pillow buffers (vggdist's optional C extension); PIL when missing
    from vggdist import _jpegcrop
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _jpegcrop = None

log = logging.getLogger(__name__)

# EXIF orientation tag → the transpose that shows the image upright (the same table as PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# Pillow formats an input may be (by content, whatever its extension): JPEG (MPO, the multi-picture JPEG, opens
# as JPEG), PNG, and the other raster formats torchvision's ImageFolder takes (.bmp .gif .tif .webp .ppm/.pgm).
# Pillow's other plugins are never tried: some hand the file to external programs (EPS → Ghostscript).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


MAX_FILE_BYTES = 64 * 2**20  # default input size cap (64 MiB)


@dataclass(frozen=True)
class ImageLimits:
    """What an input may be and how it is stored. Part of a job's identity (recorded in manifest.json)."""

    max_side: int = 512  # smallest side of the stored image is at most this (never upscaled)
    quality: int = 90  # JPEG quality of re-encoded images
    max_pixels: int = (
        89_478_485  # header width × height above this is a decompression bomb (Pillow's default)
    )
    max_aspect: float = 20.0  # longest / shortest side above this is refused
    # larger input files are refused unread: a photo at the pixel limit is ~10-40 MB as a JPEG
    max_file_bytes: int = MAX_FILE_BYTES

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"max_side must be ≥ 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be ≥ 1, got {self.max_pixels}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be ≥ 1, got {self.max_aspect}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be ≥ 1, got {self.max_file_bytes}")


class Rejected(Exception):
    """An input that cannot become a sample. ``reason`` is short and machine-readable, ``detail`` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    """The stored JPEG and the pixels a decoder gets back from exactly those bytes."""

    jpeg: bytes
    pixels: np.ndarray  # (H, W, 3) uint8, decoded from `jpeg`
    reencoded: bool  # False: the original bytes were kept

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the smallest side equal to ``max_side`` and the aspect ratio kept; never larger than the input."""
    short = min(width, height)
    if short <= max_side:
        return width, height
    if width <= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def to_jpeg(data: bytes, limits: ImageLimits = ImageLimits()) -> Encoded:
    """Turn one file's bytes into an RGB JPEG sample; raise :class:`Rejected` with the reason otherwise."""
    if not data:
        raise Rejected("empty", "the file has no bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        fmt = sniff_format(data)
        if fmt is not None and fmt not in FORMATS:
            raise Rejected(
                "unsupported_format", f"{fmt} is not an accepted image format ({', '.join(FORMATS)})"
            ) from None
        raise Rejected(
            "undecodable", f"not an image format Pillow reads (starts with {data[:8]!r})"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # SyntaxError, struct errors … from broken headers
        raise Rejected("undecodable", f"broken image header ({type(e).__name__}: {e})") from None

    width, height = im.size
    _check_header(width, height, limits)
    orientation = _orientation(im)
    target = target_size(width, height, limits.max_side)
    needs_resize = target != (width, height)

    clean_jpeg = im.format == "JPEG" and im.mode == "RGB"  # YCbCr or RGB: the fast decoder's inputs
    if clean_jpeg and not needs_resize and orientation == 1:
        # validates the whole stream; its pixels are those of the stored (original) bytes
        pixels = _fast_rgb(data)
        if pixels is None:
            _decode(im)  # PIL decides: truncated / undecodable, or fine after all
            pixels = np.asarray(im)
        return Encoded(jpeg=data, pixels=pixels, reencoded=False)

    rgb = _fast_draft(data, width, height, target) if clean_jpeg else None
    if rgb is None:
        if needs_resize and im.format in ("JPEG", "MPO"):
            im.draft(None, target)  # DCT-domain downscale by 1/2, 1/4 or 1/8, never below `target`
        _decode(im)
        rgb = _to_rgb(im)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=limits.quality)  # RGBX encodes exactly as its RGB would
    jpeg = buf.getvalue()
    return Encoded(jpeg=jpeg, pixels=decode_rgb(jpeg), reencoded=True)


def sniff_format(data: bytes) -> str | None:
    """The format whose magic bytes ``data`` starts with (Pillow's plugins' prefix checks, which parse nothing;
    plus PDF, which Pillow writes but does not read), or None."""
    prefix = data[:16]
    if prefix.startswith(b"%PDF-"):
        return "PDF"
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return fmt
    return None


def decode_rgb(jpeg: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an RGB JPEG, decoded in full (what the statistics and `verify` measure)."""
    pixels = _fast_rgb(jpeg)
    if pixels is not None:
        return pixels
    try:
        im = Image.open(io.BytesIO(jpeg), formats=("JPEG",))
    except Image.UnidentifiedImageError:
        raise ValueError(f"expected an RGB JPEG, got {sniff_format(jpeg) or 'unknown data'}") from None
    with im:
        if im.format != "JPEG" or im.mode != "RGB":
            raise ValueError(f"expected an RGB JPEG, got {im.format} {im.mode}")
        im.load()
        return np.asarray(im)


# The fast paths below decode with vggdist._jpegcrop: the same libjpeg-turbo, the same accurate integer IDCT,
# fancy upsampling and 1/2–1/8 DCT scales as Pillow, so the same pixels bit for bit (tests check it), but
# from memory in one call with no chunked feeding, into buffers numpy / Pillow use as they are: ~1.1–1.4x
# faster per decode. Anything libjpeg warns about goes to Pillow's route, which classifies the damage.


def _fast_rgb(data: bytes) -> np.ndarray | None:
    """A 3-component (YCbCr / RGB) JPEG as (H, W, 3) uint8, or None (extension not built, grayscale, CMYK, not a
    JPEG, any libjpeg warning): the caller's Pillow route then decides."""
    if _jpegcrop is None or (header := _jpegcrop.header(data)) is None or header[2] != 3:
        return None
    w, h, _ = header
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    try:
        _jpegcrop.crop(data, 1, 0, 0, -1, -1, pixels, 3)
    except ValueError:
        return None
    return pixels


def _fast_draft(data: bytes, width: int, height: int, target: tuple[int, int]) -> Image.Image | None:
    """What ``im.draft(None, target); im.load()`` gives (1/k DCT scale, k the largest of 8, 4, 2, 1 that keeps
    both sides ≥ target), as an RGBX image over a numpy buffer; None where the fast decoder does not apply."""
    if _jpegcrop is None:
        return None
    k = next((k for k in (8, 4, 2) if width >= k * target[0] and height >= k * target[1]), 1)
    w, h = -(-width // k), -(-height // k)
    pixels = np.empty(w * h * 4, dtype=np.uint8)
    try:
        _jpegcrop.crop(data, k, 0, 0, -1, -1, pixels, 4)
    except ValueError:
        return None
    return Image.frombuffer("RGBX", (w, h), pixels, "raw", "RGBX", 0, 1)


def _check_header(width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise Rejected("undecodable", f"header says {width}x{height}")
    if width * height > limits.max_pixels:
        raise Rejected(
            "too_many_pixels",
            f"header says {width}x{height} = {width * height:,} pixels, above the limit of {limits.max_pixels:,}",
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise Rejected(
            "aspect_ratio", f"{width}x{height} has aspect ratio {aspect:.1f}, above {limits.max_aspect:g}"
        )


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is not a reason to lose the image; it is shown as stored
        return 1
    return value if isinstance(value, int) else 1


def _decode(im: Image.Image) -> None:
    """Decode every byte of the image data; a short stream is ``truncated``, anything else ``undecodable``."""
    try:
        im.load()
    except MemoryError:
        raise
    except Exception as e:
        text = str(e)
        if isinstance(e, EOFError) or "truncat" in text.lower() or "premature" in text.lower():
            raise Rejected("truncated", f"image data ends early ({text})") from None
        raise Rejected("undecodable", f"decoding failed ({type(e).__name__}: {text})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode → RGB: 16/32-bit integer scaled to 8 bits, alpha over white, CMYK / palette / L converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        # "I" comes from 16-bit PNG/TIFF in older Pillow; both are 0..65535 → 0..255 by the top byte.
        gray = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        if im.has_transparency_data:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise Rejected("unsupported_mode", f"cannot convert mode {mode} to RGB ({e})") from None
