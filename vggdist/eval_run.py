"""§4 evaluation of trained runs over the validation shards: one Ray task's share, from checkpoints to outcomes.

Ray-free: `vggdist.ray_eval` runs `evaluate_shard_slice` in N Ray tasks (rank r of N), concatenates their
`Outcomes`, checks that every validation image was scored exactly once, and turns the counts into the table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from vggdist import checkpoint_store, data
from vggdist.augment import DeviceAugment
from vggdist.config import Config
from vggdist.evaluate import EvalNet, evaluate_images
from vggdist.outcomes import Outcomes, eval_keys
from vggdist.train import build_model

log = logging.getLogger(__name__)


def load_eval_net(checkpoint_path: str, device: torch.device | str = "cpu") -> EvalNet:
    """Rebuild the network of a checkpoint for the test protocols; its config (crop) and the dataset statistics
    it was trained with (the input normalisation) travel with it."""
    state = checkpoint_store.load(checkpoint_path)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg, int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.eval().to(device)
    if "stats" not in state:
        raise ValueError(
            f"checkpoint {checkpoint_path} carries no dataset stats; it was not written by `vggdist train`"
        )
    augment = DeviceAugment.from_stats(state["stats"], cfg.data).to(device)

    def normalize(image: torch.Tensor) -> torch.Tensor:  # uint8 (3, H, W) -> float, mean subtracted
        return augment(image[None], train=False)[0]

    return EvalNet.of(model, cfg.data.crop_size, normalize)


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
    multicrop_fraction: float = 1.0,
) -> Outcomes:
    """Rank `rank`'s share of the validation images, scored by the fusion of `checkpoints` (one: no fusion);
    multi-crop and combined on the stated subset `multicrop_fraction` (`vggdist.outcomes.in_subset`)."""
    nets = [load_eval_net(c, device) for c in checkpoints]
    crops = {n.crop for n in nets}
    if len(crops) != 1:
        raise ValueError(f"networks to fuse must share the crop size, got {sorted(crops)}")
    parts = [Outcomes.empty(eval_keys(protocols, scales))]
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    keys: list[str] = []

    def flush() -> None:
        if images:
            parts.append(
                evaluate_images(
                    nets,
                    images,
                    torch.cat(labels),
                    keys,
                    protocols=protocols,
                    scales=scales,
                    multicrop_fraction=multicrop_fraction,
                )
            )
            images.clear()
            labels.clear()
            keys.clear()

    loader = data.eval_loader(val_dir, rank=rank, world_size=world_size)
    for batch_images, batch_labels, batch_keys in loader:
        images.extend(batch_images)
        labels.append(batch_labels)
        keys.extend(batch_keys)
        if len(images) >= images_per_batch:
            flush()
    flush()
    return dataclasses.replace(Outcomes.concat(parts), skipped=list(loader.skipped_keys))
