"""vggdist.jpeg: crop-before-resize equals rescale-then-crop, DCT draft decoding, the three decoder routes give the
same crop from the same draws, flips, centre crops and whole test images, and the channels_last batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vggdist import augment, jpeg
from vggdist.config import JPEG_DECODERS


def smooth_jpeg(w: int, h: int, quality: int = 95, seed: int = 0) -> bytes:
    """A smooth, asymmetric RGB photo-like image (gradients and low frequencies) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    ph = rng.uniform(0, 6, 3)
    img = np.stack(
        [
            128 + 90 * np.sin(5 * x + ph[0]) * np.cos(3 * y),
            60 + 150 * x,  # left-right asymmetric: a flip is visible
            128 + 80 * np.cos(4 * x * y + 7 * y + ph[2]),
        ],
        axis=-1,
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def naive_crop(data: bytes, s: int, left: int, top: int, crop: int) -> np.ndarray:
    """The reference: full decode, full isotropic rescale to S, then crop (torchvision's Resize + crop)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize(augment.scaled_size(im.width, im.height, s), Image.Resampling.BILINEAR)
    return np.asarray(im.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1).astype(np.int16)


def as_i16(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8
    return t.numpy().astype(np.int16)


@pytest.mark.parametrize("size, s", [((400, 300), 256), ((300, 420), 384), ((500, 375), 512)])
def test_crop_before_resize_equals_rescale_then_crop(size, s):
    data = smooth_jpeg(*size)
    rng = np.random.default_rng(1)
    sw, sh = augment.scaled_size(*size, s)
    for _ in range(4):
        left, top = int(rng.integers(0, sw - 224 + 1)), int(rng.integers(0, sh - 224 + 1))
        ours = jpeg.rescaled_crop(data, s, left, top, 224)
        assert ours.shape == (3, 224, 224)
        diff = np.abs(as_i16(ours) - naive_crop(data, s, left, top, 224))
        assert diff.max() <= 1, (left, top, diff.max())  # same filter, same taps: only rounding differs


def test_draft_decoding_is_used_for_big_images_and_stays_close():
    big = smooth_jpeg(2048, 1536)
    im, factor = jpeg.decode_for_size(big, augment.scaled_size(2048, 1536, 256))  # S-space is 341x256
    assert im.size == (512, 384) and factor == 0.25  # 1/4 keeps ≥ 256; 1/8 (192) would not
    im, factor = jpeg.decode_for_size(smooth_jpeg(500, 375), augment.scaled_size(500, 375, 256))
    assert im.size == (500, 375) and factor == 1.0  # less than 2x larger: full decode

    ours = jpeg.rescaled_crop(big, 256, 50, 20, 224)
    diff = np.abs(as_i16(ours) - naive_crop(big, 256, 50, 20, 224))
    assert diff.mean() < 1.0 and diff.max() <= 6  # DCT-domain 1/4 scaling vs a bilinear downscale


def test_flip_mirrors_the_same_window():
    data = smooth_jpeg(400, 300)
    plain = jpeg.rescaled_crop(data, 300, 17, 40, 224)
    flipped = jpeg.rescaled_crop(data, 300, 17, 40, 224, flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_train_crop_is_sample_crop_then_rescaled_crop():
    data = smooth_jpeg(375, 500)
    for seed in range(5):
        s, left, top, flip = augment.sample_crop(375, 500, (256, 512), 224, np.random.default_rng(seed))
        expected = jpeg.rescaled_crop(data, s, left, top, 224, flip)
        got = jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(seed))
        # simplejpeg decodes the same pixels (bit-exact here; 1 grey level of slack for other builds)
        assert np.abs(as_i16(got) - as_i16(expected)).max() <= 1
        pil = jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(seed), decoder="pil")
        assert torch.equal(pil, expected)


def test_flip_happens_about_half_the_time():
    # The crop covers the whole S-space image, so the only randomness left is the flip.
    data = smooth_jpeg(256, 256)
    reference = jpeg.rescaled_crop(data, 256, 0, 0, 256)
    rng = np.random.default_rng(3)
    n = 300
    flips = 0
    for _ in range(n):
        out = jpeg.train_crop_jpeg(data, 256, 256, rng)
        if torch.equal(out, reference.flip(-1)):
            flips += 1
        else:
            assert torch.equal(out, reference)
    assert 0.4 < flips / n < 0.6


def test_center_crop_and_decode_rescaled():
    data = smooth_jpeg(500, 375)
    c = jpeg.center_crop_jpeg(data, 256, 224)
    sw, sh = augment.scaled_size(500, 375, 256)
    left, top = round((sw - 224) / 2), round((sh - 224) / 2)
    assert np.abs(as_i16(c) - naive_crop(data, 256, left, top, 224)).max() <= 1

    full = jpeg.decode_rescaled(data, 384)
    assert full.shape == (3, 384, 512)
    assert jpeg.decode_rescaled(data).shape == (3, 375, 500)
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((512, 384), Image.Resampling.BILINEAR)
    assert np.abs(as_i16(full) - np.asarray(ref).transpose(2, 0, 1)).max() <= 1

    big = smooth_jpeg(1600, 1200)  # drafted at 1/4 = 400x300 for Q=256, then resized
    small = jpeg.decode_rescaled(big, 256)
    assert small.shape == (3, 256, 341)
    ref = Image.open(io.BytesIO(big)).convert("RGB").resize((341, 256), Image.Resampling.BILINEAR)
    assert np.abs(as_i16(small) - np.asarray(ref).transpose(2, 0, 1).astype(np.int16)).mean() < 1.0


# ---------------------------------------------------------------------------------------------------------
# simplejpeg decode path of the training crop

needs_simplejpeg = pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg not installed")


@needs_simplejpeg
def test_turbo_flip_mirrors_the_same_window():
    data = smooth_jpeg(400, 300)
    plain = jpeg.turbo_crop(data, 300, 17, 40, 224)
    assert torch.equal(jpeg.turbo_crop(data, 300, 17, 40, 224, flip=True), plain.flip(-1))


@needs_simplejpeg
def test_turbo_decode_scale_is_pils_draft_choice_never_below_s_space(monkeypatch):
    decoded = []
    real = jpeg.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        decoded.append(out.shape[:2])
        return out

    monkeypatch.setattr(jpeg.simplejpeg, "decode_jpeg", spy)
    rng = np.random.default_rng(0)
    for w, h in [(2048, 1536), (1536, 2048), (683, 512), (500, 375), (1100, 520)]:
        data = smooth_jpeg(w, h)
        for s in (224, 256, 300, 384, 512):
            _, left, top, _ = augment.sample_crop(w, h, s, 224, rng)
            jpeg.turbo_crop(data, s, left, top, 224)
            dh, dw = decoded[-1]
            sw, sh = augment.scaled_size(w, h, s)
            # never below S-space, unless S-space is larger than the stored image (then: full size)
            assert (dw >= sw and dh >= sh) or (dw, dh) == (w, h), (w, h, s, decoded[-1])
            assert dw <= w and dh <= h
            im, _ = jpeg.decode_for_size(data, (sw, sh))
            assert (dw, dh) == im.size  # the 1/2, 1/4, 1/8 that PIL's draft picks, no M/8 scales


@needs_simplejpeg
def test_turbo_train_crop_jitter_range_and_same_draws_as_pil():
    data = smooth_jpeg(500, 375)
    for seed in range(6):
        a = jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(seed), decoder="simplejpeg")
        b = jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(seed), decoder="pil")
        assert np.abs(as_i16(a) - as_i16(b)).max() <= 1
    rng = np.random.default_rng(1)
    mirrored = 0
    reference = jpeg.rescaled_crop(smooth_jpeg(256, 256), 256, 0, 0, 256)
    for _ in range(200):
        out = jpeg.train_crop_jpeg(smooth_jpeg(256, 256), 256, 256, rng)
        is_flip = np.abs(as_i16(out) - as_i16(reference.flip(-1))).max() <= 1
        assert is_flip or np.abs(as_i16(out) - as_i16(reference)).max() <= 1
        mirrored += is_flip
    assert 0.38 < mirrored / 200 < 0.62


def test_train_crop_falls_back_to_pil(monkeypatch):
    data = smooth_jpeg(500, 375)
    expected = jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(4), decoder="pil")
    monkeypatch.setattr(jpeg, "simplejpeg", None)  # the package missing
    monkeypatch.setattr(jpeg, "_jpegcrop", None)  # the extension not built
    assert jpeg.turbo_crop(data, 256, 0, 0, 224) is None
    assert jpeg.window_crop(data, 256, 0, 0, 224) is None
    assert jpeg.available_decoder() == "pil"
    assert torch.equal(jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(4)), expected)


@needs_simplejpeg
def test_turbo_path_declines_cmyk_and_non_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (300, 260), (10, 20, 30, 0)).save(buf, "JPEG")
    assert jpeg.turbo_crop(buf.getvalue(), 256, 0, 0, 224) is None
    assert jpeg.train_crop_jpeg(buf.getvalue(), 256, 224, np.random.default_rng(0)).shape == (3, 224, 224)
    buf = io.BytesIO()
    Image.new("RGB", (300, 260), (10, 20, 30)).save(buf, "PNG")
    assert jpeg.turbo_crop(buf.getvalue(), 256, 0, 0, 224) is None
    out = jpeg.train_crop_jpeg(buf.getvalue(), 256, 224, np.random.default_rng(0))
    assert out.shape == (3, 224, 224) and out[:, 0, 0].tolist() == [10, 20, 30]


# ----------------------------------------------------------------------------------------------------------
# the window decoder (vggdist._jpegcrop, C against the system libjpeg-turbo)

needs_window = pytest.mark.skipif(jpeg._jpegcrop is None, reason="vggdist._jpegcrop was not built")


def photo_jpeg(w: int, h: int, subsampling: int = 2, progressive: bool = False, seed: int = 0) -> bytes:
    """Textured colour JPEG (noise makes every block and chroma edge matter); subsampling 0/1/2 = 4:4:4/4:2:2/4:2:0."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([128 + 90 * np.sin(9 * x + 3 * y), 60 + 150 * x, 128 + 80 * np.cos(11 * x * y)], axis=-1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


@needs_window
@pytest.mark.parametrize(
    "size, subsampling, progressive",
    [((500, 375), 2, False), ((375, 500), 1, False), ((683, 512), 0, False), ((640, 480), 2, True)],
)
def test_window_decoder_pixels_equal_a_full_decode(size, subsampling, progressive):
    data = photo_jpeg(*size, subsampling, progressive)
    rng = np.random.default_rng(0)
    for k in (1, 2, 4):
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (size[0] // k, size[1] // k))  # Pillow's DCT-scaled decode at 1/k
        full = np.asarray(im.convert("RGB"))
        fh, fw = full.shape[:2]
        windows = [(0, 0, fw, fh), (0, 0, 1, 1), (fw - 1, fh - 1, fw, fh)]
        windows += [
            (x0, y0, int(rng.integers(x0 + 1, fw + 1)), int(rng.integers(y0 + 1, fh + 1)))
            for x0, y0 in zip(rng.integers(0, fw - 1, 12), rng.integers(0, fh - 1, 12), strict=True)
        ]
        for x0, y0, x1, y1 in windows:
            pixels, left, top, w, h, iw, ih = jpeg._jpegcrop.crop(data, k, int(x0), int(y0), int(x1), int(y1))
            assert (iw, ih) == (fw, fh) and top == y0 and h == y1 - y0 and left <= x0 and left + w >= x1
            got = np.frombuffer(pixels, np.uint8).reshape(h, w, 4)[:, x0 - left : x1 - left, :3]
            np.testing.assert_array_equal(got, full[y0:y1, x0:x1], err_msg=f"k={k} window {x0, y0, x1, y1}")


@pytest.mark.parametrize("decoder", ["window", "simplejpeg"])
@pytest.mark.parametrize(
    "size, s",
    [((400, 300), 256), ((375, 500), 512), ((500, 375), 384), ((683, 512), 300), ((2048, 1536), 256)],
)
def test_fast_decoders_match_the_pil_route_and_rescale_then_crop(decoder, size, s):
    if (jpeg._jpegcrop if decoder == "window" else jpeg.simplejpeg) is None:
        pytest.skip(f"the {decoder} decoder is not available")
    crop_fn = {"window": jpeg.window_crop, "simplejpeg": jpeg.turbo_crop}[decoder]
    data = photo_jpeg(*size)
    rng = np.random.default_rng(2)
    for _ in range(6):
        _, left, top, flip = augment.sample_crop(*size, s, 224, rng)
        ours = crop_fn(data, s, left, top, 224, flip)
        assert ours is not None and ours.shape == (3, 224, 224) and ours.dtype == torch.uint8
        diff = np.abs(as_i16(ours) - as_i16(jpeg.rescaled_crop(data, s, left, top, 224, flip)))
        # simplejpeg: the same decoded pixels and box (1 grey level of slack for other libjpeg-turbo builds);
        # window: the same decoded pixels, the box moved into the window's coordinates rounds differently in
        # the last bit, which moves ~0.1 % of values by a grey level or two
        assert diff.max() <= (2 if decoder == "window" else 1) and diff.mean() < 0.02
        ref = naive_crop(data, s, left, top, 224)
        if flip:
            ref = ref[:, :, ::-1]
        assert np.abs(as_i16(ours) - ref).mean() < 1.5  # ≤ 1 grey level without a DCT-scaled decode


@needs_window
def test_window_decoder_declines_what_it_does_not_decode_cleanly():
    buf = io.BytesIO()
    Image.new("CMYK", (300, 260), (10, 20, 30, 0)).save(buf, "JPEG")
    assert (
        jpeg._jpegcrop.header(buf.getvalue()) is None
        and jpeg.window_crop(buf.getvalue(), 256, 0, 0, 224) is None
    )
    buf = io.BytesIO()
    Image.new("RGB", (300, 260)).save(buf, "PNG")
    assert jpeg._jpegcrop.header(buf.getvalue()) is None
    assert jpeg._jpegcrop.header(b"") is None
    assert jpeg._jpegcrop.header(photo_jpeg(50, 40)) == (50, 40, 3)
    gray = io.BytesIO()
    Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None] % 251, (260, 1))).save(gray, "JPEG")
    assert jpeg._jpegcrop.header(gray.getvalue()) == (300, 260, 1)
    out = jpeg.window_crop(gray.getvalue(), 256, 10, 0, 224)
    assert out is not None and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    data = photo_jpeg(500, 375)
    truncated = data[: len(data) // 2]  # libjpeg warns "premature end of data" → Pillow's policy decides
    with pytest.raises(ValueError, match="libjpeg"):
        jpeg._jpegcrop.crop(truncated, 1, 0, 300, 500, 375)
    assert jpeg.window_crop(truncated, 256, 0, 0, 224) is None
    with pytest.raises(OSError):  # the PIL fallback refuses a truncated file, as without the extension
        jpeg.train_crop_jpeg(truncated, 256, 224, np.random.default_rng(0))
    with pytest.raises(ValueError, match="denom"):
        jpeg._jpegcrop.crop(data, 3, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="empty window"):
        jpeg._jpegcrop.crop(data, 1, 600, 0, 700, 10)
    with pytest.raises(ValueError, match="out buffer of 100 bytes"):
        jpeg._jpegcrop.crop(data, 1, 0, 0, 100, 100, np.empty(100, np.uint8))
    with pytest.raises(BufferError):  # read-only
        jpeg._jpegcrop.crop(data, 1, 0, 0, 100, 100, bytes(10**6))
    out = np.zeros(500 * 375 * 4, np.uint8)
    pixels, *_ = jpeg._jpegcrop.crop(data, 1, 0, 0, 500, 375, out)
    assert pixels is out and out.any()


@needs_window
def test_every_decoder_gives_the_same_crop_from_the_same_draws():
    data = photo_jpeg(500, 375)
    for seed in range(8):
        crops = {
            name: as_i16(
                jpeg.train_crop_jpeg(data, (256, 512), 224, np.random.default_rng(seed), decoder=name)
            )
            for name in JPEG_DECODERS
        }
        assert np.array_equal(crops["auto"], crops["window"])
        for name in ("simplejpeg", "pil"):
            assert np.abs(crops["window"] - crops[name]).max() <= 2
    assert jpeg.available_decoder() == "window"
    with pytest.raises(ValueError, match="decoder must be one of"):
        jpeg.train_crop_jpeg(data, 256, 224, np.random.default_rng(0), decoder="nvjpeg")


@needs_window
def test_window_decoder_runs_in_threads_without_the_gil():
    from concurrent.futures import ThreadPoolExecutor

    data = [photo_jpeg(500, 375, seed=i) for i in range(4)]
    expected = [jpeg.window_crop(d, 300, 20, 30, 224) for d in data]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda d: jpeg.window_crop(d, 300, 20, 30, 224), data))
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@needs_window
@pytest.mark.parametrize(
    "size, q", [((500, 375), 256), ((375, 500), 384), ((683, 512), 224), ((2048, 1536), 256)]
)
def test_center_crop_decodes_the_window_and_matches_the_pil_route(size, q, monkeypatch):
    data = photo_jpeg(*size)
    ours = as_i16(jpeg.center_crop_jpeg(data, q, 224))
    monkeypatch.setattr(jpeg, "_jpegcrop", None)
    pil = as_i16(jpeg.center_crop_jpeg(data, q, 224))
    assert np.abs(ours - pil).max() <= 2 and np.abs(ours - pil).mean() < 0.02


@needs_window
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (2048, 1536), (3000, 400)])
def test_decode_rescaled_through_the_window_decoder_equals_the_pil_route(size, monkeypatch):
    data = photo_jpeg(*size)
    # q=None decodes first; had it returned a view of the reused decode buffer, the later decodes would have
    # overwritten it before the comparison below
    ours = {q: jpeg.decode_rescaled(data, q) for q in (None, 224, 384, 512)}
    monkeypatch.setattr(jpeg, "_jpegcrop", None)
    for q, got in ours.items():
        assert torch.equal(got, jpeg.decode_rescaled(data, q)), q  # same decoded pixels, same box: bit-exact


def test_non_rgb_jpeg_comes_out_rgb():
    buf = io.BytesIO()
    Image.new("L", (300, 260), 77).save(buf, "JPEG")
    out = jpeg.train_crop_jpeg(buf.getvalue(), 256, 224, np.random.default_rng(0))
    assert out.shape == (3, 224, 224) and int(out.float().mean().round()) == 77


def test_collate_images_is_channels_last_stack():
    imgs = [torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]
    batch = jpeg.collate_images(imgs)
    assert batch.shape == (3, 3, 4, 5) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([im.contiguous() for im in imgs]))
