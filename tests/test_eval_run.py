"""vggdist.eval_run on real shards and a real checkpoint: slices of the validation set scored once each, in
manifest order, the same outcomes however the set is split; fusion needs one crop size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.tiny_data import make_shards
from vggdist import checkpoint as ckpt
from vggdist import data
from vggdist.config import preset
from vggdist.eval_run import evaluate_shard_slice, load_eval_net
from vggdist.outcomes import Outcomes, eval_keys
from vggdist.shardformat import read_stats, split_dir
from vggdist.train import apply_init, build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    root = make_shards(tmp, train_per_class=6, val_per_class=5, samples_per_shard=7)
    cfg = preset("mini", model="A").override(["run.init=glorot"])
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    apply_init(model, cfg)
    stats = read_stats(root / "train")
    ckpt.save(tmp / "ckpt", model=model, config=cfg, stats=stats)
    return root, tmp / "ckpt", cfg, stats


def test_slices_cover_the_validation_set_once_in_manifest_order(setup):
    root, checkpoint, _, _ = setup
    val = str(split_dir(root, "val"))
    kw = {"protocols": ("single", "dense"), "scales": (37, 55), "images_per_batch": 3}
    whole = evaluate_shard_slice([checkpoint], val, rank=0, world_size=1, **kw)
    parts = [evaluate_shard_slice([checkpoint], val, rank=r, world_size=3, **kw) for r in range(3)]
    merged = Outcomes.concat(parts)
    in_order = [k for _, _, keys in data.eval_loader(val, rank=0, world_size=1) for k in keys]
    assert whole.keys == merged.keys == in_order and len(in_order) == data.expected_eval_count(val) == 20
    assert list(whole.top1) == eval_keys(kw["protocols"], kw["scales"])
    for k in whole.top1:
        assert whole.top1[k].tolist() == merged.top1[k].tolist()
        assert whole.top5[k].tolist() == merged.top5[k].tolist()
    empty = evaluate_shard_slice([checkpoint], val, rank=0, world_size=40, **kw)  # more slots than images
    assert empty.keys == [] and list(empty.top1) == list(whole.top1)


def test_the_checkpoint_brings_its_normalisation_and_fusion_needs_one_crop(setup, tmp_path):
    _, checkpoint, cfg, stats = setup
    net = load_eval_net(checkpoint)
    image = torch.full((3, 40, 44), 100, dtype=torch.uint8)
    expected = 100.0 - torch.tensor(stats["mean_rgb"], dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(net.normalize(image), expected.expand(3, 40, 44))
    assert net.crop == 32 and not net.model.training
    other = replace(cfg, data=replace(cfg.data, crop_size=64, train_scale=74))
    ckpt.save(tmp_path / "c64", model=build_model(other, 4), config=other, stats=stats)
    with pytest.raises(ValueError, match="share the crop size"):
        evaluate_shard_slice(
            [checkpoint, tmp_path / "c64"], "unused", rank=0, world_size=1, protocols=("dense",), scales=(74,)
        )
