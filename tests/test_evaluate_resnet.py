"""He et al.'s networks under the same protocols: BN in eval mode, results independent of the batch split."""

import pytest
import torch
from torch import nn

from tests.eval_helpers import (
    CROP,
    SIZES,
    K,
    brute_multicrop,
    brute_single,
    brute_tencrop,
    close,
    sample_keys,
    smooth_images,
    softmax_row,
)
from vggdist.dense import to_dense
from vggdist.evaluate import (
    EvalNet,
    center_crop,
    dense_posteriors,
    evaluate_images,
    multicrop_posteriors,
    rescale,
    single_posteriors,
    tencrop_posteriors,
    topk_hits,
)
from vggdist.outcomes import EvalKey


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
        calibration = torch.stack(smooth_images(*[(CROP, CROP)] * 64, seed=99))
        net.eval()
        net.fc.bias -= net(calibration).mean(0)
        net.fc.weight *= 8
        net.fc.bias *= 8
    return net


def _brute_resnet_dense(net, image, q):
    image = rescale(image, q)[None]
    with torch.no_grad():
        return (softmax_row(net(image)) + softmax_row(net(image.flip(-1)))) / 2


def test_protocols_run_on_a_resnet(resnet):
    images = smooth_images(*SIZES[:4])
    labels = torch.tensor([4, 5, 5, 1])
    scales = (32, 40)
    out = evaluate_images([EvalNet.of(resnet, CROP)], images, labels, sample_keys(4), scales=scales)
    protocols = ("single", "dense", "multicrop", "combined")
    assert set(out.top1) == {EvalKey(p, qs) for p in protocols for qs in [(32,), (40,), scales]}
    assert all(c.n == 4 for c in out.counts().values())
    dense = [torch.stack([_brute_resnet_dense(resnet, im, q) for im in images]) for q in scales]
    for q, p in zip(scales, dense, strict=True):
        assert out.top1[EvalKey("dense", (q,))].tolist() == topk_hits(p, labels)[1].tolist()
        assert out.top5[EvalKey("dense", (q,))].tolist() == topk_hits(p, labels)[5].tolist()
        close(dense_posteriors(to_dense(resnet), images, q), p)  # whole images of several sizes
    single = torch.stack([brute_single(resnet, im, 40) for im in images])
    assert out.top1[EvalKey("single", (40,))].tolist() == topk_hits(single, labels)[1].tolist()
    ten = evaluate_images(
        [EvalNet.of(resnet, CROP)], images, labels, sample_keys(4), protocols=("tencrop",), scales=(37,)
    )
    want = torch.stack([brute_tencrop(resnet, im, 37) for im in images])  # He et al.'s Table 2 test
    assert ten.top1[EvalKey("tencrop", (37,))].tolist() == topk_hits(want, labels)[1].tolist()
    multi = torch.stack([brute_multicrop(resnet, im, 40) for im in images])
    assert out.top1[EvalKey("multicrop", (40,))].tolist() == topk_hits(multi, labels)[1].tolist()
    assert len(set(single.argmax(1).tolist())) > 1  # not vacuous


def test_bn_net_evaluation_is_deterministic_and_independent_of_the_batch_split(resnet):
    images = smooth_images(*SIZES[:3])
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
        close(run(images, small), whole)
        close(torch.cat([run(images[:1], 64), run(images[1:], 64)]), whole)  # two workers' shares
    assert not resnet.training and not dense.training
    # not vacuous: with batch statistics (training mode) the same images score differently per split
    import copy

    training = copy.deepcopy(resnet).train()
    x = torch.stack([center_crop(im, CROP) for im in images])
    with torch.no_grad():
        assert not torch.allclose(training(x[:2]), training(x)[:2])
