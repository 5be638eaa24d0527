"""§3.2 / §4 `evaluate_images`, the one evaluation path: every (protocol, scales) setting and its per-image hits,
each posterior computed once, multi-scale averages, network fusion, the multi-crop subset."""

import pytest
import torch

from tests.eval_helpers import (
    CROP,
    SIZES,
    K,
    brute_dense,
    brute_multicrop,
    brute_single,
    close,
    eval_model,
    sample_keys,
    smooth_images,
)
from vggdist.evaluate import (
    EvalNet,
    combine,
    dense_posteriors,
    evaluate_images,
    fuse,
    multiscale,
    topk_hits,
)
from vggdist.models import build_vgg
from vggdist.outcomes import Counts, EvalKey, Outcomes
from vggdist.paper import SCALES


@pytest.fixture(scope="module")
def model():
    return eval_model()  # one network for every evaluation test module: built once per session


def test_averages_and_shape_checks():
    a, b, c = torch.rand(3, 4), torch.rand(3, 4), torch.rand(3, 4)
    close(multiscale([a, b, c]), (a + b + c) / 3)
    close(combine(a, b), (a + b) / 2)
    close(fuse([a, b]), (a + b) / 2)
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


def test_evaluate_images_settings_hits_and_single_computation(model):
    images = smooth_images(*SIZES[:4])
    labels = torch.tensor([4, 5, 5, 1])  # some right, some wrong
    scales = (32, 40, 48)
    net = EvalNet.of(model, CROP)
    fc_rows, dense_rows = [], []
    h1 = model.register_forward_pre_hook(lambda m, args: fc_rows.append(args[0].shape[0]))
    h2 = net.dense.register_forward_pre_hook(lambda m, args: dense_rows.append(args[0].shape[0]))
    try:
        out = evaluate_images([net], images, labels, sample_keys(4), scales=scales)
    finally:
        h1.remove()
        h2.remove()
    n = len(images)
    assert sum(fc_rows) == len(scales) * (n + 50 * n)  # single + multi-crop, each once per scale
    assert sum(dense_rows) == len(scales) * 2 * n  # image + flip, once per scale, shared with combined
    protocols = ("single", "dense", "multicrop", "combined")
    expected = [EvalKey(p, qs) for p in protocols for qs in [(32,), (40,), (48,), scales]]
    assert list(out.top1) == list(out.top5) == expected and out.keys == sample_keys(4)

    post = {
        "single": [torch.stack([brute_single(model, im, q) for im in images]) for q in scales],
        "dense": [torch.stack([brute_dense(net.dense, im, q) for im in images]) for q in scales],
        "multicrop": [torch.stack([brute_multicrop(model, im, q) for im in images]) for q in scales],
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

    one = evaluate_images([net], images[:2], labels[:2], sample_keys(2), protocols=("dense",), scales=(40,))
    assert list(one.top1) == [EvalKey("dense", (40,))]  # a single scale has no multi-scale setting
    rest = evaluate_images(
        [net], images[2:], labels[2:], sample_keys(2, 2), protocols=("dense",), scales=(40,)
    )
    both = Outcomes.concat([one, rest])  # batches concatenate exactly
    assert both.keys == sample_keys(4) and both.counts() == {
        EvalKey("dense", (40,)): counts[EvalKey("dense", (40,))]
    }
    with pytest.raises(ValueError, match="single, tencrop, dense, multicrop, combined"):
        evaluate_images([net], images, labels, sample_keys(4), protocols=("fivecrop",), scales=(40,))


def test_fusion_averages_the_networks_posteriors(model):
    images = smooth_images(*SIZES[:3], seed=5)
    labels = torch.tensor([0, 3, 6])
    torch.manual_seed(1)
    other = build_vgg("A", K, **SCALES["mini"]).double().eval()
    nets = [EvalNet.of(model, CROP), EvalNet.of(other, CROP, normalize=lambda im: im * 2)]
    out = evaluate_images(nets, images, labels, sample_keys(3), protocols=("dense",), scales=(36, 44))
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


def test_multicrop_on_a_stated_subset_scores_the_same_images_for_every_run(model):
    """eval.multicrop_fraction: multi-crop and combined score the key-hash subset only, dense every image; the
    subset rows equal a full evaluation restricted to those images, and another batch split picks the same ones."""
    from vggdist.outcomes import in_subset

    images = smooth_images(*SIZES, (36, 36), seed=7)
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
