"""§3.1 initialisation: normal / Glorot schemes and the staged start from net A."""

import json
import math

import pytest
import torch
from torch import nn

from vggdist.init import init_from_shallower, init_weights
from vggdist.models import build_vgg, paper_layer_names
from vggdist.paper import SCALES

MINI = SCALES["mini"]


def _weights(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_normal_init_std_and_zero_biases():
    torch.manual_seed(0)
    model = build_vgg("B", 10, **MINI)
    init_weights(model, "normal", std=0.02)
    big = model.classifier[3].weight  # 256x256 = 65k samples: std within 2%
    assert abs(big.std().item() - 0.02) < 4e-4 and abs(big.mean().item()) < 4e-4
    for m in _weights(model):
        assert torch.count_nonzero(m.bias) == 0


def test_glorot_init_bounds():
    model = build_vgg("A", 10, **MINI, batch_norm=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 3.0)
    init_weights(model, "glorot")
    for m in _weights(model):
        fan_in = m.weight[0].numel()
        fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.abs().max().item()
        assert 0.8 * bound < w <= bound  # uniform fills the interval
        assert torch.count_nonzero(m.bias) == 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_init_arguments_are_checked():
    model = build_vgg("A", 10, **MINI)
    with pytest.raises(ValueError, match="normal, glorot"):
        init_weights(model, "kaiming")
    with pytest.raises(ValueError, match="std"):
        init_weights(model, "normal", std=0.0)


def _rms_per_weight_layer(model, x):
    rms = []
    h = x
    with torch.no_grad():
        for module in [*model.features, nn.Flatten(), *model.classifier]:
            h = module(h)
            if isinstance(module, nn.Conv2d | nn.Linear):
                rms.append(h.pow(2).mean().sqrt().item())
    return rms


def test_variance_reading_blows_up_std_reading_does_not():
    # Paper widths, crop 32 for speed. "10^-2 variance" read literally (std 0.1) multiplies the activation
    # RMS at every layer; std 1e-2 (the default) shrinks it. Output scales as std^11 exactly.
    torch.manual_seed(0)
    model = build_vgg("A", 1000, widths=SCALES["paper"]["widths"], crop_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    init_weights(model, "normal", std=0.1)
    literal = _rms_per_weight_layer(model, x)
    init_weights(model)
    default = _rms_per_weight_layer(model, x)
    assert all(b > 2 * a for a, b in zip(literal[1:], literal[2:], strict=False))  # grows every layer
    assert literal[-1] > 1e4
    assert default[-1] < 1e-3 and all(b < a for a, b in zip(default, default[1:], strict=False))


def _trained_like_a(**kw):
    torch.manual_seed(1)
    shallow = build_vgg("A", 10, **MINI, **kw)
    init_weights(shallow, "glorot")  # distinguishable from the deep net's N(0, 1e-4) weights
    for m in shallow.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-1, 1)
    return shallow


@pytest.mark.parametrize("config", ["A-LRN", "B", "C", "D", "E"])
def test_init_from_shallower_copies_same_role_layers(config):
    shallow = _trained_like_a()
    deep = build_vgg(config, 10, **MINI)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    mapping = init_from_shallower(deep, shallow.state_dict())

    src, dst = paper_layer_names(shallow), paper_layer_names(deep)
    layers = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]
    assert mapping == {src[n]: dst[n] for n in layers}
    assert list(mapping) == [src[n] for n in layers]  # ordered like the network
    json.dumps(mapping)
    after, source = deep.state_dict(), shallow.state_dict()
    copied = set()
    for s, d in mapping.items():
        for suffix in (".weight", ".bias"):
            assert torch.equal(after[d + suffix], source[s + suffix])
            copied.add(d + suffix)
    for key in after.keys() - copied:  # everything else is left as it was
        assert torch.equal(after[key], before[key]), key
    if config == "D":
        assert mapping["features.3"] == "features.5"  # A's conv2_1 -> D's conv2_1 (after conv1_2)
    deep.eval()(torch.randn(1, 3, 32, 32))  # and the result still runs


def test_init_from_shallower_batch_norm_and_ddp_prefix():
    shallow = _trained_like_a(batch_norm=True)
    state = {f"module.{k}": v for k, v in shallow.state_dict().items()}  # as saved from a DDP model
    deep = build_vgg("D", 10, **MINI, batch_norm=True)
    mapping = init_from_shallower(deep, state)
    names = paper_layer_names(deep)
    assert mapping[paper_layer_names(shallow)["conv3_2.bn"]] == names["conv3_2.bn"]
    bn = names["conv3_2.bn"]
    src_bn = paper_layer_names(shallow)["conv3_2.bn"]
    for suffix in (".weight", ".running_mean", ".running_var"):
        assert torch.equal(deep.state_dict()[bn + suffix], shallow.state_dict()[src_bn + suffix])


def test_init_from_shallower_refuses_mismatches():
    deep = build_vgg("D", 10, **MINI)
    untouched = {k: v.clone() for k, v in deep.state_dict().items()}
    other_classes = build_vgg("A", 5, **MINI).state_dict()
    with pytest.raises(ValueError, match=r"fc8.*shape \(5, 256\).*\(10, 256\)"):
        init_from_shallower(deep, other_classes)
    other_width = build_vgg("A", 10, widths=(8, 32, 64, 128, 128), fc_width=256, crop_size=32).state_dict()
    with pytest.raises(ValueError, match="conv1_1"):
        init_from_shallower(deep, other_width)
    with pytest.raises(ValueError, match="not the state dict of net A"):
        init_from_shallower(deep, build_vgg("B", 10, **MINI).state_dict())
    with pytest.raises(ValueError, match="batch_norm=False"):
        init_from_shallower(deep, build_vgg("A", 10, **MINI, batch_norm=True).state_dict())
    for key, value in deep.state_dict().items():  # a refused copy changes nothing
        assert torch.equal(value, untouched[key])


def test_he_init_is_kaiming_fan_out_for_convs_on_any_network():
    # He et al. 2015's scheme (kaiming normal, fan_out, ReLU): a scheme of its own, for VGG too.
    torch.manual_seed(0)
    model = build_vgg("D", 10, widths=SCALES["paper"]["widths"], crop_size=32)
    init_weights(model, "he")
    conv = model.features[-3]  # 512 -> 512, 3x3: fan_out 512 * 9
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = model.classifier[0]
    assert fc.weight.std().item() == pytest.approx(1e-2, rel=0.02)  # the classifier: a small normal start
    # the point of the scheme: the signal keeps its scale through D's 13 convs (N(0, 1e-2) loses 10^7)
    x = torch.randn(2, 3, 32, 32)
    he = _rms_per_weight_layer(model.eval(), x)[:13]
    init_weights(model, "normal")
    normal = _rms_per_weight_layer(model, x)[:13]
    assert min(he) > 0.05 and normal[-1] < 1e-6, (he, normal)
