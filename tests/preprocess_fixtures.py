"""Generators for the preprocessing tests: every image kind ImageNet throws at us, and the archive layouts
(image folder, tar of per-class tars, flat val tar with devkit / Kaggle labels). Real files, small sizes."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def natural_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour gradients plus mild noise, so JPEGs have realistic sizes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(2, 6, 3) / max(width, height)
    chans = [127 + 100 * np.sin(2 * np.pi * freq[c] * (x + 0.7 * y) + phase[c]) for c in range(3)]
    img = np.stack(chans, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_jpeg(width: int, height: int, seed: int = 0, **kw) -> bytes:
    return encode(Image.fromarray(natural_rgb(width, height, seed)), "JPEG", quality=90, **kw)


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6, seed: int = 0) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return rgb_jpeg(width, height, seed, exif=exif.tobytes())


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid tiny PNG whose IHDR claims ``width`` × ``height`` (no pixel data worth decoding)."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_at = 8  # after the signature: length(4) "IHDR"(4) payload(13) crc(4)
    payload = struct.pack(">II", width, height) + data[ihdr_at + 16 : ihdr_at + 21]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + payload) & 0xFFFFFFFF)
    return data[: ihdr_at + 8] + payload + crc + data[ihdr_at + 25 :]


def image_kinds() -> dict[str, bytes]:
    """name → file bytes for every kind the stage must handle (the first ten decode, the last five are refused)."""
    rgb = Image.fromarray(natural_rgb(96, 64, 1))
    palette_alpha = rgb.convert("RGBA")
    palette_alpha.putalpha(Image.linear_gradient("L").resize(rgb.size))
    gray16 = (natural_rgb(70, 50, 2)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    good = rgb_jpeg(120, 90, 5)
    return {
        "rgb_small": rgb_jpeg(80, 60, 3),
        "rgb_large": rgb_jpeg(200, 150, 4),
        "progressive": rgb_jpeg(90, 70, 6, progressive=True),
        "cmyk": encode(Image.fromarray(natural_rgb(64, 48, 7)).convert("CMYK"), "JPEG", quality=90),
        "png_as_jpeg": encode(rgb, "PNG"),
        "grayscale": encode(Image.fromarray(natural_rgb(60, 80, 8)[..., 1]), "JPEG", quality=90),
        "palette_alpha": encode(
            palette_alpha.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0
        ),
        "rgba_png": encode(palette_alpha, "PNG"),
        "png16": encode(Image.fromarray(gray16), "PNG"),
        "exif_rotated": exif_rotated_jpeg(100, 60, orientation=6, seed=9),
        "truncated": good[: len(good) * 2 // 3],
        "garbage": bytes(np.random.default_rng(10).integers(0, 256, 3000, dtype=np.uint8)),
        "empty": b"",
        "bomb": bomb_png(),
        "aspect": rgb_jpeg(400, 8, 11),
    }


REFUSED = {
    "truncated": "truncated",
    "garbage": "undecodable",
    "empty": "empty",
    "bomb": "too_many_pixels",
    "aspect": "aspect_ratio",
}


def make_image_folder(
    root: Path, wnids: list[str], per_class: int, seed: int = 0, size=(72, 56)
) -> list[Path]:
    paths = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            p = root / wnid / f"{wnid}_{i}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rgb_jpeg(size[0] + 8 * i, size[1], seed * 1000 + c * 100 + i))
            paths.append(p)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buf.getvalue()


def make_train_tar(path: Path, per_class: dict[str, dict[str, bytes]]) -> Path:
    """ILSVRC2012_img_train.tar layout: ``<wnid>.tar`` members, each a tar of ``<wnid>_<n>.JPEG``."""
    write_tar(path, {f"{wnid}.tar": tar_bytes(files) for wnid, files in per_class.items()})
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path


def write_meta_mat(path: Path, synsets: list[tuple[int, str, str, int]]) -> Path:
    """A devkit-style meta.mat: struct array ``synsets`` with ILSVRC2012_ID, WNID, words, num_children."""
    from scipy.io import savemat

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    arr = np.zeros((len(synsets), 1), dtype=dtype)
    for i, (sid, wnid, words, children) in enumerate(synsets):
        arr[i, 0] = (np.array([[sid]], dtype=np.uint16), wnid, words, np.array([[children]], dtype=np.uint16))
    savemat(str(path), {"synsets": arr})
    return path
