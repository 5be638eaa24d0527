"""Images/s per CPU core of the §3.1 training input pipeline: naive torchvision vs vggdist vs the decode ceiling.

On generated ImageNet-like JPEGs (500×375, 375×500 and larger photos stored with smallest side 512, as
`vggdist-preprocess` writes them; smooth gradients + coarse and fine noise, q90), one process, one thread:

  (a) naive torchvision: PIL open → convert RGB → Resize(S), S ~ U{256..512} per image → RandomCrop(224) →
      RandomHorizontalFlip → ToTensor → Normalize, plus AlexNet's PCA lighting on the float tensor (so both
      sides do the same augmentation), stacked into a float batch;
  (b) vggdist: `jpeg.train_crop_jpeg` (the window decoder `vggdist._jpegcrop` when built, else simplejpeg, else
      PIL; DCT draft decode, crop-before-resize, flip) → uint8 channels_last batch ("CPU part only", what the
      loader workers do), and the same plus `DeviceAugment` run on the CPU ("incl. normalisation on CPU", an
      upper bound: on a GPU that part costs the CPU nothing);
  (c) the ceiling of a decode-everything pipeline: PIL full decode, and torchvision.io.decode_jpeg, of the
      same bytes; (c') simplejpeg, full size and at 1/8 (nearly only the entropy decoding every decode does);
      and the window decode alone (the pixels one jittered crop needs, no resampling).

Ablations isolate each step: crop-before-resize vs rescale-then-crop, the DCT draft decode vs a full-size
decode, Pillow's decoder vs torchvision.io.decode_jpeg inside the same pipeline, and the full `train_loader`
(tar reading, shuffle buffer, batching) vs the bare transform. The last rows turn the rates into CPU cores per
2,000 / 4,000 img/s, what one GPU eats. With a GPU present two more rows are printed: DeviceAugment on a
256 × 224² batch, and nvJPEG (decode_jpeg(device="cuda")) against one CPU core.
"""

from __future__ import annotations

import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision.io as tvio
import webdataset as wds
from PIL import Image

try:
    import simplejpeg
except ImportError:  # the PIL decoder then serves both (b) rows
    simplejpeg = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, parser, report  # noqa: E402
from bench.loader_baselines import (  # noqa: E402
    CROP,
    EIGVAL,
    EIGVEC,
    JITTER,
    MEAN,
    crop_without_draft,
    naive_pipeline,
    pil_decode,
    rescale_then_crop,
    turbo_decode,
    tv_decode,
    tv_decode_then_crop,
    window_decode,
)
from vggdist import augment, jpeg  # noqa: E402
from vggdist import data as D  # noqa: E402
from vggdist.config import DataConfig  # noqa: E402

# stored sizes (width, height) and their share: ImageNet's common 500×375 / 375×500 and larger photos
# downscaled by the preprocessing stage to smallest side 512
MIX = [((500, 375), 0.4), ((375, 500), 0.2), ((683, 512), 0.25), ((512, 768), 0.15)]


def photo_jpeg(w: int, h: int, rng: np.random.Generator) -> bytes:
    """A photo-like q90 JPEG: smooth colour gradients, blotchy mid-frequency texture, fine sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    f = rng.uniform(2, 9, 6)
    base = np.stack(
        [
            128 + 90 * np.sin(f[0] * x + f[1] * y),
            128 + 80 * np.cos(f[2] * x - f[3] * y),
            128 + 70 * np.sin(f[4] * x * y + f[5] * y),
        ],
        axis=-1,
    )
    coarse = np.kron(rng.normal(0, 25, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    img = np.clip(base + coarse + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = [s for s, _ in MIX]
    picks = rng.choice(len(MIX), size=n, p=[p for _, p in MIX])
    return [photo_jpeg(*sizes[i], rng) for i in picks]


# ---------------------------------------------------------------------------------------------------------
# (b) ours


def ours_cpu(scale=JITTER, decoder="auto"):
    """`train_crop_jpeg` as the loader runs it ("auto": the window decoder when built; or a named decoder)."""
    rng = np.random.default_rng(0)
    return lambda batch: jpeg.collate_images([jpeg.train_crop_jpeg(d, scale, CROP, rng, decoder) for d in batch])


def ours_with_norm():
    aug = augment.DeviceAugment(MEAN, [v * augment.EIGVAL_TO_PIXELS for v in EIGVAL], EIGVEC, 0.1)
    cpu = ours_cpu()
    return lambda batch: aug(cpu(batch), train=True)


# ---------------------------------------------------------------------------------------------------------


def measure(methods: dict, images: list[bytes], rounds: int, batch: int = 32) -> dict[str, float]:
    """Images per CPU-second of each method: best of `rounds` interleaved passes over `images`.

    CPU time of this (single-threaded) process, not wall time: on a shared machine the time spent descheduled
    is not the pipeline's cost, and per-core throughput is what sizes a node.
    """
    best = dict.fromkeys(methods, 0.0)
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    for fn in methods.values():  # warm-up
        fn(chunks[0][:2])
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.process_time()
            for c in chunks:
                fn(c)
            best[name] = max(best[name], len(images) / (time.process_time() - t0))
    return best


def loader_rate(images: list[bytes], rounds: int, batch: int = 32) -> float:
    """End-to-end `train_loader` (tar read, shuffle buffer, batching) in this process, images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "train"
        d.mkdir()
        half = len(images) // 2
        shards = []
        for s, part in enumerate([images[:half], images[half:]]):
            name = f"train-{s:06d}.tar"
            with wds.TarWriter(str(d / name)) as sink:
                for i, data in enumerate(part):
                    sink.write({"__key__": f"k{s}_{i:06d}", "jpg": data, "cls": b"0"})
            shards.append({"name": name, "samples": len(part), "bytes": 0, "sha256": ""})
        (d / "manifest.json").write_text(
            f'{{"split": "train", "num_samples": {len(images)}, "shards": {str(shards).replace(chr(39), chr(34))}}}'
        )
        # a small buffer and three passes' worth of steps: the buffer's initial fill (read, not yet used)
        # is a start-up cost that a real epoch amortises over thousands of steps
        cfg = DataConfig(scale_jitter=JITTER, shuffle_buffer=batch, loader_workers=0)
        steps = 3 * len(images) // batch
        best = 0.0
        for r in range(rounds):
            loader = D.train_loader(
                d, cfg, batch_size=batch, steps=steps, rank=0, world_size=1, seed=0, epoch=r, num_workers=0
            )
            t0 = time.process_time()
            for _ in loader:
                pass
            best = max(best, steps * batch / (time.process_time() - t0))
        return best


def gpu_rows(images: list[bytes]) -> list[Row]:
    """Only with a GPU: DeviceAugment on a 256-image batch, and nvJPEG decode vs CPU decode."""
    dev = torch.device("cuda")
    aug = augment.DeviceAugment(MEAN, [v * augment.EIGVAL_TO_PIXELS for v in EIGVAL], EIGVEC, 0.1).to(dev)
    x = torch.randint(0, 256, (256, 3, CROP, CROP), dtype=torch.uint8, device=dev)
    aug(x, train=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        aug(x, train=True)
    torch.cuda.synchronize()
    aug_rate = 20 * 256 / (time.perf_counter() - t0)
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
    tvio.decode_jpeg(datas[:4], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tvio.decode_jpeg(datas, device="cuda")
    torch.cuda.synchronize()
    gpu_dec = len(datas) / (time.perf_counter() - t0)
    cpu_dec = measure({"tv": tv_decode()}, images, 1)["tv"]
    return [
        Row("GPU: DeviceAugment (colour shift + mean), batch 256", "img/s", float("nan"), aug_rate),
        Row("GPU: nvJPEG decode_jpeg(device=cuda) vs 1 CPU core", "img/s", cpu_dec, gpu_dec),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    n, rounds = (64, 4) if args.quick else (256, 10)
    t0 = time.perf_counter()
    images = make_images(n)
    large = [d for d in images if min(Image.open(io.BytesIO(d)).size) == 512]
    gen_s = time.perf_counter() - t0

    methods = {
        "naive": naive_pipeline(),
        "ours": ours_cpu(),
        "ours_pil": ours_cpu(decoder="pil"),
        "ours+norm": ours_with_norm(),
        "rescale_then_crop": rescale_then_crop(),
        "no_draft": crop_without_draft(JITTER),
        "tv_route": tv_decode_then_crop(),
        "pil_decode": pil_decode(),
        "tv_decode": tv_decode(),
    }
    if simplejpeg is not None:
        methods |= {
            "ours_sj": ours_cpu(decoder="simplejpeg"),
            "sj_decode": turbo_decode(),
            "sj_decode_8": turbo_decode(8),
        }
    if jpeg._jpegcrop is not None:
        methods |= {"window_decode": window_decode()}
    r = measure(methods, images, rounds)
    s256 = measure({"draft": ours_cpu(256, decoder="pil"), "no_draft": crop_without_draft(256)}, large, rounds)
    loader = loader_rate(images, max(2, rounds // 2))

    rows = [
        Row("(b) ours CPU part vs (a) naive torchvision", "img/s", r["naive"], r["ours"]),
        Row("(b) ours incl. normalisation on CPU vs (a) naive", "img/s", r["naive"], r["ours+norm"]),
        Row("(b) ours CPU part vs (c) PIL full decode", "img/s", r["pil_decode"], r["ours"]),
        Row("(b) ours CPU part vs (c) torchvision.io.decode_jpeg", "img/s", r["tv_decode"], r["ours"]),
        Row("(c) PIL decode vs (a) naive: the ceiling over naive", "img/s", r["naive"], r["pil_decode"]),
    ]
    if jpeg._jpegcrop is not None:
        rows += [
            Row("ours: window decoder vs PIL decoder", "img/s", r["ours_pil"], r["ours"]),
            Row("window decode alone vs PIL full decode", "img/s", r["pil_decode"], r["window_decode"]),
        ]
    if simplejpeg is not None:
        rows += [
            Row("ours: simplejpeg decoder vs PIL decoder", "img/s", r["ours_pil"], r["ours_sj"]),
            Row("(b) ours CPU part vs (c') simplejpeg full decode", "img/s", r["sj_decode"], r["ours"]),
            Row("(c') simplejpeg full decode vs (a) naive", "img/s", r["naive"], r["sj_decode"]),
            Row(
                "simplejpeg 1/8 decode (~entropy only) vs full decode",
                "img/s",
                r["sj_decode"],
                r["sj_decode_8"],
            ),
        ]
    rows += [
        Row(
            "crop-before-resize vs rescale-then-crop (uint8, PIL)",
            "img/s",
            r["rescale_then_crop"],
            r["ours_pil"],
        ),
        Row("draft decode vs full decode, jitter [256,512], PIL", "img/s", r["no_draft"], r["ours_pil"]),
        Row("draft decode vs full decode, S=256, 512-side photos", "img/s", s256["no_draft"], s256["draft"]),
        Row("PIL decoder vs torchvision.io.decode_jpeg in ours", "img/s", r["tv_route"], r["ours_pil"]),
        Row("full train_loader (tar, shuffle, batch) vs bare ours", "img/s", r["ours"], loader),
    ]
    for target in (2000, 4000):
        rows.append(
            Row(
                f"CPU cores to feed {target:,} img/s (naive vs ours)",
                "cores",
                target / r["naive"],
                target / r["ours"],
                higher_is_better=False,
            )
        )
    if torch.cuda.is_available():
        rows += gpu_rows(images)
    simd = ".post" in PIL.__version__
    notes = [
        f"{n} JPEGs ({len(large)} with smallest side 512), q90, generated in {gen_s:.1f}s; one process, "
        f"torch threads 1; CPU time, best of {rounds} interleaved passes, batches of 32",
        f"Pillow {PIL.__version__} ({'pillow-simd' if simd else 'stock Pillow'}) for both sides; ours decodes with "
        f"the {jpeg.available_decoder()} decoder; (a) includes PCA lighting so both sides augment the same",
        f"ours is {r['ours'] / r['naive']:.2f}x naive and {100 * r['ours'] / r['pil_decode']:.0f}% of a PIL full decode",
        f"cores to feed an H100 at 2,000 / 4,000 img/s with ours: {math.ceil(2000 / r['ours'])} / "
        f"{math.ceil(4000 / r['ours'])}, end to end through train_loader {math.ceil(2000 / loader)} / "
        f"{math.ceil(4000 / loader)} (naive: {math.ceil(2000 / r['naive'])} / {math.ceil(4000 / r['naive'])})",
    ]
    report("Training input pipeline, images/s per CPU core", rows, args.json, notes)


if __name__ == "__main__":
    main()
