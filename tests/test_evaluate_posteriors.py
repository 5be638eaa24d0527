"""§3.2 protocols' posteriors against brute force: single crop, multi-crop, dense, ten-crop; views per image,
batching, training mode restored, bad images refused."""

import pytest
import torch

from tests.eval_helpers import (
    CROP,
    SIZES,
    K,
    brute_dense,
    brute_multicrop,
    brute_single,
    brute_tencrop,
    close,
    eval_model,
    sample_keys,
    smooth_images,
)
from vggdist.dense import to_dense
from vggdist.evaluate import (
    EvalNet,
    dense_posteriors,
    evaluate_images,
    multicrop_posteriors,
    single_posteriors,
    tencrop_posteriors,
    topk_hits,
)
from vggdist.models import build_vgg
from vggdist.outcomes import EvalKey
from vggdist.paper import SCALES


@pytest.fixture(scope="module")
def model():
    return eval_model()  # one network for every evaluation test module: built once per session


def test_crop_count_is_50_per_scale_and_150_over_three(model):
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        images = smooth_images((40, 52), (45, 33))
        multicrop_posteriors(model, images, 36, CROP, batch_size=17)
        assert sum(rows) == 2 * 50
        rows.clear()
        net = EvalNet.of(model, CROP)
        evaluate_images(
            [net], images, torch.tensor([0, 1]), ["a", "b"], protocols=["multicrop"], scales=(32, 40, 48)
        )
        assert sum(rows) == 2 * 150
    finally:
        handle.remove()


def test_single_and_multicrop_match_brute_force(model):
    images = smooth_images(*SIZES)
    single = single_posteriors(model, images, 36, CROP, batch_size=3)
    multi = multicrop_posteriors(model, images, 36, CROP, batch_size=7)  # chunks straddle images
    assert single.shape == multi.shape == (len(images), K)
    close(single, torch.stack([brute_single(model, im, 36) for im in images]))
    close(multi, torch.stack([brute_multicrop(model, im, 36) for im in images]))
    close(multi.sum(1), torch.ones(len(images), dtype=torch.float64))
    assert single.max(1).values.min() > 1.5 / K and len(set(single.argmax(1).tolist())) > 1  # not vacuous


def test_dense_matches_brute_force_and_mixed_size_batching(model):
    dense = to_dense(model)
    images = smooth_images(*SIZES)
    together = dense_posteriors(dense, images, 70, batch_size=64)  # maps of 3 sizes, > 1x1
    one_by_one = torch.cat([dense_posteriors(dense, [im], 70) for im in images])
    close(together, one_by_one)
    close(together, torch.stack([brute_dense(dense, im, 70) for im in images]))
    close(dense_posteriors(dense, images, 70, batch_size=1), together)


def test_dense_equals_multicrop_on_a_crop_sized_image(model):
    # At Q = crop on a crop x crop image every one of the 25 crops is the whole image and the score map is
    # 1x1: dense and multi-crop both average softmax(image) and softmax(flipped image).
    images = smooth_images((CROP, CROP), (CROP, CROP), seed=3)
    close(dense_posteriors(to_dense(model), images, CROP), multicrop_posteriors(model, images, CROP, CROP))


def test_evaluation_restores_training_mode():
    net = build_vgg("A", K, **SCALES["mini"]).double().train()
    images = smooth_images((40, 40))
    first = single_posteriors(net, images, 32, CROP)
    assert net.training
    close(single_posteriors(net, images, 32, CROP), first)  # dropout off while evaluating


def test_tencrop_matches_brute_force_with_ten_views_per_image(model):
    images = smooth_images(*SIZES)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        ten = tencrop_posteriors(model, images, 36, CROP, batch_size=7)  # chunks straddle images
    finally:
        handle.remove()
    assert sum(rows) == 10 * len(images) and ten.shape == (len(images), K)
    close(ten, torch.stack([brute_tencrop(model, im, 36) for im in images]))
    labels = torch.tensor([4, 5, 5, 1, 0])
    out = evaluate_images(
        [EvalNet.of(model, CROP)], images, labels, sample_keys(5), protocols=("tencrop",), scales=(36,)
    )
    assert list(out.top1) == [EvalKey("tencrop", (36,))]
    assert out.top1[EvalKey("tencrop", (36,))].tolist() == topk_hits(ten, labels)[1].tolist()
    # not vacuous: the corners move the posteriors away from the centre crop's
    assert not torch.allclose(ten, single_posteriors(model, images, 36, CROP))


def test_bad_images_are_refused(model):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        single_posteriors(model, [torch.rand(1, 40, 40)], 32, CROP)
    with pytest.raises(ValueError, match="Q >= crop"):
        multicrop_posteriors(model, smooth_images((40, 40)), 24, CROP)
