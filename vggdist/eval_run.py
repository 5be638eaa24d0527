"""§4 evaluation of trained runs over the validation shards: one worker's share, exact counts, fusion (Table 6).

Ray-free: `vggdist.ray_train.evaluate` runs `evaluate_shard_slice` in N Ray tasks (rank r of N), sums the counts,
checks that every validation image was counted exactly once, and turns the counts into the results table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vggdist import checkpoint as ckpt
from vggdist import data
from vggdist.config import Config
from vggdist.dense import to_dense
from vggdist.evaluate import (
    add_counts,
    combine,
    dense_posteriors,
    fuse,
    multicrop_posteriors,
    multiscale,
    scales_key,
    single_posteriors,
    topk_counts,
)
from vggdist.runmeta import PROTOCOLS
from vggdist.train import build_model
from vggdist.transforms import DeviceAugment

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    """A trained network ready for the test protocols: FC and dense forms, its config and input normalisation."""

    model: nn.Module
    dense: nn.Module
    config: Config
    augment: DeviceAugment

    @property
    def crop(self) -> int:
        return self.config.data.crop_size


def load_eval_model(checkpoint_path: str, device: torch.device | str = "cpu") -> EvalModel:
    """Rebuild the network of a checkpoint (its config and dataset statistics travel with it)."""
    state = ckpt.load(checkpoint_path)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg, int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.eval().to(device)
    if "stats" not in state:
        raise ValueError(
            f"checkpoint {checkpoint_path} carries no dataset stats; it was not written by `vggdist train`"
        )
    augment = DeviceAugment.from_stats(state["stats"], cfg.data).to(device)
    return EvalModel(model, to_dense(model).eval().to(device), cfg, augment)


def _posteriors(
    m: EvalModel, images: list[torch.Tensor], protocols: Sequence[str], scales: Sequence[int]
) -> dict[str, list[torch.Tensor]]:
    """{protocol: [posteriors (N, K) at each Q]} for one network; combined reuses dense and multi-crop."""
    x = [m.augment(img[None], train=False)[0] for img in images]  # normalised float (3, H, W)
    out: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    for q in scales:
        got: dict[str, torch.Tensor] = {}
        if "single" in protocols:
            got["single"] = single_posteriors(m.model, x, q, m.crop)
        if "dense" in protocols or "combined" in protocols:
            got["dense"] = dense_posteriors(m.dense, x, q)
        if "multicrop" in protocols or "combined" in protocols:
            got["multicrop"] = multicrop_posteriors(m.model, x, q, m.crop)
        if "combined" in protocols:
            got["combined"] = combine(got["dense"], got["multicrop"])
        for p in protocols:
            out[p].append(got[p])
    return out


def batch_counts(
    models: Sequence[EvalModel],
    images: list[torch.Tensor],
    labels: torch.Tensor,
    protocols: Sequence[str],
    scales: Sequence[int],
) -> dict[str, dict[str, int]]:
    """Counts for every protocol at each Q and over all Q, for the fusion (posterior average) of `models`."""
    per_model = [_posteriors(m, images, protocols, scales) for m in models]
    out: dict[str, dict[str, int]] = {}
    for p in protocols:
        fused = [fuse([pm[p][i] for pm in per_model]) for i in range(len(scales))]  # one (N, K) per Q
        for q, post in zip(scales, fused, strict=True):
            out[f"{p}/{scales_key([q])}"] = topk_counts(post, labels)
        if len(scales) > 1:
            out[f"{p}/{scales_key(scales)}"] = topk_counts(multiscale(fused), labels)
    return out


def evaluate_shard_slice(
    checkpoints: Sequence[str],
    val_dir: str,
    *,
    rank: int,
    world_size: int,
    protocols: Sequence[str],
    scales: Sequence[int],
    images_per_batch: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Rank `rank`'s share of the validation images: {"counts": {key: {n, top1, top5}}, "images": n}."""
    models = [load_eval_model(c, device) for c in checkpoints]
    crops = {m.crop for m in models}
    if len(crops) != 1:
        raise ValueError(f"networks to fuse must share the crop size, got {sorted(crops)}")
    total: dict[str, dict[str, int]] = {}
    seen = 0
    buf_images: list[torch.Tensor] = []
    buf_labels: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total
        if buf_images:
            total = add_counts(
                total, batch_counts(models, buf_images, torch.cat(buf_labels), protocols, scales)
            )
            buf_images.clear()
            buf_labels.clear()

    for images, labels, _keys in data.eval_loader(val_dir, rank=rank, world_size=world_size):
        buf_images.extend(images)
        buf_labels.append(labels)
        seen += len(images)
        if len(buf_images) >= images_per_batch:
            flush()
    flush()
    return {"counts": total, "images": seen}


def results_rows(
    counts: dict[str, dict[str, int]], scales: Sequence[int], paper_scales: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The results table: one row per protocol and scale set, errors in %, with the paper-unit scales alongside."""
    paper = list(paper_scales) if paper_scales else list(scales)
    to_paper = dict(zip(scales, paper, strict=True))
    rows = []
    order = {p: i for i, p in enumerate(PROTOCOLS)}

    def sort_key(item):
        protocol, qs = item[0].split("/")
        return order.get(protocol, 9), qs.count("-") > 0, [int(q) for q in qs[1:].split("-")]

    for key, c in sorted(counts.items(), key=sort_key):
        protocol, qs = key.split("/")
        qlist = [int(q) for q in qs[1:].split("-")]
        n = c["n"]
        rows.append(
            {
                "protocol": protocol,
                "scales": qlist,
                "paper_scales": [to_paper[q] for q in qlist],
                "top1_err": round(100.0 * (n - c["top1"]) / n, 4),
                "top5_err": round(100.0 * (n - c["top5"]) / n, 4),
                "n": n,
            }
        )
    return rows
