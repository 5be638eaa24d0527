"""§3.2 dense evaluation: the fully-connected layers rewritten as convolutions.

"The first FC layer is converted to a 7×7 conv. layer, the last two FC layers to 1×1 conv. layers. The
resulting fully-convolutional net is then applied to the whole (uncropped) image." The kernel of the first
one is the side of the last feature map at the training crop, ``crop_size / 32``: 7 at 224, 1 at 32 (mini).

He et al.'s networks (`vggdist.resnet`) need no conversion: global average pooling followed by one FC layer
already is the fully-convolutional test of their §3.4 (FC is affine, so FC of the averaged features is the
average of the FC scores at every position), at any image size.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from vggdist.models import VGG, unwrap_model
from vggdist.resnet import ResNet

logger = logging.getLogger(__name__)

__all__ = ["DenseVGG", "to_dense"]


class DenseVGG(nn.Module):
    """A fully-convolutional VGG: ``forward`` maps ``(N, 3, H, W)`` to a class score map ``(N, K, h, w)``.

    For ``H, W >= crop_size``, ``h = H // 32 - crop_size // 32 + 1`` (likewise ``w``); on a crop-sized input
    the map is 1×1 and equals the FC network's logits. Built by `to_dense`.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, *, config: str, crop_size: int):
        super().__init__()
        self.features = features
        self.classifier = classifier  # conv k×k, ReLU, Dropout, conv 1×1, ReLU, Dropout, conv 1×1
        self.config = config
        self.crop_size = crop_size
        self.num_classes = classifier[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.crop_size:
            raise ValueError(
                f"dense VGG-{self.config} needs images of at least {self.crop_size}x{self.crop_size}, got "
                f"{tuple(x.shape)}; rescale so the smallest side Q >= crop_size"
            )
        x = self.features(x)  # (N, C, H/32, W/32)
        return self.classifier(x)  # (N, K, H/32 - crop/32 + 1, W/32 - crop/32 + 1)

    def extra_repr(self) -> str:
        return f"config={self.config!r}, crop_size={self.crop_size}"


def _linear_to_conv(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    """The same affine map as ``linear`` on a (in_channels, kernel, kernel) window, as a conv (copied weights).

    ``torch.flatten`` of a (C, k, k) map orders inputs channel-major, which is exactly a conv weight's
    (out, C, k, k) layout: a reshape, no transpose.
    """
    assert linear.in_features == in_channels * kernel * kernel, (linear, in_channels, kernel)
    conv = nn.Conv2d(in_channels, linear.out_features, kernel)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, kernel, kernel))
        conv.bias.copy_(linear.bias)
    return conv


def to_dense(model: VGG | ResNet) -> DenseVGG | ResNet:
    """Convert ``model`` (or a DDP-wrapped / compiled one) to its fully-convolutional form; no storage is shared.

    VGG: fc6 becomes a ``crop/32 × crop/32`` conv, fc7 and fc8 1×1 convs. ResNet: a copy of the network as it
    is (it already takes any size and pools globally). Either way the layers are deep-copied, so training
    ``model`` afterwards does not change the dense network (convert again after loading weights). The result
    is in the same train/eval mode as ``model``.
    """
    model = unwrap_model(model)
    if isinstance(model, ResNet):
        return copy.deepcopy(model)
    if not isinstance(model, VGG):
        raise ValueError(f"to_dense needs a vggdist VGG or ResNet model, got {type(model).__name__}")
    fc6, fc7, fc8 = (m for m in model.classifier if isinstance(m, nn.Linear))
    side = model.crop_size // 32  # last feature map at the training crop: (N, C, side, side)
    channels = fc6.in_features // (side * side)
    dropout = [copy.deepcopy(m) for m in model.classifier if isinstance(m, nn.Dropout)]
    classifier = nn.Sequential(
        _linear_to_conv(fc6, channels, side),
        nn.ReLU(inplace=True),
        dropout[0],
        _linear_to_conv(fc7, fc7.in_features, 1),
        nn.ReLU(inplace=True),
        dropout[1],
        _linear_to_conv(fc8, fc8.in_features, 1),
    )
    dense = DenseVGG(
        copy.deepcopy(model.features), classifier, config=model.config, crop_size=model.crop_size
    )
    return dense.train(model.training)
