"""§2 ConvNet configurations: Table 1 as data, the network builder, parameter and MAC counts (Table 2).

Every configuration A, A-LRN, B, C, D, E is one list in `CONFIGS`, written at the paper's widths; `build_vgg`
turns a list into layers and can scale the per-block widths (`SCALES["mini"]` runs on a laptop CPU).

Layer indices follow torchvision's ``vgg*`` models, so the state dicts of D and E (with and without batch
norm) have exactly torchvision's keys and ``load_torchvision_state_dict`` loads ``vgg16`` / ``vgg19`` /
``vgg16_bn`` / ``vgg19_bn`` weights. Unlike torchvision there is no ``avgpool``: at the training crop the
last feature map is already ``crop / 32`` on a side (7 at 224), which torchvision's ``AdaptiveAvgPool2d(7)``
leaves unchanged, and evaluation at other sizes goes through `vggdist.dense` (§3.2) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vggdist import paper

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIGS",
    "VGG",
    "build_vgg",
    "count_macs",
    "count_params",
    "describe_all",
    "format_table",
    "layer_table",
    "load_torchvision_state_dict",
    "paper_layer_names",
    "strip_wrapper_prefixes",
    "unwrap_model",
]

# Table 1. An int is a 3×3 conv (stride 1, pad 1) with that many output channels, ("1x1", n) a 1×1 conv
# (stride 1, pad 0; config C only), "LRN" local response normalisation, "M" a 2×2 max-pool with stride 2.
# Widths are the paper's; `build_vgg(widths=...)` replaces block b's width (b = number of "M" before it).
_1X1 = "1x1"
# fmt: off
CONFIGS: dict[str, list] = {
    "A":     [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B":     [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C":     [64, 64, "M", 128, 128, "M", 256, 256, (_1X1, 256), "M",
              512, 512, (_1X1, 512), "M", 512, 512, (_1X1, 512), "M"],
    "D":     [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E":     [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# fmt: on
# Depths (Table 1's "11 weight layers" … "19 weight layers") and the two network scales: `vggdist.paper`.

# AlexNet's LRN (Krizhevsky et al. 2012, §3.3): b = a / (k + alpha * sum_{n neighbours} a^2)^beta with
# n=5, k=2, alpha=1e-4, beta=0.75. torch's LocalResponseNorm divides alpha by n, so it gets alpha * n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


def _check_config(config: str) -> list:
    if config not in CONFIGS:
        raise ValueError(
            f"unknown VGG configuration {config!r}; choose one of {', '.join(CONFIGS)} "
            "(He et al.'s plain-/resnet- networks are built by vggdist.resnet.build_resnet)"
        )
    return CONFIGS[config]


def _check_crop(crop_size: int) -> None:
    if crop_size < 32 or crop_size % 32:
        raise ValueError(
            f"crop_size={crop_size} must be a positive multiple of 32 (five 2x2 max-pools halve it five "
            "times), e.g. 224 (paper) or 32 (mini)"
        )


def _make_features(spec: Sequence, widths: Sequence[int], batch_norm: bool) -> nn.Sequential:
    """Conv stack of one Table 1 column: conv[-BN]-ReLU units, LRN and max-pools, in torchvision's order."""
    if len(widths) != 5:
        raise ValueError(f"widths must give one width per conv block (5 values), got {tuple(widths)}")
    layers: list[nn.Module] = []
    in_channels, block = 3, 0
    for item in spec:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            block += 1
        elif item == "LRN":
            layers.append(_lrn())
        else:
            kernel = 1 if isinstance(item, tuple) else 3
            paper_width = item[1] if isinstance(item, tuple) else item
            assert paper_width == paper.WIDTHS[block], (item, block)  # Table 1 is one width per block
            out_channels = int(widths[block])
            # bias is redundant before BN, but torchvision keeps it: keep it for identical state dicts.
            layers.append(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A Table 1 network: ``features`` (conv stack) then ``classifier`` (FC-fc, FC-fc, FC-num_classes).

    ``forward`` takes ``(N, 3, crop_size, crop_size)`` and returns logits ``(N, num_classes)``; the soft-max
    lives in the loss. For whole images of any size use ``vggdist.dense.to_dense(model)``.
    """

    def __init__(
        self,
        config: str,
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = paper.WIDTHS,
        fc_width: int = paper.FC_WIDTH,
        crop_size: int = paper.CROP,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        spec = _check_config(config)
        _check_crop(crop_size)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = config
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        self.fc_width = int(fc_width)
        self.crop_size = int(crop_size)
        self.batch_norm = bool(batch_norm)
        self.dropout = float(dropout)

        self.features = _make_features(spec, self.widths, self.batch_norm)
        side = self.crop_size // 32  # (N, widths[4], side, side) after five pools: 7 at 224, 1 at 32
        self.classifier = nn.Sequential(
            nn.Linear(self.widths[4] * side * side, self.fc_width),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=self.dropout),
            nn.Linear(self.fc_width, self.fc_width),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(p=self.dropout),
            nn.Linear(self.fc_width, self.num_classes),  # fc8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.crop_size, self.crop_size):
            raise ValueError(
                f"VGG-{self.config} takes {self.crop_size}x{self.crop_size} crops, got {tuple(x.shape)}; "
                "use vggdist.dense.to_dense(model) for whole images"
            )
        x = self.features(x)  # (N, widths[4], crop/32, crop/32)
        return self.classifier(torch.flatten(x, 1))  # (N, num_classes)

    def extra_repr(self) -> str:
        return f"config={self.config!r}, crop_size={self.crop_size}, batch_norm={self.batch_norm}"


def build_vgg(
    config: str,
    num_classes: int = 1000,
    *,
    widths: Sequence[int] = paper.WIDTHS,
    fc_width: int = paper.FC_WIDTH,
    crop_size: int = paper.CROP,
    batch_norm: bool = False,
    dropout: float = 0.5,
) -> VGG:
    """Build configuration ``config`` of Table 1, initialised by `vggdist.init.init_weights` (§3.1 default).

    ``widths`` / ``fc_width`` / ``crop_size`` scale the network (``**paper.SCALES["mini"]``); call
    ``init_weights`` again for another scheme or ``init_from_shallower`` for the staged start.
    """
    from vggdist.init import init_weights  # init.py imports this module; import here to avoid a cycle

    model = VGG(
        config,
        num_classes,
        widths=widths,
        fc_width=fc_width,
        crop_size=crop_size,
        batch_norm=batch_norm,
        dropout=dropout,
    )
    init_weights(model)
    return model


def paper_layer_names(model: VGG) -> dict[str, str]:
    """Paper-style layer name -> module prefix, in order: ``{"conv1_1": "features.0", ..., "fc8": "classifier.6"}``.

    Convs are numbered ``conv<block>_<i>`` counting every conv of the block (C's 1×1 conv is ``conv3_3``);
    a batch-norm layer is listed as ``"<conv name>.bn"`` right after its conv.
    """
    names: dict[str, str] = {}
    block, index, last_conv = 1, 0, None
    for i, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            index += 1
            last_conv = f"conv{block}_{index}"
            names[last_conv] = f"features.{i}"
        elif isinstance(module, nn.BatchNorm2d):
            names[f"{last_conv}.bn"] = f"features.{i}"
        elif isinstance(module, nn.MaxPool2d):
            block, index = block + 1, 0
    linear = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    for name, i in zip(("fc6", "fc7", "fc8"), linear, strict=True):
        names[name] = f"classifier.{i}"
    return names


# The attribute under which a wrapper keeps the wrapped module: DistributedDataParallel's and torch.compile's.
# The same names prefix the wrapper's state-dict keys ("module.features.0.weight").
WRAPPER_ATTRS = ("module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside any DDP / torch.compile wrappers (the model itself when it is not wrapped)."""
    inner = model
    while inner is not None:
        model = inner
        inner = next((m for a in WRAPPER_ATTRS if isinstance(m := getattr(model, a, None), nn.Module)), None)
    return model


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict keys without the wrappers' prefixes (``module.``, ``_orig_mod.``): a plain module's keys."""
    prefixes = tuple(f"{a}." for a in WRAPPER_ATTRS)
    out = {}
    for key, value in state_dict.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _torchvision_hint(model: nn.Module) -> str:
    from vggdist.resnet import ResNet  # resnet.py is the other network family; imported only when needed

    if isinstance(model, ResNet):
        return (
            "build the model to match the weights: build_resnet('resnet-18' for resnet18 / 'resnet-34' for "
            f"resnet34, num_classes=..., shortcut='B'); this is {model.config} shortcut={model.shortcut!r} "
            f"num_classes={model.num_classes}"
        )
    return (
        f"build the model to match the weights, e.g. build_vgg('D' for vgg16 / 'E' for vgg19, "
        f"num_classes=..., batch_norm=True for *_bn, crop_size=224); this is VGG-{model.config} "
        f"batch_norm={model.batch_norm} num_classes={model.num_classes} crop_size={model.crop_size}"
    )


def load_torchvision_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load torchvision weights into the network built to match, with identical outputs.

    ``vgg16`` / ``vgg19`` (``_bn``) go into VGG D / E; ``resnet18`` / ``resnet34`` into `vggdist.resnet`'s
    ``resnet-18`` / ``resnet-34`` built with ``shortcut="B"`` (torchvision's projection shortcuts).
    Raises ValueError naming the missing / unexpected keys or the first shape mismatch, e.g. when the
    configuration, ``batch_norm``, the shortcut option, ``num_classes`` or the crop (VGG's fc6 expects
    512*7*7 inputs at 224) differ.
    """
    state = strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    hint = _torchvision_hint(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}; {hint}"
        )
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise ValueError(
                f"state dict does not fit: {key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(value.shape)}; {hint}"
            )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Counting (Table 2): parameters, multiply-accumulates, and the per-layer table `vggdist models` prints.


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights and biases, BN affine included; BN running stats are buffers)."""
    return sum(p.numel() for p in model.parameters())


def _walk(model: VGG, crop_size: int) -> list[dict]:
    """One row per layer of interest with its output shape (C, H, W), parameters and MACs for one image."""
    rows: list[dict] = []
    c, h, w = 3, crop_size, crop_size
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0]
            c = module.out_channels
            macs = c * h * w * module.in_channels * k * k
            rows.append(dict(name=f"conv{k}-{c}", output=[c, h, w], params=count_params(module), macs=macs))
        elif isinstance(module, nn.BatchNorm2d):
            rows.append(dict(name=f"BN-{c}", output=[c, h, w], params=count_params(module), macs=0))
        elif isinstance(module, nn.LocalResponseNorm):
            rows.append(dict(name="LRN", output=[c, h, w], params=0, macs=0))
        elif isinstance(module, nn.MaxPool2d):
            h, w = h // 2, w // 2
            rows.append(dict(name="maxpool", output=[c, h, w], params=0, macs=0))
    for module in model.classifier:
        if isinstance(module, nn.Linear):
            rows.append(
                dict(
                    name=f"FC-{module.out_features}",
                    output=[module.out_features],
                    params=count_params(module),
                    macs=module.in_features * module.out_features,
                )
            )
    rows.append(dict(name="soft-max", output=[model.num_classes], params=0, macs=0))
    return rows


def count_macs(model: VGG, crop_size: int | None = None) -> int:
    """Multiply-accumulates of the conv and FC layers for one ``crop_size`` image (default: the model's crop)."""
    return sum(row["macs"] for row in _walk(model, crop_size or model.crop_size))


def _meta_vgg(config: str, num_classes: int, scale: dict) -> VGG:
    # Built on the meta device: shapes without memory, so counting the 144M-parameter E costs nothing.
    with torch.device("meta"):
        return VGG(config, num_classes, **scale)


def layer_table(config: str, num_classes: int = 1000, **scale) -> list[dict]:
    """Table 1 column ``config`` as rows {"name", "output" [C, H, W], "params", "macs"} at the model's crop.

    ``scale`` takes `build_vgg`'s keyword arguments (``**paper.SCALES["mini"]``, ``batch_norm=True``, ...).
    """
    model = _meta_vgg(config, num_classes, scale)
    return _walk(model, model.crop_size)


def describe_all(num_classes: int = 1000, **scale) -> list[dict]:
    """One entry per configuration: {"config", "family", "depth", "params", "macs", "crop_size", "layers"}
    (Table 2); `vggdist.resnet.describe_all` gives He et al.'s networks in the same form."""
    entries = []
    for config in CONFIGS:
        model = _meta_vgg(config, num_classes, scale)
        layers = _walk(model, model.crop_size)
        entries.append(
            dict(
                config=config,
                family="vgg",
                depth=paper.WEIGHT_LAYERS[config],
                params=count_params(model),
                macs=sum(row["macs"] for row in layers),
                crop_size=model.crop_size,
                layers=layers,
            )
        )
    return entries


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_table(entries: list[dict]) -> str:
    """Human-readable `describe_all` output: a Table 2 summary, then every configuration's layers."""
    width = max([8] + [len(e["config"]) + 2 for e in entries])  # "resnet-34" is wider than VGG's letters
    lines = [f"{'config':<{width}}{'weight layers':>14}{'params':>14}{'params (M)':>12}{'MACs':>9}  crop"]
    for e in entries:
        millions = e["params"] / 1e6
        # Table 2 rounds VGG to millions; smaller nets keep 3 significant digits (11.7 for ResNet-18)
        rounded = f"{millions:.0f}" if millions >= 100 else f"{millions:.1f}" if millions >= 10 else f"{millions:.2f}"
        lines.append(
            f"{e['config']:<{width}}{e['depth']:>14}{e['params']:>14,}{rounded:>12}"
            f"{_human(e['macs']):>9}  {e['crop_size']}"
        )
    for e in entries:
        shortcut = f", shortcut {e['shortcut']}" if e.get("family") == "resnet" else ""
        lines += ["", f"{e['config']} ({e['depth']} weight layers{shortcut})"]
        lines.append(f"  {'layer':<12}{'output':>16}{'params':>12}{'MACs':>10}")
        for row in e["layers"]:
            shape = "x".join(str(s) for s in row["output"])
            lines.append(
                f"  {row['name']:<12}{shape:>16}{_human(row['params']):>12}{_human(row['macs']):>10}"
            )
    return "\n".join(lines)
