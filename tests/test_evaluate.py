"""§3.2 / §4 evaluation protocols: geometry, posteriors against brute force, per-image hits, batching, fusion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggdist.dense import to_dense
from vggdist.evaluate import (
    EvalNet,
    center_crop,
    combine,
    dense_posteriors,
    evaluate_images,
    fuse,
    multicrop_boxes,
    multicrop_posteriors,
    multiscale,
    rescale,
    single_posteriors,
    tencrop_boxes,
    tencrop_posteriors,
    topk_hits,
)
from vggdist.models import build_vgg
from vggdist.outcomes import Counts, EvalKey, Outcomes
from vggdist.paper import SCALES

CROP = 32
K = 8


@pytest.fixture(scope="module")
def model():
    # A random network whose posteriors differ from image to image (a N(0, 1e-4) or Glorot init gives
    # near-uniform, image-independent posteriors and would make the comparisons below vacuous).
    torch.manual_seed(0)
    net = build_vgg("A", K, **SCALES["mini"]).double().eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with torch.no_grad():
        fc8 = net.classifier[6]
        calibration = torch.stack(_images(*[(CROP, CROP)] * 64, seed=99))
        fc8.bias -= net(calibration).mean(0)  # remove the part common to all images
        fc8.weight *= 4
        fc8.bias *= 4
    return net


def _images(*sizes, seed=1):
    # Smooth random images (noise upsampled 4x), so rescaling barely changes their statistics.
    g = torch.Generator().manual_seed(seed)
    return [
        F.interpolate(
            torch.randn(1, 3, h // 4 + 1, w // 4 + 1, generator=g, dtype=torch.float64),
            size=(h, w),
            mode="bilinear",
        )[0]
        for h, w in sizes
    ]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --- geometry -----------------------------------------------------------------------------------------------


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


def test_crop_count_is_50_per_scale_and_150_over_three(model):
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        images = _images((40, 52), (45, 33))
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


# --- posteriors against brute force ---------------------------------------------------------------------------


def _softmax(logits):
    return logits.softmax(dim=1)[0]


def _brute_single(model, image, q):
    with torch.no_grad():
        return _softmax(model(center_crop(rescale(image, q), CROP)[None]))


def _brute_multicrop(model, image, q):
    image = rescale(image, q)
    crops = [
        image[:, top : top + CROP, left : left + CROP]
        for top, left in multicrop_boxes(image.shape[1], image.shape[2], CROP)
    ]
    views = torch.stack(crops + [crop.flip(-1) for crop in crops])  # (50, 3, CROP, CROP)
    with torch.no_grad():
        return model(views).softmax(dim=1).mean(0)


def _brute_dense(dense, image, q):
    image = rescale(image, q)[None]
    with torch.no_grad():
        return (_softmax(dense(image).mean((2, 3))) + _softmax(dense(image.flip(-1)).mean((2, 3)))) / 2


SIZES = [(40, 52), (60, 33), (40, 52), (33, 33), (52, 40)]


def test_single_and_multicrop_match_brute_force(model):
    images = _images(*SIZES)
    single = single_posteriors(model, images, 36, CROP, batch_size=3)
    multi = multicrop_posteriors(model, images, 36, CROP, batch_size=7)  # chunks straddle images
    assert single.shape == multi.shape == (len(images), K)
    _close(single, torch.stack([_brute_single(model, im, 36) for im in images]))
    _close(multi, torch.stack([_brute_multicrop(model, im, 36) for im in images]))
    _close(multi.sum(1), torch.ones(len(images), dtype=torch.float64))
    assert single.max(1).values.min() > 1.5 / K and len(set(single.argmax(1).tolist())) > 1  # not vacuous


def test_dense_matches_brute_force_and_mixed_size_batching(model):
    dense = to_dense(model)
    images = _images(*SIZES)
    together = dense_posteriors(dense, images, 70, batch_size=64)  # maps of 3 sizes, > 1x1
    one_by_one = torch.cat([dense_posteriors(dense, [im], 70) for im in images])
    _close(together, one_by_one)
    _close(together, torch.stack([_brute_dense(dense, im, 70) for im in images]))
    _close(dense_posteriors(dense, images, 70, batch_size=1), together)


def test_dense_equals_multicrop_on_a_crop_sized_image(model):
    # At Q = crop on a crop x crop image every one of the 25 crops is the whole image and the score map is
    # 1x1: dense and multi-crop both average softmax(image) and softmax(flipped image).
    images = _images((CROP, CROP), (CROP, CROP), seed=3)
    _close(dense_posteriors(to_dense(model), images, CROP), multicrop_posteriors(model, images, CROP, CROP))


def test_evaluation_restores_training_mode():
    net = build_vgg("A", K, **SCALES["mini"]).double().train()
    images = _images((40, 40))
    first = single_posteriors(net, images, 32, CROP)
    assert net.training
    _close(single_posteriors(net, images, 32, CROP), first)  # dropout off while evaluating


# --- combining and counting -----------------------------------------------------------------------------------


def test_averages_and_shape_checks():
    a, b, c = torch.rand(3, 4), torch.rand(3, 4), torch.rand(3, 4)
    _close(multiscale([a, b, c]), (a + b + c) / 3)
    _close(combine(a, b), (a + b) / 2)
    _close(fuse([a, b]), (a + b) / 2)
    with pytest.raises(ValueError, match="one shape"):
        fuse([a, torch.rand(3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        multiscale([])


def test_topk_hits_against_brute_force():
    g = torch.Generator().manual_seed(0)
    posteriors = torch.rand(200, 10, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    ranks = [
        sorted(p, reverse=True).index(p[y]) for p, y in zip(posteriors.tolist(), labels.tolist(), strict=True)
    ]
    hits = topk_hits(posteriors, labels)
    assert hits[1].dtype == bool and hits[1].tolist() == [r < 1 for r in ranks]
    assert hits[5].tolist() == [r < 5 for r in ranks]
    assert 0 < hits[1].sum() < hits[5].sum() < 200
    clamped = topk_hits(posteriors[:, :3], labels.clamp(max=2))
    assert clamped[5].all()  # k clamped to 3 classes
    assert Counts(8, 6, 8).top1_err == 25.0 and Counts(8, 6, 8).top5_err == 0.0
    with pytest.raises(ValueError, match="no images"):
        _ = Counts(0, 0, 0).top1_err


def _keys(n, start=0):
    return [f"k{i:03d}" for i in range(start, start + n)]


def _brute_tencrop(model, image, q):
    image = rescale(image, q)
    crops = [image[:, t : t + CROP, x : x + CROP] for t, x in tencrop_boxes(*image.shape[1:], CROP)]
    views = torch.stack(crops + [crop.flip(-1) for crop in crops])  # (10, 3, CROP, CROP)
    with torch.no_grad():
        return model(views).softmax(dim=1).mean(0)


def test_tencrop_matches_brute_force_with_ten_views_per_image(model):
    images = _images(*SIZES)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        ten = tencrop_posteriors(model, images, 36, CROP, batch_size=7)  # chunks straddle images
    finally:
        handle.remove()
    assert sum(rows) == 10 * len(images) and ten.shape == (len(images), K)
    _close(ten, torch.stack([_brute_tencrop(model, im, 36) for im in images]))
    labels = torch.tensor([4, 5, 5, 1, 0])
    out = evaluate_images(
        [EvalNet.of(model, CROP)], images, labels, _keys(5), protocols=("tencrop",), scales=(36,)
    )
    assert list(out.top1) == [EvalKey("tencrop", (36,))]
    assert out.top1[EvalKey("tencrop", (36,))].tolist() == topk_hits(ten, labels)[1].tolist()
    # not vacuous: the corners move the posteriors away from the centre crop's
    assert not torch.allclose(ten, single_posteriors(model, images, 36, CROP))


def test_evaluate_images_settings_hits_and_single_computation(model):
    images = _images(*SIZES[:4])
    labels = torch.tensor([4, 5, 5, 1])  # some right, some wrong
    scales = (32, 40, 48)
    net = EvalNet.of(model, CROP)
    fc_rows, dense_rows = [], []
    h1 = model.register_forward_pre_hook(lambda m, args: fc_rows.append(args[0].shape[0]))
    h2 = net.dense.register_forward_pre_hook(lambda m, args: dense_rows.append(args[0].shape[0]))
    try:
        out = evaluate_images([net], images, labels, _keys(4), scales=scales)
    finally:
        h1.remove()
        h2.remove()
    n = len(images)
    assert sum(fc_rows) == len(scales) * (n + 50 * n)  # single + multi-crop, each once per scale
    assert sum(dense_rows) == len(scales) * 2 * n  # image + flip, once per scale, shared with combined
    protocols = ("single", "dense", "multicrop", "combined")
    expected = [EvalKey(p, qs) for p in protocols for qs in [(32,), (40,), (48,), scales]]
    assert list(out.top1) == list(out.top5) == expected and out.keys == _keys(4)

    post = {
        "single": [torch.stack([_brute_single(model, im, q) for im in images]) for q in scales],
        "dense": [torch.stack([_brute_dense(net.dense, im, q) for im in images]) for q in scales],
        "multicrop": [torch.stack([_brute_multicrop(model, im, q) for im in images]) for q in scales],
    }
    post["combined"] = [(d + m) / 2 for d, m in zip(post["dense"], post["multicrop"], strict=True)]
    for protocol, per_scale in post.items():
        for q, p in zip(scales, per_scale, strict=True):
            want = topk_hits(p, labels)
            assert out.top1[EvalKey(protocol, (q,))].tolist() == want[1].tolist()
            assert out.top5[EvalKey(protocol, (q,))].tolist() == want[5].tolist()
        want = topk_hits(sum(per_scale) / 3, labels)
        assert out.top1[EvalKey(protocol, scales)].tolist() == want[1].tolist()
    counts = out.counts()
    assert all(c.n == n for c in counts.values())
    assert any(0 < c.top1 < n for c in counts.values())  # not trivially 0 or n

    one = evaluate_images([net], images[:2], labels[:2], _keys(2), protocols=("dense",), scales=(40,))
    assert list(one.top1) == [EvalKey("dense", (40,))]  # a single scale has no multi-scale setting
    rest = evaluate_images([net], images[2:], labels[2:], _keys(2, 2), protocols=("dense",), scales=(40,))
    both = Outcomes.concat([one, rest])  # batches concatenate exactly
    assert both.keys == _keys(4) and both.counts() == {
        EvalKey("dense", (40,)): counts[EvalKey("dense", (40,))]
    }
    with pytest.raises(ValueError, match="single, tencrop, dense, multicrop, combined"):
        evaluate_images([net], images, labels, _keys(4), protocols=("fivecrop",), scales=(40,))


def test_fusion_averages_the_networks_posteriors(model):
    images = _images(*SIZES[:3], seed=5)
    labels = torch.tensor([0, 3, 6])
    torch.manual_seed(1)
    other = build_vgg("A", K, **SCALES["mini"]).double().eval()
    nets = [EvalNet.of(model, CROP), EvalNet.of(other, CROP, normalize=lambda im: im * 2)]
    out = evaluate_images(nets, images, labels, _keys(3), protocols=("dense",), scales=(36, 44))
    fused = [
        fuse(
            [
                dense_posteriors(nets[0].dense, images, q),
                dense_posteriors(nets[1].dense, [im * 2 for im in images], q),
            ]
        )
        for q in (36, 44)
    ]
    assert out.top5[EvalKey("dense", (44,))].tolist() == topk_hits(fused[1], labels)[5].tolist()
    assert out.top1[EvalKey("dense", (36, 44))].tolist() == topk_hits(multiscale(fused), labels)[1].tolist()


def test_bad_images_are_refused(model):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        single_posteriors(model, [torch.rand(1, 40, 40)], 32, CROP)
    with pytest.raises(ValueError, match="Q >= crop"):
        multicrop_posteriors(model, _images((40, 40)), 24, CROP)


# --- He et al.'s networks: the same protocols, BN in eval mode ------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    from vggdist.resnet import build_resnet

    torch.manual_seed(0)
    net = build_resnet("resnet-20", K, widths=(8, 16, 16)).double()
    for m in net.modules():  # running statistics far from (0, 1): eval-mode BN must really use them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.bias.data.uniform_(-0.3, 0.3)
    with torch.no_grad():  # image-dependent posteriors, as for the VGG fixture
        calibration = torch.stack(_images(*[(CROP, CROP)] * 64, seed=99))
        net.eval()
        net.fc.bias -= net(calibration).mean(0)
        net.fc.weight *= 8
        net.fc.bias *= 8
    return net


def _brute_resnet_dense(net, image, q):
    image = rescale(image, q)[None]
    with torch.no_grad():
        return (_softmax(net(image)) + _softmax(net(image.flip(-1)))) / 2


def test_protocols_run_on_a_resnet(resnet):
    images = _images(*SIZES[:4])
    labels = torch.tensor([4, 5, 5, 1])
    scales = (32, 40)
    out = evaluate_images([EvalNet.of(resnet, CROP)], images, labels, _keys(4), scales=scales)
    protocols = ("single", "dense", "multicrop", "combined")
    assert set(out.top1) == {EvalKey(p, qs) for p in protocols for qs in [(32,), (40,), scales]}
    assert all(c.n == 4 for c in out.counts().values())
    dense = [torch.stack([_brute_resnet_dense(resnet, im, q) for im in images]) for q in scales]
    for q, p in zip(scales, dense, strict=True):
        assert out.top1[EvalKey("dense", (q,))].tolist() == topk_hits(p, labels)[1].tolist()
        assert out.top5[EvalKey("dense", (q,))].tolist() == topk_hits(p, labels)[5].tolist()
        _close(dense_posteriors(to_dense(resnet), images, q), p)  # whole images of several sizes
    single = torch.stack([_brute_single(resnet, im, 40) for im in images])
    assert out.top1[EvalKey("single", (40,))].tolist() == topk_hits(single, labels)[1].tolist()
    ten = evaluate_images(
        [EvalNet.of(resnet, CROP)], images, labels, _keys(4), protocols=("tencrop",), scales=(37,)
    )
    want = torch.stack([_brute_tencrop(resnet, im, 37) for im in images])  # He et al.'s Table 2 test
    assert ten.top1[EvalKey("tencrop", (37,))].tolist() == topk_hits(want, labels)[1].tolist()
    multi = torch.stack([_brute_multicrop(resnet, im, 40) for im in images])
    assert out.top1[EvalKey("multicrop", (40,))].tolist() == topk_hits(multi, labels)[1].tolist()
    assert len(set(single.argmax(1).tolist())) > 1  # not vacuous


def test_bn_net_evaluation_is_deterministic_and_independent_of_the_batch_split(resnet):
    images = _images(*SIZES[:3])
    dense = to_dense(resnet)
    protocols = {  # name: (posteriors of some images at a batch size, a small batch size that splits views)
        "single": (lambda ims, b: single_posteriors(resnet, ims, 40, CROP, batch_size=b), 1),
        "dense": (lambda ims, b: dense_posteriors(dense, ims, 40, batch_size=b), 1),
        "multicrop": (lambda ims, b: multicrop_posteriors(resnet, ims, 40, CROP, batch_size=b), 7),
        "tencrop": (lambda ims, b: tencrop_posteriors(resnet, ims, 40, CROP, batch_size=b), 3),
    }
    for name, (run, small) in protocols.items():
        whole = run(images, 64)
        assert torch.equal(run(images, 64), whole), name  # deterministic
        _close(run(images, small), whole)
        _close(torch.cat([run(images[:1], 64), run(images[1:], 64)]), whole)  # two workers' shares
    assert not resnet.training and not dense.training
    # not vacuous: with batch statistics (training mode) the same images score differently per split
    import copy

    training = copy.deepcopy(resnet).train()
    x = torch.stack([center_crop(im, CROP) for im in images])
    with torch.no_grad():
        assert not torch.allclose(training(x[:2]), training(x)[:2])


def test_multicrop_on_a_stated_subset_scores_the_same_images_for_every_run(model):
    """eval.multicrop_fraction: multi-crop and combined score the key-hash subset only, dense every image; the
    subset rows equal a full evaluation restricted to those images, and another batch split picks the same ones."""
    from vggdist.outcomes import in_subset

    images = _images(*SIZES, (36, 36), seed=7)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    keys = [f"fmnist/{i:05d}" for i in range(6)]
    chosen = [in_subset(k, 0.5) for k in keys]
    assert 0 < sum(chosen) < 6  # the fixture keys make a proper subset
    net = EvalNet.of(model, CROP)
    full = evaluate_images([net], images, labels, keys, scales=(36, 44))
    part = evaluate_images([net], images, labels, keys, scales=(36, 44), multicrop_fraction=0.5)
    assert list(part.top1) == list(full.top1)  # the same settings, in the same order
    for k in full.top1:
        if k.protocol in ("multicrop", "combined"):
            assert part.scored[k].tolist() == chosen
            assert part.top1[k][chosen].tolist() == full.top1[k][chosen].tolist()
            assert not part.top1[k][~torch.tensor(chosen).numpy()].any()
            assert part.counts()[k].n == sum(chosen)
        else:
            assert k not in part.scored and part.top1[k].tolist() == full.top1[k].tolist()
            assert part.counts()[k] == full.counts()[k]
    split = Outcomes.concat(
        [
            evaluate_images([net], images[:1], labels[:1], keys[:1], scales=(36, 44), multicrop_fraction=0.5),
            evaluate_images([net], images[1:], labels[1:], keys[1:], scales=(36, 44), multicrop_fraction=0.5),
        ]
    )
    assert split.counts() == part.counts()
    assert all(split.scored[k].tolist() == part.scored[k].tolist() for k in part.scored)
    assert abs(sum(in_subset(f"k{i}", 0.25) for i in range(4000)) / 4000 - 0.25) < 0.03
