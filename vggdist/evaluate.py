"""§3.2 testing and §4 evaluation protocols as pure functions over tensors (no data loading, no ray, no mlflow).

An image is a normalised float tensor (3, H, W) of any size. For a test scale Q it is rescaled isotropically
so its smallest side is Q, then scored by one of the protocols (each returns soft-max posteriors (N, K)):

- ``single``: the centre ``crop × crop`` crop (Table 3).
- ``tencrop``: the centre crop and the four corner crops, and their horizontal flips, soft-max averaged: the
  "standard 10-crop testing" of He et al. 2016 §3.4 (Krizhevsky et al. 2012), at the scale Q = 256.
- ``dense``: the fully-convolutional net (`vggdist.dense`) on the whole image; the class score map is
  spatially averaged, and the soft-max of the image and of its horizontal flip are averaged (Tables 3–5).
- ``multicrop``: a regular 5×5 grid of crops and their flips, 50 per scale, soft-max averaged (Table 5).
- ``combined``: the average of dense and multi-crop posteriors (Table 5, "dense + multi-crop").

Several scales are combined by averaging their posteriors (Table 4), several networks likewise (Table 6).
`evaluate_images` runs all of it for a batch, the one path production (`vggdist.eval_run`) and tests share;
it returns each image's top-1 / top-5 hit per (protocol, scales) (`vggdist.outcomes`), which concatenate
exactly over batches and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vggdist.dense import to_dense
from vggdist.eval_geometry import center_crop, multicrop_boxes, rescale, tencrop_boxes
from vggdist.outcomes import EvalKey, Outcomes, eval_keys, subset_mask
from vggdist.runmeta import COMBINED, DENSE, MULTICROP, PROTOCOLS, SINGLE, TENCROP, VGG_PROTOCOLS

logger = logging.getLogger(__name__)

SUBSET_PROTOCOLS = (MULTICROP, COMBINED)  # what `EvalConfig.multicrop_fraction` may restrict to a subset

__all__ = [
    "EvalNet",
    "center_crop",
    "combine",
    "dense_posteriors",
    "evaluate_images",
    "fuse",
    "multicrop_boxes",
    "multicrop_posteriors",
    "multiscale",
    "protocol_posteriors",
    "rescale",
    "single_posteriors",
    "tencrop_boxes",
    "tencrop_posteriors",
    "topk_hits",
]

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


def _crops_posteriors(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    q: int,
    crop: int,
    boxes: Callable[[int, int], list[tuple[int, int]]],
    flip: bool,
    batch_size: int,
) -> torch.Tensor:
    """Mean soft-max over the ``crop`` boxes `boxes(height, width)` of each image rescaled to ``q`` (and their
    horizontal flips): (N, K). The flipped views are the flips of the crops, i.e. the crops of the flipped
    image at the mirrored positions."""
    _check_images(images)

    def views() -> Iterator[tuple[int, torch.Tensor]]:
        for i, image in enumerate(images):
            image = _rescaled(model, image, q)
            crops = torch.stack(
                [image[:, top : top + crop, left : left + crop] for top, left in boxes(*image.shape[-2:])]
            )  # (m, 3, c, c)
            yield i, torch.cat([crops, crops.flip(-1)]) if flip else crops  # (2m, 3, c, c)

    return _mean_posteriors(model, views(), len(images), batch_size)


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
    return _crops_posteriors(
        model, images, q, crop, lambda h, w: multicrop_boxes(h, w, crop, grid), flip, batch_size
    )


def tencrop_posteriors(
    model: nn.Module, images: Sequence[torch.Tensor], q: int, crop: int, *, batch_size: int = 64
) -> torch.Tensor:
    """10-crop evaluation at scale ``q`` (He et al. 2016 §3.4): mean soft-max over the four corner crops and the
    centre crop (`tencrop_boxes`) and their horizontal flips: (N, K)."""
    return _crops_posteriors(model, images, q, crop, lambda h, w: tencrop_boxes(h, w, crop), True, batch_size)


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


def topk_hits(
    posteriors: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, np.ndarray]:
    """{k: bool (N,)}: whether each image's label is among its k highest posteriors.

    k is clamped to the number of classes (top-5 of a 3-class problem is top-3). Per-image hits concatenate
    exactly across batches and workers (`vggdist.outcomes.Outcomes`).
    """
    if posteriors.ndim != 2 or labels.shape != posteriors.shape[:1]:
        raise ValueError(
            f"posteriors must be (N, K) and labels (N,), got {tuple(posteriors.shape)} and {tuple(labels.shape)}"
        )
    num_classes = posteriors.shape[1]
    top = posteriors.topk(min(max(ks), num_classes), dim=1).indices  # (N, k_max), best first
    hits = top == labels.to(top.device, torch.long)[:, None]
    return {k: hits[:, : min(k, num_classes)].any(dim=1).cpu().numpy() for k in ks}


# ---------------------------------------------------------------------------------------------------------
# The evaluation of a batch of images: every protocol at every scale, one network or a fusion of several


@dataclass(frozen=True)
class EvalNet:
    """A network ready for the test protocols: its FC form (single, multi-crop), its dense form (`to_dense`), the
    crop it was trained at, and `normalize`, which turns one stored image into its input (uint8 (3, H, W) →
    normalised float; None when the images are normalised already)."""

    model: nn.Module
    dense: nn.Module
    crop: int
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def of(cls, model: nn.Module, crop: int, normalize: Callable | None = None) -> EvalNet:
        """`model` and its dense form, converted once."""
        return cls(model, to_dense(model), crop, normalize)


def protocol_posteriors(
    net: EvalNet,
    images: Sequence[torch.Tensor],
    protocols: Sequence[str],
    scales: Sequence[int],
    *,
    grid: int = 5,
    batch_size: int = 64,
) -> dict[str, list[torch.Tensor]]:
    """{protocol: [posteriors (N, K) at each Q in `scales`]} of one network. Each posterior is computed once:
    ``combined`` reuses the dense and multi-crop ones."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(
            f"unknown protocols {unknown or list(protocols)}; choose from {', '.join(PROTOCOLS)}"
        )
    x = [net.normalize(image) for image in images] if net.normalize is not None else list(images)
    need_dense = DENSE in protocols or COMBINED in protocols
    need_multicrop = MULTICROP in protocols or COMBINED in protocols
    out: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    for q in scales:
        got: dict[str, torch.Tensor] = {}
        if SINGLE in protocols:
            got[SINGLE] = single_posteriors(net.model, x, q, net.crop, batch_size=batch_size)
        if TENCROP in protocols:
            got[TENCROP] = tencrop_posteriors(net.model, x, q, net.crop, batch_size=batch_size)
        if need_dense:
            got[DENSE] = dense_posteriors(net.dense, x, q, batch_size=batch_size)
        if need_multicrop:
            got[MULTICROP] = multicrop_posteriors(net.model, x, q, net.crop, grid, batch_size=batch_size)
        if COMBINED in protocols:
            got[COMBINED] = combine(got[DENSE], got[MULTICROP])
        for p in protocols:
            out[p].append(got[p])
    return out


def evaluate_images(
    nets: Sequence[EvalNet],
    images: Sequence[torch.Tensor],
    labels: torch.Tensor,
    sample_keys: Sequence[str],
    *,
    protocols: Sequence[str] = VGG_PROTOCOLS,
    scales: Sequence[int],
    grid: int = 5,
    batch_size: int = 64,
    multicrop_fraction: float = 1.0,
) -> Outcomes:
    """Score a batch of images under every protocol at every test scale and over all scales (`eval_keys`).

    With several `nets` their posteriors are averaged first (ConvNet fusion, Table 6). Multi-crop and combined
    score only the images `in_subset(key, multicrop_fraction)` (all of them at 1.0); the others every image.
    Returns each image's top-1 / top-5 hit per setting, keyed by `sample_keys` (with the scored mask of the
    subset settings); `Outcomes.counts()` gives the error rates.
    """
    if not nets:
        raise ValueError("evaluate_images needs at least one network")
    if not len(images) == len(labels) == len(sample_keys):
        raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(sample_keys)} keys")
    eval_keys(protocols, scales)  # checks both
    qs = tuple(int(q) for q in scales)
    costly = [p for p in protocols if p in SUBSET_PROTOCOLS] if multicrop_fraction < 1.0 else []
    mask = subset_mask(sample_keys, multicrop_fraction) if costly else np.ones(len(images), dtype=bool)
    top1, top5, scored = {}, {}, {}
    everything = np.ones(len(images), dtype=bool)
    for group, chosen, on_subset in (
        ([p for p in protocols if p not in costly], everything, False),
        (costly, mask, True),
    ):
        if not group:
            continue
        if not chosen.any():  # no image of this batch is in the subset
            for key in eval_keys(group, qs):
                top1[key], top5[key], scored[key] = (np.zeros(len(images), dtype=bool) for _ in range(3))
            continue
        idx = np.flatnonzero(chosen)
        sub = [images[i] for i in idx]
        per_net = [protocol_posteriors(n, sub, group, qs, grid=grid, batch_size=batch_size) for n in nets]
        for p in group:
            fused = [fuse([post[p][i] for post in per_net]) for i in range(len(qs))]  # one (N, K) per Q
            posteriors = {EvalKey(p, (q,)): f for q, f in zip(qs, fused, strict=True)}
            if len(qs) > 1:
                posteriors[EvalKey(p, qs)] = multiscale(fused)  # Table 4: the average over the scales
            for key, post in posteriors.items():
                hits = topk_hits(post, labels[torch.as_tensor(idx)])
                top1[key], top5[key] = np.zeros(len(images), dtype=bool), np.zeros(len(images), dtype=bool)
                top1[key][idx], top5[key][idx] = hits[1], hits[5]
                if on_subset:
                    scored[key] = chosen.copy()
    order = eval_keys(protocols, qs)
    return Outcomes(list(sample_keys), {k: top1[k] for k in order}, {k: top5[k] for k in order}, scored)
