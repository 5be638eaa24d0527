"""§3.2 test-view geometry: rescaling to Q, the centre crop, the 5×5 multi-crop grid, the ten-crop boxes."""

import pytest
import torch

from vggdist.evaluate import (
    center_crop,
    multicrop_boxes,
    rescale,
    tencrop_boxes,
)


def test_rescale_smallest_side_keeps_aspect():
    assert rescale(torch.rand(3, 375, 500), 256).shape == (3, 256, 341)
    assert rescale(torch.rand(3, 500, 375), 256).shape == (3, 341, 256)
    assert rescale(torch.rand(2, 3, 100, 60), 30).shape == (2, 3, 50, 30)
    flat = torch.full((3, 40, 60), 0.25)
    torch.testing.assert_close(rescale(flat, 100), torch.full((3, 100, 150), 0.25))  # no border artefacts
    with pytest.raises(ValueError, match="positive"):
        rescale(flat, 0)


def test_center_crop():
    image = torch.arange(7 * 9, dtype=torch.float32).reshape(1, 7, 9).expand(3, 7, 9)
    crop = center_crop(image, 3)
    assert crop.shape == (3, 3, 3)
    assert crop[0, 0, 0] == image[0, 2, 3]  # offsets ((7-3)//2, (9-3)//2)
    with pytest.raises(ValueError, match="Q >= crop"):
        center_crop(image, 8)


def test_multicrop_boxes_grid_corners_and_borders():
    height, width, crop = 224 + 37, 224 + 130, 224
    boxes = multicrop_boxes(height, width, crop)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    tops = sorted({t for t, _ in boxes})
    lefts = sorted({left for _, left in boxes})
    assert tops[0] == 0 and tops[-1] == height - crop and lefts[0] == 0 and lefts[-1] == width - crop
    for corner in [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop)]:
        assert corner in boxes
    assert all(0 <= t <= height - crop and 0 <= left <= width - crop for t, left in boxes)
    steps = {b - a for a, b in zip(lefts, lefts[1:], strict=False)}
    assert max(steps) - min(steps) <= 1 and abs(min(steps) - 130 / 4) < 1  # regular spacing
    assert boxes[:5] == [(0, left) for left in lefts]  # row by row
    assert multicrop_boxes(224, 224, 224) == [(0, 0)] * 25  # image the size of the crop
    assert multicrop_boxes(10, 20, 4, grid=1) == [(3, 8)]
    with pytest.raises(ValueError, match="does not fit"):
        multicrop_boxes(100, 300, 224)


def test_tencrop_boxes_are_the_four_corners_and_the_centre():
    assert tencrop_boxes(37, 50, 32) == [(0, 0), (0, 18), (5, 0), (5, 18), (2, 9)]
    assert tencrop_boxes(256, 341, 224) == [(0, 0), (0, 117), (32, 0), (32, 117), (16, 58)]
    assert tencrop_boxes(224, 224, 224) == [(0, 0)] * 5  # image the size of the crop
    c = torch.arange(37 * 50.0).reshape(1, 37, 50)
    top, left = tencrop_boxes(37, 50, 32)[-1]
    assert torch.equal(c[:, top : top + 32, left : left + 32], center_crop(c, 32))  # the single-crop view
    with pytest.raises(ValueError, match="does not fit"):
        tencrop_boxes(31, 50, 32)
