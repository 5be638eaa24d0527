"""§3.1 initialisation: random normal or Glorot init, and the staged deep-from-shallow start from net A.

The paper trains configuration A from random weights, then starts the deeper nets with "the first four
convolutional layers and the last three fully-connected layers" of A, the other layers random
(`init_from_shallower`). Its footnote adds that Glorot & Bengio (2010) init works without that stage.
He et al.'s init (2015, used for the 2016 plain and residual nets, `vggdist.resnet`) is a third scheme.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from vggdist.models import VGG, paper_layer_names, strip_wrapper_prefixes, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["INIT_SCHEMES", "SHALLOW_LAYERS", "init_from_shallower", "init_weights"]

INIT_SCHEMES = ("normal", "glorot", "he")

# Net A's layers whose weights seed a deeper net, and the deep layers they go to (same names: see below).
SHALLOW_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


def init_weights(
    model: nn.Module, scheme: str = "normal", std: float = 1e-2, *, zero_init_residual: bool = False
) -> None:
    """Initialise every conv / linear / batch-norm layer of ``model`` in place.

    - ``"normal"``: weights ~ N(0, std²), biases 0 (§3.1).
    - ``"glorot"``: weights ~ Glorot & Bengio's uniform U(±sqrt(6 / (fan_in + fan_out))), biases 0 (the
      paper's footnote: this trains the deep nets without the staged start).
    - ``"he"``: conv weights ~ N(0, 2 / fan_out) (He et al. 2015, "Delving deep into rectifiers", the
      backward-pass form torchvision's ResNet uses: kaiming normal, fan_out, ReLU), linear weights ~ N(0,
      std²), biases 0. The derivation is for layers followed by a ReLU; the classifier gets the small
      normal start so the first soft-max is near uniform (loss ≈ ln K) whatever the number of classes.
    - Batch norm (VGG: an option, not in the paper; He et al.: after every conv): weight 1, bias 0.
      ``zero_init_residual`` sets the last BN weight of every *residual* `vggdist.resnet.BasicBlock` to 0,
      so each block starts as the identity (Goyal et al. 2017). He et al. do not; plain blocks are never
      touched (zeroing them would cut the signal).

    Why ``std=1e-2``: the paper writes "normal distribution with the zero mean and 10^-2 variance", i.e.
    std 0.1 read literally. Most reproductions (and Caffe's ``std: 0.01`` fillers of the time) use std 1e-2,
    and only that reading is trainable: with zero biases and ReLU, one layer multiplies the activation
    variance by about fan_in·std²/2. For a 3×3×512 conv that is 0.24 at std 1e-2 (signals shrink, which is
    why the deep nets needed the staged start) but 23.6 at std 0.1, i.e. ~x3-5 in RMS per layer. Measured on
    net A at 224 with unit-variance input: logits RMS 2e-5 at std 1e-2 but 2.4e6 at std 0.1 (zero biases and
    ReLU make the output scale exactly as std^11), so the soft-max would saturate at step 0
    (tests/test_init.py checks this at a small crop). ``std`` stays a config value for the literal reading.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if not std > 0:
        raise ValueError(f"init std must be > 0, got {std}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if scheme == "he" and isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif scheme in ("normal", "he"):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        from vggdist.resnet import BasicBlock

        for module in model.modules():
            if isinstance(module, BasicBlock) and module.residual:
                nn.init.zeros_(module.bn2.weight)


def _layer_prefixes(model: VGG, layer: str) -> list[str]:
    """Module prefixes making up a paper layer: the conv or FC, plus its batch-norm layer if any."""
    names = paper_layer_names(model)
    return [names[name] for name in (layer, f"{layer}.bn") if name in names]


def init_from_shallower(deep_model: VGG, shallow_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Copy net A's conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8 into the same layers of ``deep_model``.

    §3.1 says "the first four convolutional layers and the last three fully-connected layers". Read as the
    first four convs of the *deep* net that cannot work: D's conv1_2 is 64→64 where A's second conv is 64→128.
    A layer is defined by its block, so the faithful shape-consistent reading copies A's first four convs into
    the deep layers that play the same role in the same block: conv1_1 (3→64), conv2_1 (64→128), the first
    two convs of block 3 (128→256, 256→256; in C, D, E they are 3×3 too, before C's 1×1 conv3_3). The new
    layers (conv1_2, conv2_2, conv3_3, …, blocks 4–5) keep ``deep_model``'s current initialisation.

    ``shallow_state`` is the state dict of an A network with the same widths, fc width, crop, batch_norm
    and num_classes (a ``module.`` DDP / ``_orig_mod.`` prefix is stripped); batch-norm layers travel with
    their convs. Returns the mapping applied, ``{source module prefix: target module prefix}`` in layer
    order, e.g. ``{"features.3": "features.5", ...}`` for A → D, ready to log as JSON.
    Raises ValueError if ``shallow_state`` is not such a state dict or a shape differs.
    """
    deep = unwrap_model(deep_model)  # accept a DDP-wrapped or compiled model too
    if not isinstance(deep, VGG):
        raise ValueError(f"init_from_shallower needs a vggdist VGG model, got {type(deep).__name__}")
    source = strip_wrapper_prefixes(shallow_state)
    # Net A built like the deep net on the meta device (no memory): its keys and shapes are what we expect.
    with torch.device("meta"):
        shallow = VGG(
            "A",
            deep.num_classes,
            widths=deep.widths,
            fc_width=deep.fc_width,
            crop_size=deep.crop_size,
            batch_norm=deep.batch_norm,
        )
    built_like = (
        f"net A with widths={deep.widths}, fc_width={deep.fc_width}, crop_size={deep.crop_size}, "
        f"batch_norm={deep.batch_norm}, num_classes={deep.num_classes}"
    )
    expected = shallow.state_dict()
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"shallow_state is not the state dict of {built_like} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); initialise from a checkpoint of configuration A trained at this scale"
        )

    target = deep.state_dict()
    pairs: list[tuple[str, str]] = []  # (source key, target key) of every tensor to copy
    mapping: dict[str, str] = {}
    for layer in SHALLOW_LAYERS:
        for src_prefix, dst_prefix in zip(
            _layer_prefixes(shallow, layer), _layer_prefixes(deep, layer), strict=True
        ):
            mapping[src_prefix] = dst_prefix
            for key in expected:
                if key.startswith(src_prefix + "."):
                    dst_key = dst_prefix + key[len(src_prefix) :]
                    if source[key].shape != target[dst_key].shape:
                        raise ValueError(
                            f"cannot copy A's {layer} ({key}, shape {tuple(source[key].shape)}) into "
                            f"VGG-{deep.config} {dst_key} (shape {tuple(target[dst_key].shape)}): "
                            f"initialise from {built_like}"
                        )
                    pairs.append((key, dst_key))
    # Check everything before copying anything, so a failure leaves deep_model untouched.
    with torch.no_grad():
        for src_key, dst_key in pairs:
            target[dst_key].copy_(source[src_key])
    logger.info("initialised VGG-%s from net A: %s", deep.config, mapping)
    return mapping
