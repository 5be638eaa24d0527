"""§3.2 testing and §4 evaluation protocols as pure functions over tensors (no data loading, no ray, no mlflow).

An image is a normalised float tensor (3, H, W) of any size. For a test scale Q it is rescaled isotropically
so its smallest side is Q, then scored by one of the protocols (each returns soft-max posteriors (N, K)):

- ``single``: the centre ``crop × crop`` crop (Table 3).
- ``dense``: the fully-convolutional net (`vggdist.dense`) on the whole image; the class score map is
  spatially averaged, and the soft-max of the image and of its horizontal flip are averaged (Tables 3–5).
- ``multicrop``: a regular 5×5 grid of crops and their flips, 50 per scale, soft-max averaged (Table 5).
- ``combined``: the average of dense and multi-crop posteriors (Table 5, "dense + multi-crop").

Several scales are combined by averaging their posteriors (Table 4), several networks likewise (Table 6).
Top-1/top-5 are returned as integer counts so that sums over batches and workers are exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from vggdist.dense import to_dense
from vggdist.runmeta import PROTOCOLS

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "add_counts",
    "center_crop",
    "combine",
    "dense_posteriors",
    "error_rates",
    "evaluate_batch",
    "fuse",
    "multicrop_boxes",
    "multicrop_posteriors",
    "multiscale",
    "rescale",
    "scales_key",
    "single_posteriors",
    "topk_counts",
]

# ---------------------------------------------------------------------------------------------------------
# Geometry


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


# ---------------------------------------------------------------------------------------------------------
# Running a model over views of images


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, BN running stats) without grad, restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _check_images(images: Sequence[torch.Tensor]) -> None:
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"image {i} has shape {tuple(image.shape)} and dtype {image.dtype}; expected a normalised "
                "float tensor (3, H, W)"
            )


def _mean_posteriors(
    model: nn.Module, views: Iterable[tuple[int, torch.Tensor]], n_images: int, batch_size: int
) -> torch.Tensor:
    """Mean soft-max over every image's views: (n_images, K) on the CPU.

    ``views`` yields (image index, (m, 3, h, w) views of that image). Views of the same size are batched
    together in forward passes of ``batch_size`` (the last one of a size may be smaller); nothing is padded.
    A 4-D output (a dense score map (m, K, h', w')) is spatially averaged before the soft-max.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sums: torch.Tensor | None = None
    counts = torch.zeros(n_images, dtype=torch.float64)
    pending: list[torch.Tensor] = []  # views waiting for a forward pass, all of one size
    owners: list[torch.Tensor] = []  # their image indices

    def run(x: torch.Tensor, idx: torch.Tensor) -> None:
        nonlocal sums
        scores = model(x)  # (m, K) or a score map (m, K, h', w')
        if scores.ndim == 4:
            scores = scores.mean(dim=(2, 3))  # (m, K): "spatially averaged (sum-pooled)"
        # soft-max in at least float32 (a half-precision model would round posteriors coarsely)
        probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=1).cpu()
        if sums is None:
            sums = probs.new_zeros(n_images, probs.shape[1])
        sums.index_add_(0, idx, probs)
        counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def flush(everything: bool) -> None:
        x, ids = torch.cat(pending), torch.cat(owners)  # (M, 3, h, w), (M,)
        pending.clear()
        owners.clear()
        n_run = len(x) if everything else len(x) - len(x) % batch_size  # full batches only, unless done
        for start in range(0, n_run, batch_size):
            stop = min(start + batch_size, n_run)
            run(x[start:stop], ids[start:stop])
        if n_run < len(x):
            pending.append(x[n_run:])
            owners.append(ids[n_run:])

    with _inference(model):
        for index, batch in views:
            if pending and batch.shape[-2:] != pending[0].shape[-2:]:
                flush(everything=True)  # a new size: never mix sizes, never pad
            pending.append(batch)
            owners.append(torch.full((len(batch),), index, dtype=torch.long))
            if sum(len(p) for p in pending) >= batch_size:
                flush(everything=False)
        if pending:
            flush(everything=True)
    assert sums is not None and bool((counts > 0).all()), "every image must have at least one view"
    return sums / counts.to(sums.dtype)[:, None]


def _rescaled(model: nn.Module, image: torch.Tensor, q: int) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    return rescale(image.to(device=device, dtype=dtype), q)  # resize where the model runs


def single_posteriors(
    model: nn.Module, images: Sequence[torch.Tensor], q: int, crop: int, *, batch_size: int = 64
) -> torch.Tensor:
    """Soft-max of the centre ``crop`` of each image rescaled to smallest side ``q``: (N, K)."""
    _check_images(images)
    views = ((i, center_crop(_rescaled(model, image, q), crop)[None]) for i, image in enumerate(images))
    return _mean_posteriors(model, views, len(images), batch_size)


def dense_posteriors(
    dense_model: nn.Module, images: Sequence[torch.Tensor], q: int, *, batch_size: int = 64
) -> torch.Tensor:
    """Dense evaluation at scale ``q``: (N, K) posteriors of ``dense_model`` (from `vggdist.dense.to_dense`).

    Each image's score map is spatially averaged, soft-maxed, and averaged with the same for its horizontal
    flip. Images with the same size after rescaling share forward passes; no image is padded (padding would
    change the score map).
    """
    _check_images(images)
    rescaled = [_rescaled(dense_model, image, q) for image in images]  # (3, H_i, W_i), min side q
    order = sorted(range(len(images)), key=lambda i: tuple(rescaled[i].shape))  # equal sizes adjacent
    views = ((i, torch.stack([rescaled[i], rescaled[i].flip(-1)])) for i in order)  # (2, 3, H_i, W_i)
    return _mean_posteriors(dense_model, views, len(images), batch_size)


def multicrop_posteriors(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    q: int,
    crop: int,
    grid: int = 5,
    flip: bool = True,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Multi-crop evaluation at scale ``q``: mean soft-max over ``grid²`` crops (and their flips): (N, K).

    The flipped views are the flips of the grid crops, i.e. the crops of the flipped image at the mirrored
    grid positions (the grid is symmetric up to rounding).
    """
    _check_images(images)

    def views() -> Iterator[tuple[int, torch.Tensor]]:
        for i, image in enumerate(images):
            image = _rescaled(model, image, q)
            boxes = multicrop_boxes(image.shape[-2], image.shape[-1], crop, grid)
            crops = torch.stack(
                [image[:, top : top + crop, left : left + crop] for top, left in boxes]
            )  # (grid², 3, c, c)
            yield i, torch.cat([crops, crops.flip(-1)]) if flip else crops  # (2·grid², 3, c, c)

    return _mean_posteriors(model, views(), len(images), batch_size)


# ---------------------------------------------------------------------------------------------------------
# Combining posteriors


def _average(posteriors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if len(posteriors) == 0:
        raise ValueError(f"{what} needs at least one set of posteriors")
    shapes = {tuple(p.shape) for p in posteriors}
    if len(shapes) != 1:
        raise ValueError(f"{what} needs posteriors of one shape (N, K), got {sorted(shapes)}")
    return torch.stack(list(posteriors)).mean(dim=0)


def multiscale(posteriors_by_scale: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-scale evaluation (Table 4): the average of the posteriors at each test scale Q."""
    return _average(posteriors_by_scale, "multiscale")


def combine(*posteriors: torch.Tensor) -> torch.Tensor:
    """Combination of protocols (Table 5, dense + multi-crop): the average of their posteriors."""
    return _average(posteriors, "combine")


def fuse(posteriors_per_model: Sequence[torch.Tensor]) -> torch.Tensor:
    """ConvNet fusion (Table 6): the average of the posteriors of several networks."""
    return _average(posteriors_per_model, "fuse")


# ---------------------------------------------------------------------------------------------------------
# Counting


def topk_counts(posteriors: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, int]:
    """{"n": N, "top1": hits, "top5": hits} as Python ints: the label is among the k highest posteriors.

    k is clamped to the number of classes (top-5 of a 3-class problem is top-3). Counts add up exactly
    across batches and workers; turn them into percentages with `error_rates`.
    """
    if posteriors.ndim != 2 or labels.shape != posteriors.shape[:1]:
        raise ValueError(
            f"posteriors must be (N, K) and labels (N,), got {tuple(posteriors.shape)} and {tuple(labels.shape)}"
        )
    num_classes = posteriors.shape[1]
    top = posteriors.topk(min(max(ks), num_classes), dim=1).indices  # (N, k_max), best first
    hits = top == labels.to(top.device, torch.long)[:, None]
    counts = {"n": int(posteriors.shape[0])}
    for k in ks:
        counts[f"top{k}"] = int(hits[:, : min(k, num_classes)].any(dim=1).sum())
    return counts


def error_rates(counts: dict[str, int]) -> dict[str, float]:
    """Top-k error in percent from `topk_counts` output: {"top1_err": ..., "top5_err": ...}."""
    n = counts["n"]
    if n <= 0:
        raise ValueError("no images were counted; cannot compute error rates")
    return {f"{key}_err": 100.0 * (n - hits) / n for key, hits in counts.items() if key.startswith("top")}


def add_counts(
    total: dict[str, dict[str, int]], batch: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Sum two `evaluate_batch` results key by key (a new dict; either may lack keys the other has)."""
    out = {key: dict(value) for key, value in total.items()}
    for key, counts in batch.items():
        into = out.setdefault(key, {})
        for name, value in counts.items():
            into[name] = into.get(name, 0) + value
    return out


def scales_key(scales: Sequence[int]) -> str:
    """``"Q256"`` for one scale, ``"Q256-384-512"`` for several (DESIGN.md §5 metric names)."""
    return "Q" + "-".join(str(int(q)) for q in scales)


def evaluate_batch(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    scales: Sequence[int] = (256, 384, 512),
    crop: int = 224,
    dense_model: nn.Module | None = None,
    grid: int = 5,
    batch_size: int = 64,
) -> dict[str, dict[str, int]]:
    """Top-1/top-5 counts of every protocol at every test scale and over all scales, for one batch.

    Keys are ``"<protocol>/<scales>"`` with scales as in `scales_key`: ``"dense/Q256"``, ``"dense/Q384"``,
    …, and, when there are several scales, the multi-scale average ``"dense/Q256-384-512"``; values are
    `topk_counts` dicts ``{"n", "top1", "top5"}``. The metric ``eval/<key>/top1_err`` of DESIGN.md §5 is
    ``error_rates`` of the summed counts. Each posterior is computed once: ``combined`` reuses the dense
    and multi-crop ones. ``dense_model`` defaults to ``to_dense(model)`` (pass it to convert only once).
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(
            f"unknown protocols {unknown or list(protocols)}; choose from {', '.join(PROTOCOLS)}"
        )
    if not scales:
        raise ValueError("evaluate_batch needs at least one test scale Q")
    need_dense = "dense" in protocols or "combined" in protocols
    need_multicrop = "multicrop" in protocols or "combined" in protocols
    if need_dense and dense_model is None:
        dense_model = to_dense(model)

    by_protocol: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    for q in scales:
        computed: dict[str, torch.Tensor] = {}
        if "single" in protocols:
            computed["single"] = single_posteriors(model, images, q, crop, batch_size=batch_size)
        if need_dense:
            computed["dense"] = dense_posteriors(dense_model, images, q, batch_size=batch_size)
        if need_multicrop:
            computed["multicrop"] = multicrop_posteriors(model, images, q, crop, grid, batch_size=batch_size)
        if "combined" in protocols:
            computed["combined"] = combine(computed["dense"], computed["multicrop"])
        for p in protocols:
            by_protocol[p].append(computed[p])

    results: dict[str, dict[str, int]] = {}
    for p in protocols:
        for q, posteriors in zip(scales, by_protocol[p], strict=True):
            results[f"{p}/{scales_key([q])}"] = topk_counts(posteriors, labels)
        if len(scales) > 1:
            results[f"{p}/{scales_key(scales)}"] = topk_counts(multiscale(by_protocol[p]), labels)
    return results
