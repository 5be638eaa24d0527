"""§3.1 training augmentation: where a crop goes (on the CPU, per image) and what happens to its pixels (on the
device, per batch).

Geometry (`sample_crop`): the image is rescaled isotropically so its smallest side is S, fixed or drawn per
image uniformly from the integers of [S_min, S_max] (scale jittering); a crop × crop window is placed uniformly
inside it and mirrored with probability 1/2. The window is given in S-space; `vggdist.jpeg` decodes and
resamples only what it covers. Test crops are placed like torchvision's CenterCrop (`center_offsets`).

Device side (`DeviceAugment`): uint8 → float, the PCA colour shift (training only) and mean-RGB subtraction
(optionally /std), with the statistics of stats.json. Doing this on the accelerator keeps the CPU → device copy
at 1 byte per value and costs the CPU nothing.

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

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from vggdist.config import DataConfig
from vggdist.shardformat import check_stats

__all__ = [
    "EIGVAL_TO_PIXELS",
    "DeviceAugment",
    "center_offsets",
    "check_window",
    "pca_color_offset",
    "sample_crop",
    "scaled_size",
]

# λ of stats.json (variances of 0–255 values) → the factor that makes Σ α λ p an offset in 0–255 units under
# the [0, 1]-pixel convention (see the module docstring).
EIGVAL_TO_PIXELS = 1.0 / 255.0


# ----------------------------------------------------------------------------------------------------------
# Geometry, in S-space (the image rescaled to smallest side S)


def scaled_size(width: int, height: int, s: int) -> tuple[int, int]:
    """(width, height) after an isotropic rescale to smallest side `s` (torchvision's ``Resize(s)`` rounding)."""
    if width <= height:
        return s, int(s * height / width)
    return int(s * width / height), s


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


def center_offsets(width: int, height: int, q: int, crop: int) -> tuple[int, int]:
    """(left, top) of the central crop × crop window of the image rescaled to smallest side Q, placed like
    torchvision's CenterCrop (offsets rounded from (size − crop) / 2)."""
    sw, sh = scaled_size(width, height, q)
    return int(round((sw - crop) / 2.0)), int(round((sh - crop) / 2.0))


def check_window(sw: int, sh: int, s: int, left: int, top: int, crop: int) -> None:
    if not (0 <= left <= sw - crop and 0 <= top <= sh - crop):
        raise ValueError(f"a {crop}x{crop} crop at ({left}, {top}) does not fit the {sw}x{sh} image at S={s}")


# ----------------------------------------------------------------------------------------------------------
# Device side: batched float maths, with the statistics of stats.json


def pca_color_offset(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor) -> torch.Tensor:
    """AlexNet's colour shift: offset[n] = Σᵢ alpha[n, i] · eigval[i] · eigvec[i] → (N, 3) RGB.

    alpha (N, 3); eigval (3,); eigvec (3, 3) with row i the unit eigenvector of eigval[i]. The offset is in the
    units of eigval (pass λ · EIGVAL_TO_PIXELS for 0–255 pixels, see the module docstring).
    """
    return (alpha * eigval) @ eigvec  # (N, 3) @ (3, 3): Σᵢ (αᵢ λᵢ) pᵢ


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
