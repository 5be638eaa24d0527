"""He et al. 2016 networks, plain and residual: Table 1 (ImageNet, 18/34 layers) and §4.2 (CIFAR-10, 6n+2).

`build_resnet` turns an entry of `vggdist.resnet_paper.CONFIGS` into layers. Module names are torchvision's
(``conv1``, ``bn1``, ``layer1.0.conv1``, …, ``layerN.0.downsample``, ``fc``), so with option B shortcuts the
state dicts of ``resnet-18`` / ``resnet-34`` are exactly torchvision's ``resnet18`` / ``resnet34`` and
`vggdist.models.load_torchvision_state_dict` loads those weights. The plain nets are the same layers without
the additions (and without any shortcut module), so a plain net and its option-A residual twin have the same
state-dict keys and the same parameter count.

Global average pooling makes every network fully convolutional up to the FC layer: it takes an image of any
size, and since the FC layer is affine, FC(mean of the features) equals the mean of FC applied at every
position, i.e. the paper's fully-convolutional test (§3.4) is the network as it is (`vggdist.dense.to_dense`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vggdist.resnet_paper import CONFIGS, DEFAULT_SHORTCUT, LAYOUTS, SHORTCUTS, Layout, NetConfig

logger = logging.getLogger(__name__)

__all__ = [
    "BasicBlock",
    "ResNet",
    "ZeroPadShortcut",
    "build_resnet",
    "count_macs",
    "describe_all",
    "layer_table",
]


class ZeroPadShortcut(nn.Module):
    """Option A (§3.3): identity with stride-``stride`` subsampling and zero channels appended; no parameters.

    ``x[..., ::s, ::s]`` has ``ceil(H / s)`` rows, the size of the block's 3×3 stride-``s`` conv (pad 1) at any
    ``H``, so the addition works at every image size (dense evaluation included).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A shortcuts pad channels with zeros, so a stage cannot shrink ({in_channels} -> "
                f"{out_channels}); use non-decreasing widths or shortcut='B'"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, ceil(H/s), ceil(W/s))
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))  # (N, C_out, …)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # no bias: BN follows every conv (torchvision's layout)
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers (ReLU between them and at the end), with ``x`` added before the last ReLU when
    ``residual`` (Fig. 2). ``downsample`` is the shortcut where the shape changes (option A or B), else None."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, residual: bool, shortcut: str):
        super().__init__()
        self.residual = residual
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(in_channels, out_channels, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(nn.Module):
    """A network of `resnet_paper.CONFIGS`: stem, stages ``layer1`` … ``layerN``, global average pool, ``fc``.

    ``forward`` takes ``(N, 3, H, W)`` of any size (at least a pixel after the stem's strides) and returns
    logits ``(N, num_classes)``; the soft-max lives in the loss.
    """

    def __init__(
        self,
        config: str,
        num_classes: int = 1000,
        *,
        widths: Sequence[int] | None = None,
        shortcut: str = DEFAULT_SHORTCUT,
    ) -> None:
        super().__init__()
        spec = _check_config(config)
        layout = LAYOUTS[spec.layout]
        widths = tuple(int(w) for w in (widths or layout.widths))
        if len(widths) != len(spec.blocks) or min(widths) < 1:
            raise ValueError(
                f"{config} needs {len(spec.blocks)} positive stage widths, got {widths} "
                f"(paper: {','.join(map(str, layout.widths))})"
            )
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r}: use 'A' (zero-padding identity) or 'B' (projection)")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.config, self.num_classes = config, int(num_classes)
        self.layout, self.widths, self.shortcut = layout.name, widths, shortcut
        self.residual = spec.residual

        k = layout.stem_kernel
        stride = 2 if k == 7 else 1
        self.conv1 = nn.Conv2d(3, widths[0], k, stride=stride, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        # ImageNet: 3×3/2 max-pool after the stem; the CIFAR nets have none
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if k == 7 else nn.Identity()
        in_channels = widths[0]
        for i, (width, blocks) in enumerate(zip(widths, spec.blocks, strict=True)):
            first_stride = 1 if i == 0 else 2
            stage = [
                BasicBlock(
                    in_channels if b == 0 else width,
                    width,
                    first_stride if b == 0 else 1,
                    residual=spec.residual,
                    shortcut=shortcut,
                )
                for b in range(blocks)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, self.num_classes)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.widths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(
            self.relu(self.bn1(self.conv1(x)))
        )  # (N, w0, H/4, W/4) ImageNet, (N, w0, H, W) CIFAR
        for stage in self.stages:
            x = stage(x)  # each stage after the first halves H and W
        x = self.avgpool(x)  # (N, C, 1, 1): global average pooling
        return self.fc(torch.flatten(x, 1))  # (N, num_classes)

    def extra_repr(self) -> str:
        return f"config={self.config!r}, shortcut={self.shortcut!r}"


def _check_config(config: str) -> NetConfig:
    if config not in CONFIGS:
        raise ValueError(f"unknown He et al. network {config!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[config]


def build_resnet(
    config: str,
    num_classes: int = 1000,
    *,
    widths: Sequence[int] | None = None,
    shortcut: str = DEFAULT_SHORTCUT,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build network ``config`` (``"resnet-34"``, ``"plain-20"``, …) with He initialisation (`init_weights("he")`).

    ``widths`` replaces the layout's stage widths (default: the paper's). ``zero_init_residual`` starts every
    residual block as the identity (its last BN's weight 0, Goyal et al. 2017); the paper does not, so off.
    """
    from vggdist.init import init_weights  # init.py imports this module; import here to avoid a cycle

    model = ResNet(config, num_classes, widths=widths, shortcut=shortcut)
    init_weights(model, "he", zero_init_residual=zero_init_residual)
    return model


# ---------------------------------------------------------------------------------------------------------
# Counting: parameters and multiply-accumulates per layer, the rows `vggdist models` prints.


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv_row(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, c: int, h: int, w: int, prefix: str = "conv"):
    """Row of a conv (its BN's parameters included) and the output (C, H, W) it leaves, for one image."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = conv.out_channels
    name = f"{prefix}{k}-{out}" + (f"/{s}" if s > 1 else "")
    params = _params(conv) + (_params(bn) if bn is not None else 0)
    return dict(name=name, output=[out, h, w], params=params, macs=out * h * w * c * k * k), (out, h, w)


def _walk(model: ResNet, size: int) -> list[dict]:
    """One row per conv (with its BN), shortcut, pool and the FC layer at a ``size × size`` input.

    A conv's row counts its BN's parameters (BN adds no MACs); option B's projection is a ``proj1-…`` row,
    option A's shortcut a parameter-free ``pad-…`` row, and a residual block's last conv is marked ``+``.
    """
    rows: list[dict] = []
    row, (c, h, w) = _conv_row(model.conv1, model.bn1, 3, size, size)
    rows.append(row)
    if isinstance(model.maxpool, nn.MaxPool2d):
        h, w = (h + 1) // 2, (w + 1) // 2  # 3×3, stride 2, pad 1
        rows.append(dict(name="maxpool/2", output=[c, h, w], params=0, macs=0))
    for stage in model.stages:
        for block in stage:
            c_in, h_in, w_in = c, h, w
            row, (c, h, w) = _conv_row(block.conv1, block.bn1, c, h, w)
            rows.append(row)
            row, (c, h, w) = _conv_row(block.conv2, block.bn2, c, h, w)
            if block.residual:
                row["name"] += " +"  # the shortcut is added after this conv's BN
            rows.append(row)
            if isinstance(block.downsample, nn.Sequential):  # option B
                proj, bn = block.downsample
                rows.append(_conv_row(proj, bn, c_in, h_in, w_in, prefix="proj")[0])
            elif isinstance(block.downsample, ZeroPadShortcut):  # option A
                stride = block.downsample.stride
                rows.append(dict(name=f"pad-{c}/{stride}", output=[c, h, w], params=0, macs=0))
    rows.append(dict(name="avgpool", output=[c], params=0, macs=0))
    rows.append(
        dict(
            name=f"FC-{model.num_classes}",
            output=[model.num_classes],
            params=_params(model.fc),
            macs=model.fc.in_features * model.fc.out_features,
        )
    )
    rows.append(dict(name="soft-max", output=[model.num_classes], params=0, macs=0))
    return rows


def _meta_resnet(config: str, num_classes: int, shortcut: str, widths: Sequence[int] | None = None) -> ResNet:
    with torch.device("meta"):  # shapes without memory
        return ResNet(config, num_classes, widths=widths, shortcut=shortcut)


def count_macs(model: ResNet, size: int | None = None) -> int:
    """Multiply-accumulates of the convs (projections included) and the FC layer for one ``size`` image
    (default: the layout's training crop, 224 or 32)."""
    return sum(row["macs"] for row in _walk(model, size or LAYOUTS[model.layout].crop_size))


def layer_table(config: str, num_classes: int = 1000, *, shortcut: str = DEFAULT_SHORTCUT) -> list[dict]:
    """Network ``config`` as rows {"name", "output", "params", "macs"} at its layout's training crop."""
    model = _meta_resnet(config, num_classes, shortcut)
    return _walk(model, LAYOUTS[model.layout].crop_size)


def describe_all(
    num_classes: int = 1000, *, scale: str = "paper", shortcut: str = DEFAULT_SHORTCUT
) -> list[dict]:
    """One entry per network of the layouts at ``scale`` (paper: ImageNet at 224, mini: CIFAR at 32), with
    the keys of `vggdist.models.describe_all` plus "family" ("plain" / "resnet") and "shortcut"."""
    entries = []
    for config, spec in CONFIGS.items():
        layout: Layout = LAYOUTS[spec.layout]
        if layout.scale != scale:
            continue
        model = _meta_resnet(config, num_classes, shortcut)
        layers = _walk(model, layout.crop_size)
        entries.append(
            dict(
                config=config,
                family=spec.family,
                depth=spec.depth,
                params=sum(p.numel() for p in model.parameters()),
                macs=sum(row["macs"] for row in layers),
                crop_size=layout.crop_size,
                shortcut=shortcut,
                layers=layers,
            )
        )
    return entries
