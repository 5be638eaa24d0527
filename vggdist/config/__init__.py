"""Typed, frozen configuration for every stage: the paper's protocol (§3.1 training, §3.2 testing) as defaults.

A `Config` is five frozen dataclasses (model, data, optim, schedule, eval) plus `run` (how and where it runs).
Presets are functions (`preset("paper")`, `preset("mini")`, and He et al. 2016's `preset("resnet-paper")`,
`preset("resnet-mini")`); YAML is how a config is saved and loaded, not where defaults live; `--set
optim.lr=0.005` overrides are type-checked against the field and refuse unknown keys.

One concern per module: `sections` (the six sections and their checks), `overrides` (typed values from
``--set`` text and YAML), `root` (`Config`: the whole, YAML, overrides), `presets`. Import from here.
"""

from vggdist.config.presets import preset
from vggdist.config.root import Config
from vggdist.config.sections import (
    CONFIG_NAMES,
    INIT_CHOICES,
    JPEG_DECODERS,
    PRESETS,
    RESNET_CONFIG_NAMES,
    RESNET_PROTOCOLS,
    VGG_CONFIG_NAMES,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    default_preset,
)

__all__ = [
    "CONFIG_NAMES",
    "INIT_CHOICES",
    "JPEG_DECODERS",
    "PRESETS",
    "RESNET_CONFIG_NAMES",
    "RESNET_PROTOCOLS",
    "VGG_CONFIG_NAMES",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "default_preset",
    "preset",
]
