"""preprocess.images: every image kind → RGB JPEG (or a reasoned refusal), kept bytes, resize rule, EXIF, bombs."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from preprocess import images as images_mod
from preprocess.images import Encoded, ImageLimits, Rejected, decode_rgb, target_size, to_jpeg

try:
    from tests import preprocess_fixtures as fx
except ImportError:  # pytest's rootdir-less import mode
    import preprocess_fixtures as fx

LIMITS = ImageLimits(max_side=64)


def _stored(enc: Encoded) -> Image.Image:
    im = Image.open(io.BytesIO(enc.jpeg))
    im.load()
    return im


@pytest.mark.parametrize("kind", [k for k in fx.image_kinds() if k not in fx.REFUSED])
def test_every_decodable_kind_becomes_an_rgb_jpeg_whose_pixels_are_reported(kind):
    enc = to_jpeg(fx.image_kinds()[kind], LIMITS)
    im = _stored(enc)
    assert (im.format, im.mode) == ("JPEG", "RGB")
    assert im.size == (enc.width, enc.height)
    assert min(im.size) <= LIMITS.max_side
    np.testing.assert_array_equal(enc.pixels, np.asarray(im))  # stats see exactly what was stored


@pytest.mark.parametrize("kind,reason", sorted(fx.REFUSED.items()))
def test_refused_kinds_carry_a_machine_readable_reason(kind, reason):
    with pytest.raises(Rejected) as e:
        to_jpeg(fx.image_kinds()[kind], LIMITS)
    assert e.value.reason == reason
    assert e.value.detail


@pytest.mark.parametrize("kw", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_rgb_jpeg_within_the_limit_keeps_its_original_bytes(kw):
    data = fx.rgb_jpeg(90, 60, 1, **kw)
    enc = to_jpeg(data, LIMITS)
    assert enc.jpeg is data and not enc.reencoded
    assert (enc.width, enc.height) == (90, 60)


def test_large_image_is_downscaled_to_max_side_on_its_smallest_side_and_never_upscaled():
    enc = to_jpeg(fx.rgb_jpeg(300, 200, 2), LIMITS)
    assert enc.reencoded and (enc.width, enc.height) == (96, 64)
    tall = to_jpeg(fx.rgb_jpeg(200, 300, 2), LIMITS)
    assert (tall.width, tall.height) == (64, 96)
    small = to_jpeg(fx.encode(Image.fromarray(fx.natural_rgb(30, 20)), "PNG"), LIMITS)
    assert (small.width, small.height) == (30, 20)
    assert target_size(1600, 1200, 512) == (683, 512)
    assert target_size(500, 375, 512) == (500, 375)


def test_draft_downscale_matches_a_full_decode_resize_closely():
    arr = fx.natural_rgb(1024, 768, 3)
    data = fx.encode(Image.fromarray(arr), "JPEG", quality=95)
    enc = to_jpeg(data, ImageLimits(max_side=96))
    reference = np.asarray(Image.fromarray(arr).resize((enc.width, enc.height), Image.Resampling.LANCZOS))
    assert (enc.width, enc.height) == (128, 96)
    assert np.abs(enc.pixels.astype(int) - reference.astype(int)).mean() < 4


def test_exif_orientation_is_applied_so_the_image_is_stored_upright():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red, right half blue as stored
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    data = fx.encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    enc = to_jpeg(data, ImageLimits(max_side=512))
    assert enc.reencoded and (enc.width, enc.height) == (40, 80)
    top, bottom = enc.pixels[:20].reshape(-1, 3).mean(0), enc.pixels[60:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and bottom[2] > 200  # stored-left (red) is now on top


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray16 = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16).repeat(8, axis=0).repeat(8, axis=1)
    enc = to_jpeg(fx.encode(Image.fromarray(gray16), "PNG"), LIMITS)
    means = [enc.pixels[:, 8 * i + 2 : 8 * i + 6].mean() for i in range(4)]
    assert means[0] < 8 and abs(means[1] - 128) < 8 and means[2] > 247 and means[3] < 12


def test_alpha_is_composited_onto_white_and_cmyk_keeps_its_colours():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red → white
    enc = to_jpeg(fx.encode(Image.fromarray(rgba), "PNG"), LIMITS)
    assert enc.pixels.mean() > 250
    red = Image.new("RGB", (32, 32), (220, 30, 30)).convert("CMYK")
    enc = to_jpeg(fx.encode(red, "JPEG", quality=95), LIMITS)
    r, g, b = enc.pixels.reshape(-1, 3).mean(0)
    assert r > 180 and g < 70 and b < 70


def test_decompression_bomb_is_refused_from_the_header_in_milliseconds():
    t0 = time.perf_counter()
    with pytest.raises(Rejected) as e:
        to_jpeg(fx.bomb_png(60_000, 60_000), LIMITS)
    assert e.value.reason == "too_many_pixels"
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(Rejected, match="too_many_pixels"):  # our own limit, below Pillow's
        to_jpeg(fx.rgb_jpeg(100, 100), ImageLimits(max_pixels=5000))


def test_limits_are_validated_and_decode_rgb_refuses_non_jpeg():
    with pytest.raises(ValueError, match="quality"):
        ImageLimits(quality=0)
    with pytest.raises(ValueError, match="RGB JPEG"):
        decode_rgb(fx.encode(Image.new("RGB", (4, 4)), "PNG"))


needs_fast = pytest.mark.skipif(images_mod._jpegcrop is None, reason="vggdist._jpegcrop was not built")


@needs_fast
@pytest.mark.parametrize("kind", [k for k in fx.image_kinds() if k not in fx.REFUSED])
def test_fast_decoder_gives_the_same_bytes_and_pixels_as_pillow_alone(kind, monkeypatch):
    # the C decoder must not change a single stored byte or statistic: resumed jobs mix both, verify uses both
    for limits in (LIMITS, ImageLimits(max_side=24), ImageLimits(max_side=512)):
        data = fx.image_kinds()[kind]
        fast = to_jpeg(data, limits)
        with monkeypatch.context() as m:
            m.setattr(images_mod, "_jpegcrop", None)
            slow = to_jpeg(data, limits)
            slow_pixels = decode_rgb(fast.jpeg)
        assert fast.jpeg == slow.jpeg and fast.reencoded == slow.reencoded
        np.testing.assert_array_equal(fast.pixels, slow.pixels)
        np.testing.assert_array_equal(decode_rgb(fast.jpeg), slow_pixels)


@needs_fast
@pytest.mark.parametrize("size", [(1600, 1200), (900, 2100), (4000, 3000)])
def test_fast_draft_path_matches_pillow_for_large_photos(size, monkeypatch):
    data = fx.rgb_jpeg(*size, 3)
    fast = to_jpeg(data, ImageLimits(max_side=256))
    monkeypatch.setattr(images_mod, "_jpegcrop", None)
    slow = to_jpeg(data, ImageLimits(max_side=256))
    assert fast.jpeg == slow.jpeg
    np.testing.assert_array_equal(fast.pixels, slow.pixels)


@needs_fast
def test_fast_decoder_hands_damaged_and_gray_files_to_pillow():
    data = fx.rgb_jpeg(200, 150, 4)
    with pytest.raises(Rejected) as e:
        to_jpeg(data[: len(data) // 2], LIMITS)  # libjpeg warns; Pillow's route names the damage
    assert e.value.reason == "truncated"
    assert images_mod._fast_rgb(data[: len(data) // 2]) is None
    gray = io.BytesIO()
    Image.new("L", (40, 30), 77).save(gray, "JPEG")
    assert images_mod._fast_rgb(gray.getvalue()) is None  # 1 component: not a shard JPEG
    with pytest.raises(ValueError, match="expected an RGB JPEG"):
        decode_rgb(gray.getvalue())


def _saved(fmt: str, mode: str = "RGB", **kw) -> bytes:
    return fx.encode(Image.fromarray(fx.natural_rgb(48, 40, 12)).convert(mode), fmt, **kw)


@pytest.mark.parametrize(
    "fmt,mode",
    [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("PPM", "RGB"), ("PPM", "L")],
    ids=["gif", "bmp", "tiff", "ppm", "pgm"],
)
def test_the_raster_formats_image_folders_hold_are_accepted(fmt, mode):
    enc = to_jpeg(_saved(fmt, mode), LIMITS)
    assert (enc.width, enc.height) == (48, 40) and enc.reencoded
    assert (_stored(enc).format, _stored(enc).mode) == ("JPEG", "RGB")


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    "data,fmt",
    [
        (_EPS, "EPS"),
        (_saved("PDF"), "PDF"),
        (_saved("ICO"), "ICO"),
        (_saved("PCX"), "PCX"),
        (_saved("SGI"), "SGI"),
        (_saved("DDS", "RGBA"), "DDS"),
    ],
    ids=["eps", "pdf", "ico", "pcx", "sgi", "dds"],
)
def test_other_formats_are_refused_by_their_magic_bytes_without_being_opened(data, fmt, monkeypatch):
    opened = []
    for plugin, (factory, accept) in list(Image.OPEN.items()):  # record any plugin asked to parse the file
        monkeypatch.setitem(
            Image.OPEN,
            plugin,
            (lambda *a, _f=factory, _p=plugin, **k: opened.append(_p) or _f(*a, **k), accept),
        )
    with pytest.raises(Rejected) as e:
        to_jpeg(data, LIMITS)
    assert (e.value.reason, fmt in e.value.detail) == ("unsupported_format", True)
    assert "EPS" not in opened and all(p in images_mod.FORMATS for p in opened)


def test_running_out_of_memory_while_decoding_is_not_a_reject(tmp_path):
    """A real MemoryError (address space capped in a child process) must reach the caller: the shard task is
    retried, the image is not written off as undecodable."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "oom.py"
    script.write_text(
        "import io, resource\n"
        "from PIL import Image\n"
        "from preprocess.images import ImageLimits, Rejected, to_jpeg\n"
        "buf = io.BytesIO(); Image.new('RGB', (6000, 6000), (10, 20, 30)).save(buf, 'PNG')\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 60 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    to_jpeg(buf.getvalue(), ImageLimits(max_side=64))\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
        "except Rejected as e:\n"
        "    print('Rejected', e.reason)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "MemoryError", res.stdout + res.stderr
