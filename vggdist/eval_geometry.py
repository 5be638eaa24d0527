"""The geometry of §3.2's test views: the isotropic rescale to a test scale Q, the centre crop, the 5×5 multi-crop
grid (Table 5) and He et al.'s ten-crop boxes, on image tensors (3, H, W). `vggdist.evaluate` scores them.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF


def rescale(image: torch.Tensor, q: int) -> torch.Tensor:
    """Isotropic rescale of (3, H, W) or (N, 3, H, W) so the smallest side is ``q`` (bilinear, antialiased).

    The other side is ``int(q * long / short)``, torchvision's convention.
    """
    if q < 1:
        raise ValueError(f"test scale Q must be a positive number of pixels, got {q}")
    if min(image.shape[-2:]) == q:  # already at scale: keep the pixels as they are
        return image
    return TF.resize(image, [int(q)], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def _check_fits(height: int, width: int, crop: int) -> None:
    if height < crop or width < crop:
        raise ValueError(
            f"a {crop}x{crop} crop does not fit a {height}x{width} image; use test scales Q >= crop size"
        )


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size × size`` crop at the centre of (..., H, W) (offsets rounded down)."""
    height, width = image.shape[-2:]
    _check_fits(height, width, size)
    top, left = (height - size) // 2, (width - size) // 2
    return image[..., top : top + size, left : left + size]


def _grid_offsets(length: int, crop: int, grid: int) -> list[int]:
    if grid == 1:
        return [(length - crop) // 2]
    # i * (length - crop) / (grid - 1), rounded half up in integers: 0 and length - crop are exact.
    return [(2 * i * (length - crop) + grid - 1) // (2 * (grid - 1)) for i in range(grid)]


def multicrop_boxes(height: int, width: int, crop: int, grid: int = 5) -> list[tuple[int, int]]:
    """(top, left) of a regular ``grid × grid`` lattice of ``crop × crop`` boxes, row by row.

    The first and last rows / columns touch the image borders (the four corners are crops) and every box
    lies inside the image. With ``grid=1`` it is the centre crop.
    """
    if grid < 1:
        raise ValueError(f"multi-crop grid must be >= 1, got {grid}")
    _check_fits(height, width, crop)
    tops, lefts = _grid_offsets(height, crop, grid), _grid_offsets(width, crop, grid)
    return [(top, left) for top in tops for left in lefts]


def tencrop_boxes(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the 10-crop test's five boxes: the four corners (top-left, top-right, bottom-left,
    bottom-right), then the centre (offsets rounded down, as `center_crop`)."""
    _check_fits(height, width, crop)
    bottom, right = height - crop, width - crop
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
