"""He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385), as data.

Table 1's ImageNet networks at 18 and 34 layers and §4.2's CIFAR-10 networks (6n+2 layers), each plain (no
shortcuts) or residual; the shortcut options of §3.3; the training and test scales of §3.4; the published
errors of Tables 2, 3 and 6 (`PUBLISHED`) that `vggdist report` puts beside a degradation sweep's. No torch here:
`vggdist.config` validates names and widths against this module, `vggdist.resnet` builds the networks.

Every network is a stem, stages of *basic blocks* (two 3×3 convs, BN after each, ReLU), global average pooling
and one FC layer. A stage's first block halves the feature map with a stride-2 conv (not in the first stage);
the residual net adds each block's input to its output. Depth is counted as in the paper: the stem conv, two
convs per block and the FC layer; projection shortcuts (option B) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from vggdist import paper

__all__ = [
    "CONFIGS",
    "CONFIG_ORDER",
    "DEFAULT_SHORTCUT",
    "LAYOUTS",
    "SHORTCUTS",
    "PUBLISHED",
    "TEST_SCALES",
    "TRAIN_SCALE_JITTER",
    "Layout",
    "NetConfig",
    "Published",
    "layout_of",
    "names_of_layout",
    "published",
]


@dataclass(frozen=True)
class Layout:
    """A family's stem and stage widths, and the scale it trains at (`vggdist.paper.SCALES`: paper or mini)."""

    name: str
    widths: tuple[int, ...]  # filters of each stage
    stem_kernel: int  # first conv: 7×7 stride 2 then a 3×3/2 max-pool (ImageNet), or 3×3 stride 1 (CIFAR)
    scale: str  # "paper" (224 crops) or "mini" (32 crops): its presets' crop, and `vggdist models --scale`

    @property
    def crop_size(self) -> int:
        return paper.SCALES[self.scale]["crop_size"]


LAYOUTS: dict[str, Layout] = {
    # Table 1: conv1 7×7, 64, stride 2; 3×3 max pool, stride 2; conv2_x … conv5_x at 64/128/256/512.
    "imagenet": Layout("imagenet", (64, 128, 256, 512), stem_kernel=7, scale="paper"),
    # §4.2: "The first layer is 3×3 convolutions", then 6n layers on maps of 32, 16, 8 with 16, 32, 64 filters.
    "cifar": Layout("cifar", (16, 32, 64), stem_kernel=3, scale="mini"),
}


@dataclass(frozen=True)
class NetConfig:
    """One network: its layout, basic blocks per stage and whether blocks have identity shortcuts."""

    layout: str  # key of LAYOUTS
    blocks: tuple[int, ...]  # basic blocks per stage, one entry per width of the layout
    residual: bool  # False: the plain net of the same shape

    @property
    def depth(self) -> int:
        """Weight layers as the paper counts them: stem conv + 2 convs per block + FC (18, 34, 6n+2)."""
        return 1 + 2 * sum(self.blocks) + 1

    @property
    def family(self) -> str:
        return "resnet" if self.residual else "plain"


_18, _34 = (2, 2, 2, 2), (3, 4, 6, 3)  # Table 1's 18-layer and 34-layer columns


def _cifar(n: int) -> tuple[int, ...]:
    return (n, n, n)  # 6n+2 layers: n blocks (2n convs) per stage


CONFIGS: dict[str, NetConfig] = {
    "plain-18": NetConfig("imagenet", _18, residual=False),
    "plain-34": NetConfig("imagenet", _34, residual=False),
    "resnet-18": NetConfig("imagenet", _18, residual=True),
    "resnet-34": NetConfig("imagenet", _34, residual=True),
    "plain-20": NetConfig("cifar", _cifar(3), residual=False),
    "plain-56": NetConfig("cifar", _cifar(9), residual=False),
    "resnet-20": NetConfig("cifar", _cifar(3), residual=True),
    "resnet-56": NetConfig("cifar", _cifar(9), residual=True),
}
CONFIG_ORDER = tuple(CONFIGS)

# §3.3: shortcuts that increase dimensions. A: "the shortcut still performs identity mapping, with extra zero
# entries padded for increasing dimensions" (parameter-free; Table 2 and every CIFAR net); B: "projection
# shortcuts are used for increasing dimensions, and other shortcuts are identity" (a 1×1 conv + BN; torchvision).
SHORTCUTS = ("A", "B")
# A by default: the plain/residual comparison (Table 2, Fig. 4) is only fair when the residual net has no more
# parameters than its plain twin, and the CIFAR nets use A throughout. B is for torchvision's weights.
DEFAULT_SHORTCUT = "A"

# §3.4: "The image is resized with its shorter side randomly sampled in [256, 480] for scale augmentation";
# the fully-convolutional test averages "the scores at multiple scales (… shorter side is in {224, 256, 384,
# 480, 640})". Pixels at crop 224, like `vggdist.paper`.
TRAIN_SCALE_JITTER = (256, 480)
TEST_SCALES = (224, 256, 384, 480, 640)


def layout_of(name: str) -> Layout:
    """The layout of network ``name`` (a key of CONFIGS)."""
    return LAYOUTS[CONFIGS[name].layout]


def names_of_layout(layout: str) -> tuple[str, ...]:
    """The networks of one layout, in CONFIGS order: ``names_of_layout("cifar")`` → plain-20 … resnet-56."""
    return tuple(n for n, c in CONFIGS.items() if c.layout == layout)


# ------------------------------------------------------------------------------------------------ the results


@dataclass(frozen=True)
class Published:
    """One published error (%) of a network: `table` 2 (ImageNet validation, 10-crop test at Q=256, top-1; the
    top-5 from Table 3 where it lists the net) or 6 (CIFAR-10 test set, one view of the 32×32 image)."""

    table: int
    config: str
    top1_err: float
    top5_err: float | None = None


PUBLISHED: tuple[Published, ...] = (
    # Table 2: "Top-1 error (%, 10-crop testing) on ImageNet validation"; the ResNets use option A shortcuts
    # ("zero-padding for increasing dimensions, so they have no extra parameter compared to the plain
    # counterparts"). Table 3 adds top-5 for the 34-layer nets (plain-34 10.02, ResNet-34 A 7.76).
    Published(2, "plain-18", 27.94),
    Published(2, "plain-34", 28.54, 10.02),
    Published(2, "resnet-18", 27.88),
    Published(2, "resnet-34", 25.03, 7.76),
    # Table 6: "Classification error on the CIFAR-10 test set"; ResNet-20 (0.27M parameters) and ResNet-56
    # (0.85M). The plain nets of §4.2 are shown only as curves (Fig. 6, left: the deeper plain nets have the
    # higher training and test error); the paper states no number for them, so none is given here.
    Published(6, "resnet-20", 8.75),
    Published(6, "resnet-56", 6.97),
)


def published(config: str) -> Published | None:
    """The paper's error for network ``config``, or None where the paper gives none (the CIFAR plain nets)."""
    return next((p for p in PUBLISHED if p.config == config), None)
