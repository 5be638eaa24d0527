"""Exact, mergeable RGB moments → mean RGB, RGB covariance and its PCA (stats.json; paper §3.1).

The paper subtracts the mean RGB value computed on the training set (§2.1) and, following Krizhevsky et al.,
augments with a random RGB colour shift along the principal components of the RGB pixel covariance (§3.1).
Both come from here, computed over every pixel written to the shards.

Per image the sums Σx and Σxxᵀ are computed in exact integer arithmetic (the C extension ``preprocess._moments``
when it was built, else numpy int64; both exact up to ~10¹⁴ pixels per image) and then carried as Python integers, so per-task accumulation and the merge across tasks are exact in any order. Only the final mean / covariance are rounded to float64.
The covariance is the population covariance (divide by the number of pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vggdist.shardformat import FORMAT_VERSION

try:  # the same sums in C (built at install time when a compiler exists), for the preprocessing path
    from preprocess._moments import rgb_moments as _rgb_moments
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _rgb_moments = None


@dataclass
class RGBMoments:
    """Counts, channel sums Σx and the 3×3 sum of outer products Σxxᵀ over all pixels seen, as exact integers."""

    images: int = 0
    pixels: int = 0
    sum_rgb: list[int] = field(default_factory=lambda: [0, 0, 0])
    sum_outer: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])

    def add_image(self, pixels: np.ndarray) -> None:
        """Add one (H, W, 3) uint8 image."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
        if _rgb_moments is not None:
            n, sums, (rr, rg, rb, gg, gb, bb) = _rgb_moments(np.ascontiguousarray(pixels))
            self._add(n, sums, ((rr, rg, rb), (rg, gg, gb), (rb, gb, bb)))
        else:
            self._add_numpy(pixels)

    def _add(self, n: int, sums, outer) -> None:
        self.images += 1
        self.pixels += n
        for i in range(3):
            self.sum_rgb[i] += sums[i]
            for j in range(3):
                self.sum_outer[i][j] += outer[i][j]

    def _add_numpy(self, pixels: np.ndarray) -> None:
        """`add_image` without the C extension: the same exact sums with numpy int64."""
        n = pixels.shape[0] * pixels.shape[1]
        # Channel planes as int64 rows (3, N): contiguous rows make the sums and dot products fast (a strided
        # (N, 3) reduction is several times slower), and integer arithmetic makes them exact.
        planes = np.empty((3, n), dtype=np.int64)
        planes[...] = pixels.reshape(n, 3).T
        sums = [int(planes[i].sum()) for i in range(3)]
        outer = [[int(np.dot(planes[i], planes[j])) for j in range(3)] for i in range(3)]
        self._add(n, sums, outer)

    def merge(self, other: RGBMoments) -> RGBMoments:
        """Add ``other`` into self (exact, order-independent) and return self."""
        self.images += other.images
        self.pixels += other.pixels
        for i in range(3):
            self.sum_rgb[i] += other.sum_rgb[i]
            for j in range(3):
                self.sum_outer[i][j] += other.sum_outer[i][j]
        return self

    def to_json(self) -> dict:
        return {
            "images": self.images,
            "pixels": self.pixels,
            "sum_rgb": self.sum_rgb,
            "sum_outer": self.sum_outer,
        }

    @classmethod
    def from_json(cls, d: dict) -> RGBMoments:
        return cls(
            images=int(d["images"]),
            pixels=int(d["pixels"]),
            sum_rgb=[int(v) for v in d["sum_rgb"]],
            sum_outer=[[int(v) for v in row] for row in d["sum_outer"]],
        )

    def mean(self) -> np.ndarray:
        """(3,) mean R, G, B on the 0–255 scale."""
        if not self.pixels:
            return np.zeros(3)
        return np.array([s / self.pixels for s in self.sum_rgb], dtype=np.float64)

    def covariance(self) -> np.ndarray:
        """(3, 3) population covariance on the 0–255 scale: (N·Σxxᵀ − ΣxΣxᵀ) / N², numerator exact."""
        n = self.pixels
        if not n:
            return np.zeros((3, 3))
        s = self.sum_rgb
        return np.array(
            [[(n * self.sum_outer[i][j] - s[i] * s[j]) / (n * n) for j in range(3)] for i in range(3)],
            dtype=np.float64,
        )


def pca(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors as rows (``vectors[i]`` belongs to ``values[i]``), unit length,
    each with its largest-magnitude component positive so the output is deterministic."""
    values, vectors = np.linalg.eigh(cov)  # ascending; columns are eigenvectors
    order = np.argsort(values)[::-1]
    values = values[order]
    rows = vectors[:, order].T.copy()
    for r in rows:
        if r[np.argmax(np.abs(r))] < 0:
            r *= -1
    return values, rows


def stats_dict(moments: RGBMoments, split: str) -> dict:
    """The stats.json document (`vggdist.shardformat`); ``exact`` keeps the integer sums so `verify` can recheck them."""
    cov = moments.covariance()
    values, vectors = pca(cov)
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "images": moments.images,
        "pixels": moments.pixels,
        "mean_rgb": moments.mean().tolist(),
        "cov_rgb": cov.tolist(),
        "eigenvalues": values.tolist(),
        "eigenvectors": vectors.tolist(),
        "exact": moments.to_json(),
    }


def format_stats(d: dict) -> str:
    """stats.json as a few readable lines (the `vggdist-preprocess stats` command)."""
    lines = [
        f"split       {d['split']}",
        f"images      {d['images']:,}",
        f"pixels      {d['pixels']:,}",
        "mean RGB    " + "  ".join(f"{v:8.3f}" for v in d["mean_rgb"]),
        "cov RGB     " + "\n            ".join("  ".join(f"{v:9.3f}" for v in row) for row in d["cov_rgb"]),
        "PCA         eigenvalue   eigenvector (R, G, B)",
    ]
    for value, vec in zip(d["eigenvalues"], d["eigenvectors"], strict=True):
        lines.append(f"            {value:10.3f}   " + "  ".join(f"{v:+.4f}" for v in vec))
    return "\n".join(lines)
