"""He et al. 2016 networks: Table 1 / §4.2 layouts, shortcut options, counts, torchvision weights, He init."""

import json

import pytest
import torch
import torchvision
from torch import nn

from vggdist.models import count_params, format_table, load_torchvision_state_dict
from vggdist.resnet import (
    BasicBlock,
    ResNet,
    ZeroPadShortcut,
    build_resnet,
    count_macs,
    describe_all,
    layer_table,
)
from vggdist.resnet_paper import CONFIGS, names_of_layout


def _meta(config, num_classes=1000, **kw):
    with torch.device("meta"):
        return ResNet(config, num_classes, **kw)


def _random_bn_stats(model):
    """Non-trivial running statistics and affine BN parameters, so eval-mode BN is really exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize(
    "config, factory, params", [("resnet-18", "resnet18", 11_689_512), ("resnet-34", "resnet34", 21_797_672)]
)
def test_option_b_param_counts_and_keys_equal_torchvision(config, factory, params):
    ours = _meta(config, shortcut="B")
    with torch.device("meta"):
        tv = getattr(torchvision.models, factory)(weights=None)
    assert count_params(ours) == count_params(tv) == params
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in tv.state_dict().items()
    ]


def test_option_a_adds_no_parameters_to_the_plain_net():
    for plain, residual in (("plain-18", "resnet-18"), ("plain-34", "resnet-34"), ("plain-56", "resnet-56")):
        p, r = _meta(plain), _meta(residual, shortcut="A")
        assert list(p.state_dict()) == list(r.state_dict())
        assert count_params(p) == count_params(r)
    # option B adds the three projections (conv 1x1 + BN) of stages 2-4
    b, a = _meta("resnet-18", shortcut="B"), _meta("resnet-18")
    assert count_params(b) - count_params(a) == sum(
        c_in * c_out + 2 * c_out for c_in, c_out in ((64, 128), (128, 256), (256, 512))
    )


def test_depths_and_stage_layout_match_the_paper():
    for config, spec in CONFIGS.items():
        model = _meta(config, 10, shortcut="B")
        # weight layers as the paper counts them: every conv and FC except projection shortcuts
        convs = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and "downsample" not in n
        ]
        assert len(convs) == spec.depth == int(config.split("-")[1]), config
        assert [len(s) for s in model.stages] == list(spec.blocks)
    assert names_of_layout("cifar") == ("plain-20", "plain-56", "resnet-20", "resnet-56")
    # Table 1's output sizes at 224: conv1 112, conv2_x 56, conv3_x 28, conv4_x 14, conv5_x 7
    rows = layer_table("resnet-34")
    assert rows[0] == dict(name="conv7-64/2", output=[64, 112, 112], params=64 * 3 * 49 + 128, macs=118013952)
    assert rows[1]["output"] == [64, 56, 56]
    outs = {r["output"][0]: r["output"][1] for r in rows if r["name"].startswith("conv3")}
    assert outs == {64: 56, 128: 28, 256: 14, 512: 7}
    assert [r["name"] for r in rows if r["name"].startswith("pad")] == ["pad-128/2", "pad-256/2", "pad-512/2"]
    assert sum(r["params"] for r in rows) == count_params(_meta("resnet-34"))
    # §4.2: maps of 32, 16, 8 with 16, 32, 64 filters, no max-pool
    cifar = layer_table("plain-20", 10)
    assert {r["output"][0]: r["output"][1] for r in cifar if r["name"].startswith("conv3")} == {
        16: 32,
        32: 16,
        64: 8,
    }
    assert not any(r["name"].startswith(("maxpool", "pad")) or "+" in r["name"] for r in cifar)


def test_macs_match_table_1_and_torchvision():
    # He et al. Table 1: 1.8 and 3.6 x 10^9 FLOPs (multiply-adds); torchvision lists 1.81 and 3.66 (option B)
    assert round(count_macs(_meta("plain-18")) / 1e9, 1) == 1.8
    assert round(count_macs(_meta("plain-34")) / 1e9, 1) == 3.6
    assert round(count_macs(_meta("resnet-18", shortcut="B")) / 1e9, 2) == 1.81
    assert round(count_macs(_meta("resnet-34", shortcut="B")) / 1e9, 2) == 3.66
    assert count_macs(_meta("resnet-18"), 448) == pytest.approx(4 * count_macs(_meta("resnet-18")), rel=1e-3)


def test_cifar_param_counts_match_table_6():
    # Table 6: 20 layers 0.27M, 56 layers 0.85M (10 classes, option A)
    assert round(count_params(_meta("resnet-20", 10)) / 1e6, 2) == 0.27
    assert round(count_params(_meta("resnet-56", 10)) / 1e6, 2) == 0.85


def test_describe_all_lists_each_scale_as_json_and_table():
    paper = describe_all()
    assert [e["config"] for e in paper] == ["plain-18", "plain-34", "resnet-18", "resnet-34"]
    mini = describe_all(10, scale="mini")
    assert [(e["config"], e["depth"], e["crop_size"]) for e in mini] == [
        ("plain-20", 20, 32),
        ("plain-56", 56, 32),
        ("resnet-20", 20, 32),
        ("resnet-56", 56, 32),
    ]
    assert {e["family"] for e in mini} == {"plain", "resnet"}
    json.dumps(paper + mini)  # what `vggdist models --json` prints
    text = format_table(describe_all(shortcut="B"))
    assert "11,689,512" in text and "21,797,672" in text and "proj1-128/2" in text
    assert "resnet-34 (34 weight layers, shortcut B)" in text


@pytest.mark.parametrize(
    "config, factory",
    [("resnet-18", torchvision.models.resnet18), ("resnet-34", torchvision.models.resnet34)],
)
def test_loads_torchvision_weights_with_identical_outputs(config, factory):
    torch.manual_seed(0)
    reference = _random_bn_stats(factory(weights=None)).eval()
    ours = ResNet(config, shortcut="B").eval()  # no init: every weight comes from torchvision
    load_torchvision_state_dict(ours, {f"module.{k}": v for k, v in reference.state_dict().items()})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_torchvision_mismatch_names_the_shortcut_option():
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="unexpected .*layer2.0.downsample.*shortcut='B'"):
        load_torchvision_state_dict(_meta("resnet-18"), tv.state_dict())
    with pytest.raises(ValueError, match="fc.weight has shape"):
        load_torchvision_state_dict(_meta("resnet-18", 10, shortcut="B"), tv.state_dict())


def test_option_a_shortcut_is_subsampled_identity_with_zero_channels():
    shortcut = ZeroPadShortcut(2, 5, stride=2)
    x = torch.randn(1, 2, 7, 6)
    y = shortcut(x)
    assert y.shape == (1, 5, 4, 3)  # ceil(7/2) x ceil(6/2): the stride-2 conv's output size
    torch.testing.assert_close(y[:, :2], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert not y[:, 2:].any()
    assert sum(p.numel() for p in shortcut.parameters()) == 0
    with pytest.raises(ValueError, match="non-decreasing"):
        ZeroPadShortcut(4, 2, 1)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_zero_init_residual_makes_residual_blocks_identities(shortcut):
    torch.manual_seed(0)
    model = build_resnet("resnet-20", 10, shortcut=shortcut, zero_init_residual=True).eval()
    block = model.layer1[1]
    assert not block.bn2.weight.any()
    x = torch.rand(2, 16, 8, 8)  # non-negative, like the ReLU output that enters a block
    torch.testing.assert_close(block(x), x)
    plain = build_resnet("plain-20", 10, zero_init_residual=True)
    assert all(bool((b.bn2.weight == 1).all()) for s in plain.stages for b in s)  # plain blocks untouched
    assert all(b.downsample is None and not b.residual for s in plain.stages for b in s)
    default = build_resnet("resnet-20", 10)
    assert all(bool((b.bn2.weight == 1).all()) for s in default.stages for b in s)  # the paper: off


def test_residual_block_adds_its_input_and_plain_block_does_not():
    torch.manual_seed(0)
    x = torch.rand(1, 16, 8, 8)
    residual = BasicBlock(16, 16, 1, residual=True, shortcut="A").eval()
    plain = BasicBlock(16, 16, 1, residual=False, shortcut="A").eval()
    plain.load_state_dict(residual.state_dict())
    inner = residual.bn2(residual.conv2(residual.relu(residual.bn1(residual.conv1(x)))))
    torch.testing.assert_close(residual(x), torch.relu(inner + x))
    torch.testing.assert_close(plain(x), torch.relu(inner))


def test_he_init_and_batch_norm_defaults():
    torch.manual_seed(0)
    model = build_resnet("resnet-34", 1000)
    w = model.layer4[1].conv1.weight  # 512 x 512 x 3 x 3: fan_out = 512 * 9
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    stem = model.conv1.weight  # fan_out = 64 * 49
    assert stem.std().item() == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and not model.fc.bias.any()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 33 and all(bool((m.weight == 1).all()) and not m.bias.any() for m in bns)


@pytest.mark.parametrize("config, shortcut", [("resnet-18", "A"), ("plain-18", "A"), ("resnet-20", "B")])
def test_any_image_size_and_finite_start(config, shortcut):
    torch.manual_seed(0)
    model = build_resnet(config, 5, widths=(8, 16, 16, 32)[: len(CONFIGS[config].blocks)], shortcut=shortcut)
    model.eval()
    with torch.no_grad():
        for h, w in ((32, 32), (45, 37), (64, 96)):
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="plain-18, plain-34, resnet-18"):
        build_resnet("resnet-50")
    with pytest.raises(ValueError, match="4 positive stage widths"):
        ResNet("resnet-18", widths=(16, 32, 64))
    with pytest.raises(ValueError, match="'A'.*'B'"):
        ResNet("resnet-18", shortcut="C")
    with pytest.raises(ValueError, match="non-decreasing"):
        ResNet("resnet-20", widths=(32, 16, 64))
    assert ResNet("resnet-20", widths=(32, 16, 64), shortcut="B").widths == (32, 16, 64)
