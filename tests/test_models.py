"""Table 1 configurations, Table 2 parameter counts, torchvision weight compatibility."""

import json

import pytest
import torch
import torchvision
from torch import nn

from vggdist.models import (
    CONFIGS,
    VGG,
    build_vgg,
    count_macs,
    count_params,
    describe_all,
    format_table,
    layer_table,
    load_torchvision_state_dict,
    paper_layer_names,
    strip_wrapper_prefixes,
    unwrap_model,
)
from vggdist.paper import SCALES, WEIGHT_LAYERS

MINI = SCALES["mini"]


def _meta(config, num_classes=1000, **kw):
    with torch.device("meta"):
        return build_vgg(config, num_classes, **kw)


@pytest.mark.parametrize(
    "config, millions", [("A", 133), ("A-LRN", 133), ("B", 133), ("C", 134), ("D", 138), ("E", 144)]
)
def test_param_counts_round_to_table_2(config, millions):
    model = _meta(config)  # shapes only: no memory, no forward pass
    assert round(count_params(model) / 1e6) == millions
    entry = next(e for e in describe_all() if e["config"] == config)
    assert entry["params"] == count_params(model)


def test_layer_structure_matches_table_1():
    # Weight layers per column, 3x3 / 1x1 kernels, pools, LRN place (paper Table 1).
    expected = {
        "A": ["conv3-64", "maxpool", "conv3-128", "maxpool", "conv3-256", "conv3-256", "maxpool"]
        + ["conv3-512", "conv3-512", "maxpool"] * 2,
        "A-LRN": ["conv3-64", "LRN", "maxpool", "conv3-128", "maxpool", "conv3-256", "conv3-256", "maxpool"]
        + ["conv3-512", "conv3-512", "maxpool"] * 2,
        "C": ["conv3-64", "conv3-64", "maxpool", "conv3-128", "conv3-128", "maxpool"]
        + ["conv3-256", "conv3-256", "conv1-256", "maxpool"]
        + ["conv3-512", "conv3-512", "conv1-512", "maxpool"] * 2,
        "E": ["conv3-64"] * 2
        + ["maxpool"]
        + ["conv3-128"] * 2
        + ["maxpool"]
        + ["conv3-256"] * 4
        + ["maxpool"]
        + (["conv3-512"] * 4 + ["maxpool"]) * 2,
    }
    head = ["FC-4096", "FC-4096", "FC-1000", "soft-max"]
    for config, convs in expected.items():
        names = [row["name"] for row in layer_table(config)]
        assert names == convs + head, config
    depths = {e["config"]: e["depth"] for e in describe_all()}
    assert depths == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
    for config in CONFIGS:  # depth = number of weight layers actually built
        model = _meta(config)
        n = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
        assert n == depths[config]


def test_layer_table_shapes_and_macs():
    rows = layer_table("D")
    assert rows[0] == dict(name="conv3-64", output=[64, 224, 224], params=1792, macs=64 * 224 * 224 * 27)
    pools = [r["output"] for r in rows if r["name"] == "maxpool"]
    assert pools[-1] == [512, 7, 7]
    assert rows[-4] == dict(name="FC-4096", output=[4096], params=25088 * 4096 + 4096, macs=25088 * 4096)
    # VGG-16 is the well-known ~15.5 GMACs at 224.
    assert round(sum(r["macs"] for r in rows) / 1e9, 1) == 15.5
    assert count_macs(_meta("D")) == sum(r["macs"] for r in rows)
    # mini: same layers at the reduced widths, last map 1x1 at crop 32.
    mini = layer_table("D", 10, **MINI)
    assert [r["output"] for r in mini if r["name"] == "maxpool"][-1] == [128, 1, 1]
    assert mini[-2]["output"] == [10]


def test_describe_all_is_json_and_formats():
    entries = describe_all(10, **MINI)
    assert [e["config"] for e in entries] == list(CONFIGS)
    json.dumps(entries)  # what `vggdist models --json` prints
    text = format_table(describe_all())
    assert "conv1-512" in text and "LRN" in text
    assert "138,357,544" in text  # D's exact count


def test_mini_forward_shapes_and_attributes():
    model = build_vgg("C", 7, **MINI, batch_norm=True).eval()
    assert (model.config, model.crop_size, model.num_classes, model.batch_norm) == ("C", 32, 7, True)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    with pytest.raises(ValueError, match="to_dense"):
        model(torch.randn(1, 3, 64, 64))


def test_scaled_widths_per_block():
    model = _meta("E", 10, widths=(8, 16, 24, 40, 48), fc_width=32, crop_size=64)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [8, 8, 16, 16] + [24] * 4 + [40] * 4 + [48] * 4
    assert model.classifier[0].in_features == 48 * 2 * 2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="A, A-LRN, B, C, D, E"):
        build_vgg("F")
    with pytest.raises(ValueError, match="multiple of 32"):
        _meta("A", crop_size=100)
    with pytest.raises(ValueError, match="5 values"):
        _meta("A", widths=(8, 16))


def test_lrn_is_alexnet_formula():
    # Krizhevsky et al.: b_c = a_c / (2 + 1e-4 * sum_{|c'-c|<=2} a_c'^2) ** 0.75
    model = build_vgg("A-LRN", 10, **MINI)
    lrn = model.features[2]
    assert isinstance(model.features[1], nn.ReLU) and isinstance(lrn, nn.LocalResponseNorm)
    a = torch.rand(1, 16, 3, 3, dtype=torch.float64) * 30
    sq = a**2
    expected = torch.empty_like(a)
    for c in range(16):
        s = sq[:, max(0, c - 2) : c + 3].sum(1)
        expected[:, c] = a[:, c] / (2 + 1e-4 * s) ** 0.75
    torch.testing.assert_close(lrn(a), expected)


def test_paper_layer_names():
    names = paper_layer_names(build_vgg("C", 10, **MINI, batch_norm=True))
    assert names["conv1_1"] == "features.0" and names["conv1_1.bn"] == "features.1"
    assert "conv3_3" in names and "conv3_4" not in names  # C's 1x1 is the third conv of block 3
    assert [n for n in names if n.startswith("fc")] == ["fc6", "fc7", "fc8"]
    assert names["fc8"] == "classifier.6"


@pytest.mark.parametrize(
    "config, factory, batch_norm",
    [
        ("D", torchvision.models.vgg16, False),
        ("E", torchvision.models.vgg19, False),
        ("D", torchvision.models.vgg16_bn, True),
        ("E", torchvision.models.vgg19_bn, True),
    ],
)
def test_loads_torchvision_weights_with_identical_outputs(config, factory, batch_norm):
    torch.manual_seed(0)
    reference = factory(weights=None).eval()
    if batch_norm:  # non-trivial running statistics, so eval-mode BN is really exercised
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = VGG(config, batch_norm=batch_norm).eval()  # no init: every weight comes from torchvision
    assert list(ours.state_dict()) == list(reference.state_dict())
    load_torchvision_state_dict(ours, reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_torchvision_state_dict_mismatch_is_clear():
    with torch.device("meta"):
        tv = torchvision.models.vgg16(weights=None)
    ours = _meta("D", batch_norm=True)
    with pytest.raises(ValueError, match="batch_norm=True for"):
        load_torchvision_state_dict(ours, tv.state_dict())
    ours = _meta("D", num_classes=10)
    with pytest.raises(ValueError, match="classifier.6.weight has shape"):
        load_torchvision_state_dict(ours, tv.state_dict())


def test_count_params_counts_all_parameters():
    model = VGG("A", 10, **MINI)
    assert count_params(model) == sum(p.numel() for p in model.state_dict().values())  # no BN buffers


def test_table1_depth_is_the_conv_count_plus_three_fc():
    for config, spec in CONFIGS.items():
        convs = sum(1 for item in spec if item not in ("M", "LRN"))
        assert convs + 3 == WEIGHT_LAYERS[config], config


def test_unwrap_model_and_strip_wrapper_prefixes_share_the_rule():
    net = build_vgg("A", 10, **MINI)
    compiled_in_ddp = nn.Module()
    compiled_in_ddp.module = nn.Module()
    compiled_in_ddp.module._orig_mod = net  # the attributes DDP and torch.compile keep the wrapped module in
    assert unwrap_model(compiled_in_ddp) is net and unwrap_model(net) is net
    assert unwrap_model(torch.compile(net)) is net
    wrapped = compiled_in_ddp.state_dict()
    assert next(iter(wrapped)).startswith("module._orig_mod.")
    assert list(strip_wrapper_prefixes(wrapped)) == list(net.state_dict())
