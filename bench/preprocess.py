"""Benchmark of the preprocessing stage: images/s per core, ours vs a naive baseline, side by side.

Inputs are generated ImageNet-like JPEGs (q90): 500×375 (the typical ImageNet size, below the 512 limit) and
1600×1200 (a large photo, downscaled to 683×512).

- naive baseline: ``Image.open → convert("RGB") → exif_transpose → resize (Lanczos, full resolution) when the
  smallest side is above 512 → re-encode q90`` for every image; for the *stage* rows also what the stage must
  deliver besides shards, done the straightforward way: decode every written JPEG again and accumulate the RGB
  sums and Σxxᵀ in float64 numpy over the (N, 3) pixel array.
- ours: ``preprocess.images.to_jpeg`` (header checks, original bytes kept when allowed, DCT-domain draft
  decoding, decode of the stored bytes; the decodes through ``vggdist._jpegcrop`` when it is built) plus
  ``preprocess.stats.RGBMoments.add_image`` (exact integer moments, in C when ``preprocess._moments`` is built);
  the end-to-end row runs ``run_shard_job`` (serial path) on a tar of the mixed corpus against a naive loop that
  reads the same tar, writes the same tar layout and computes the same statistics (the two alternate, best of
  two rounds each).

Per core = images / CPU seconds of this single process (``time.process_time``), which stays meaningful on a
shared machine. ``--quick`` finishes in well under a minute on 2 cores.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, parser, report  # noqa: E402
from preprocess import images as images_mod  # noqa: E402
from preprocess import stats as stats_mod  # noqa: E402
from preprocess.images import ImageLimits, to_jpeg  # noqa: E402
from preprocess.shards import ShardJob, run_shard_job  # noqa: E402
from preprocess.stats import RGBMoments  # noqa: E402

MAX_SIDE = 512
QUALITY = 90


def photo_like(width: int, height: int, seed: int) -> bytes:
    """A q90 JPEG with smooth colour regions, edges and sensor-like noise (ImageNet-like bytes per pixel)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        f = rng.uniform(1, 8, 2)
        img[..., c] = 128 + 70 * np.sin(2 * np.pi * (f[0] * x + f[1] * y) + rng.uniform(0, 6))
    for _ in range(6):  # a few hard-edged blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def naive_image(data: bytes) -> bytes:
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))
    w, h = im.size
    if min(w, h) > MAX_SIDE:
        s = MAX_SIDE / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


class NaiveStats:
    def __init__(self) -> None:
        self.n, self.s, self.g = 0, np.zeros(3), np.zeros((3, 3))

    def add(self, jpeg: bytes) -> None:
        x = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).reshape(-1, 3).astype(np.float64)
        self.n += len(x)
        self.s += x.sum(0)
        self.g += x.T @ x


def per_image_rows(corpus: dict[str, list[bytes]], limits: ImageLimits) -> list[Row]:
    """Four CPU-time totals per size: naive image path, naive stats pass, ours to_jpeg, ours moments."""
    totals = {}
    for name, images in corpus.items():
        t = dict.fromkeys(("naive", "naive_stats", "ours", "ours_stats"), 0.0)
        naive_stats, moments = NaiveStats(), RGBMoments()
        for data in images:
            c0 = time.process_time()
            out = naive_image(data)
            c1 = time.process_time()
            naive_stats.add(out)
            c2 = time.process_time()
            enc = to_jpeg(data, limits)
            c3 = time.process_time()
            moments.add_image(enc.pixels)
            c4 = time.process_time()
            for k, dt in zip(t, (c1 - c0, c2 - c1, c3 - c2, c4 - c3), strict=True):
                t[k] += dt
        totals[name] = (len(images), t)
    n_all = sum(n for n, _ in totals.values())
    mix = {k: sum(t[k] for _, t in totals.values()) for k in ("naive", "naive_stats", "ours", "ours_stats")}
    rows = []
    for name, (n, t) in [*totals.items(), ("mix", (n_all, mix))]:
        rows.append(
            Row(f"image path {name}", "img/s/core", n / t["naive"], n / (t["ours"] + t["ours_stats"]))
        )
        rows.append(
            Row(
                f"stage (image+stats) {name}",
                "img/s/core",
                n / (t["naive"] + t["naive_stats"]),
                n / (t["ours"] + t["ours_stats"]),
            )
        )
    return rows


def end_to_end_row(corpus: dict[str, list[bytes]], workdir: Path, rounds: int = 2) -> Row:
    """run_shard_job (serial, in this process) vs a naive loop over the same train tar of tars."""
    members = {}
    for name, images in corpus.items():
        wnid = f"n{abs(hash(name)) % 10**8:08d}"
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as t:
            for i, data in enumerate(images):
                info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        members[f"{wnid}.tar"] = inner.getvalue()
    src = workdir / "train.tar"
    with tarfile.open(src, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    n = sum(len(v) for v in corpus.values())

    def naive(out: Path) -> None:
        stats = NaiveStats()
        with tarfile.open(src) as outer, tarfile.open(out, "w") as sink:
            for m in outer:
                with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                    for im in inner:
                        jpeg = naive_image(inner.extractfile(im).read())
                        stats.add(jpeg)
                        key = im.name.rsplit(".", 1)[0]
                        for ext, data in (("jpg", jpeg), ("cls", b"0"), ("json", b"{}")):
                            info = tarfile.TarInfo(f"{key}.{ext}")
                            info.size = len(data)
                            sink.addfile(info, io.BytesIO(data))

    def ours(out: Path) -> None:
        job = ShardJob(str(src), "train", str(out), samples_per_shard=256)
        summary = run_shard_job(job, workers=1, progress=False)
        assert summary.written == n, summary.format()

    # alternate the two, best of `rounds` each: one pass of each is too exposed to the machine's drift
    best = {"naive": 0.0, "ours": 0.0}
    for r in range(rounds):
        for name, fn in (("naive", naive), ("ours", ours)):
            c0 = time.process_time()
            fn(workdir / f"{name}{r}")
            best[name] = max(best[name], n / (time.process_time() - c0))
    return Row("end-to-end shard job, mix", "img/s/core", best["naive"], best["ours"])


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--small", type=int, help="number of 500x375 images")
    p.add_argument("--large", type=int, help="number of 1600x1200 images")
    args = p.parse_args(argv)
    n_small = args.small or (150 if args.quick else 2000)
    n_large = args.large or (50 if args.quick else 1000)
    t0 = time.perf_counter()
    distinct = 8
    small = [photo_like(500, 375, s) for s in range(distinct)]
    large = [photo_like(1600, 1200, 100 + s) for s in range(distinct)]
    corpus = {
        "500x375": [small[i % distinct] for i in range(n_small)],
        "1600x1200": [large[i % distinct] for i in range(n_large)],
    }
    rows = per_image_rows(corpus, ImageLimits(max_side=MAX_SIDE, quality=QUALITY))
    with tempfile.TemporaryDirectory() as d:
        rows.append(end_to_end_row(corpus, Path(d)))
    kb = {k: np.mean([len(b) for b in v[:distinct]]) / 1e3 for k, v in corpus.items()}
    notes = [
        f"{n_small} × 500x375 ({kb['500x375']:.0f} kB) + {n_large} × 1600x1200 ({kb['1600x1200']:.0f} kB), q{QUALITY},"
        f" max side {MAX_SIDE}; per core = images / CPU seconds of one process",
        "image path: naive decode/resize/re-encode vs ours incl. its exact stats; stage: both incl. stats",
        "C extensions: vggdist._jpegcrop "
        + ("built" if images_mod._jpegcrop is not None else "NOT built (Pillow decodes)")
        + ", preprocess._moments "
        + ("built" if stats_mod._rgb_moments is not None else "NOT built (numpy sums)"),
        f"wall time of the whole benchmark: {time.perf_counter() - t0:.1f} s",
    ]
    report("preprocess: images/s per core, naive baseline vs vggdist-preprocess", rows, args.json, notes)


if __name__ == "__main__":
    main()
