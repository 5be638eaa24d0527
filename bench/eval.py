"""Evaluation cost (§3.2): images/s of dense evaluation vs 150-crop multi-crop evaluation of the same images.

Both protocols score every image at the three test scales Q of the preset (paper 256/384/512; mini the same
ratios to crop 32: 37/55/73) with VGG-16 (D), as `vggdist.evaluate` does in ``vggdist evaluate``:

- baseline ``multicrop``: `multicrop_posteriors`, a 5×5 grid of crops plus their flips = 50 crops per scale,
  150 forward passes of a ``crop × crop`` crop per image, batched 64 crops at a time;
- ours ``dense``: `dense_posteriors` with the fully-convolutional net of `vggdist.dense.to_dense` (converted
  once, outside the timing), the whole rescaled image and its flip: 6 passes per image, images of the same
  size after rescaling batched together (the images mix three sizes, 4:3, 3:4 and 2:3).

img/s = images / wall time of all three scales, rescaling included. Sizes: ``mini`` (`SCALES["mini"]`,
images 48×64 / 64×48 / 48×72) always; ``paper`` (224 crops, images 375×500 / 500×375 / 333×500) with CUDA or
``--full``. On CPU: one thread, denormals flushed (the N(0, 0.01) init otherwise makes deep nets crawl), and
the paper size takes minutes per image for multi-crop, hence only 2 images there.

How to read: ratio = dense img/s / multi-crop img/s (> 1: dense is cheaper). Multi-crop costs a fixed 150
crop passes per image and recomputes the overlap of its crops (§3.2); dense costs grow with the rescaled
image's area (Q²), so the gap is widest at small Q.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, Timer, parser, report  # noqa: E402
from vggdist.dense import to_dense  # noqa: E402
from vggdist.evaluate import dense_posteriors, multicrop_posteriors  # noqa: E402
from vggdist.models import build_vgg  # noqa: E402
from vggdist.paper import MULTISCALE_Q, SCALES, to_crop  # noqa: E402

PAPER_SCALES = MULTISCALE_Q
# (height, width) of the test images: ImageNet's common 500×375 landscape / portrait and a 3:2 photo
SIZES = {"paper": [(375, 500), (500, 375), (333, 500)], "mini": [(48, 64), (64, 48), (48, 72)]}
BATCH_SIZE = 64


def _images(scale: str, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = SIZES[scale]
    return [torch.randn(3, *sizes[i % len(sizes)], generator=g) for i in range(n)]


def measure(scale: str, n_images: int, device: torch.device) -> dict[str, float]:
    """{"dense": img/s, "multicrop": img/s} of VGG-16 at `scale` ("paper" or "mini") on `n_images` images."""
    torch.manual_seed(0)
    model = build_vgg("D", 1000, **SCALES[scale]).to(device)
    dense = to_dense(model)
    crop = model.crop_size
    qs = [to_crop(q, crop) for q in PAPER_SCALES]
    images = _images(scale, n_images)
    protocols = {
        "multicrop": lambda q: multicrop_posteriors(model, images, q, crop, grid=5, batch_size=BATCH_SIZE),
        "dense": lambda q: dense_posteriors(dense, images, q, batch_size=BATCH_SIZE),
    }
    warm = images[: len(SIZES[scale])]  # one image of each size: first-call setup is not what we measure
    multicrop_posteriors(model, warm, qs[0], crop, grid=5, batch_size=BATCH_SIZE)
    dense_posteriors(dense, warm, qs[0], batch_size=BATCH_SIZE)
    rates = {}
    for name, run in protocols.items():
        with Timer() as t:
            for q in qs:
                run(q)  # (N, K) posteriors, copied to the CPU: the device is done when it returns
        rates[name] = n_images / t.seconds
    return rates


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also the paper size on CPU (minutes)")
    p.add_argument("--smoke", action="store_true", help="mini size, 3 images (tests)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    notes = []
    if cuda:
        notes.append(f"device: {torch.cuda.get_device_name()}")
    else:
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)
        notes.append("device: CPU, 1 thread (no CUDA)")
    runs = [("mini", 3 if args.smoke else 24 if args.quick else 96)]
    if cuda:
        runs.append(("paper", 16 if args.quick else 64))
    elif args.full:
        runs.append(("paper", 2))
    else:
        notes.append("paper size skipped on CPU (minutes per image for multi-crop); --full runs 2 images")
    rows = []
    for scale, n in runs:
        rates = measure(scale, n, device)
        qs = "/".join(str(to_crop(q, SCALES[scale]["crop_size"])) for q in PAPER_SCALES)
        rows.append(
            Row(f"{scale} VGG-16 img/s multicrop-150 vs dense", "img/s", rates["multicrop"], rates["dense"])
        )
        notes.append(f"{scale}: {n} images, Q = {qs}, crop {SCALES[scale]['crop_size']}")
    report("Evaluation: dense vs 150-crop multi-crop (3 scales)", rows, args.json, notes)
    return rows


if __name__ == "__main__":
    main()
