"""Typed, frozen configuration for every stage: the paper's protocol (§3.1 training, §3.2 testing) as defaults.

A `Config` is five frozen dataclasses (model, data, optim, schedule, eval) plus `run` (how and where it runs).
Presets are functions (`preset("paper")`, `preset("mini")`, and He et al. 2016's `preset("resnet-paper")`,
`preset("resnet-mini")`); YAML is how a config is saved and loaded, not where defaults live; `--set
optim.lr=0.005` overrides are type-checked against the field and refuse unknown keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vggdist import paper, resnet_paper
from vggdist.runmeta import DEFAULT_EXPERIMENT, PROTOCOLS

VGG_CONFIG_NAMES = paper.CONFIG_ORDER
RESNET_CONFIG_NAMES = resnet_paper.CONFIG_ORDER  # He et al. 2016: plain-18 … resnet-56
CONFIG_NAMES = VGG_CONFIG_NAMES + RESNET_CONFIG_NAMES
PRESETS = ("paper", "mini", "resnet-paper", "resnet-mini")
INIT_CHOICES = ("normal", "glorot", "he", "from-shallower", "resume-weights")


class ConfigError(ValueError):
    """A configuration value a user gave is invalid; the message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and at which width (paper or mini scale).

    VGG (Table 1, A … E): ``widths`` are the 5 conv-block widths, ``fc_width`` the FC layers', and
    ``batch_norm`` / ``dropout`` options. He et al. 2016 (`vggdist.resnet_paper`): ``widths`` are the stage
    widths (4 for the ImageNet nets, 3 for the CIFAR nets), BN after every conv is part of the network
    (``batch_norm`` must be true), there is no dropout (``dropout`` must be 0) and no hidden FC layer
    (``fc_width`` is unused); ``shortcut`` picks option A or B of §3.3 (see `resnet_paper.DEFAULT_SHORTCUT`).
    """

    name: str = "A"
    widths: tuple[int, ...] = paper.WIDTHS
    fc_width: int = paper.FC_WIDTH
    batch_norm: bool = False
    dropout: float = 0.5
    shortcut: str = resnet_paper.DEFAULT_SHORTCUT  # He et al.: "A" zero-padding identity | "B" projection

    def __post_init__(self) -> None:
        _check(
            self.name in CONFIG_NAMES,
            f"model.name={self.name!r} is not a VGG configuration ({', '.join(VGG_CONFIG_NAMES)}) nor a "
            f"He et al. 2016 network ({', '.join(RESNET_CONFIG_NAMES)})",
        )
        _check(
            self.shortcut in resnet_paper.SHORTCUTS,
            f"model.shortcut={self.shortcut!r}: use A (zero-padding identity, the paper's Table 2) or B "
            "(1x1 projection, torchvision's layout)",
        )
        if self.name in RESNET_CONFIG_NAMES:
            self._check_resnet()
            return
        _check(
            len(self.widths) == 5 and all(w > 0 for w in self.widths),
            "model.widths needs 5 positive block widths, e.g. 64,128,256,512,512",
        )
        _check(self.fc_width > 0, "model.fc_width must be positive (paper: 4096)")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1) (paper: 0.5)")

    def _check_resnet(self) -> None:
        layout = resnet_paper.layout_of(self.name)
        n = len(layout.widths)
        widths_ok = len(self.widths) == n and all(w > 0 for w in self.widths)
        if self.shortcut == "A":  # zero-padding cannot remove channels
            widths_ok = widths_ok and all(a <= b for a, b in itertools.pairwise(self.widths))
        _check(
            widths_ok and self.batch_norm and self.dropout == 0.0,
            f"model.name={self.name} is a He et al. 2016 network: it needs model.widths with {n} "
            f"non-decreasing stage widths (paper: {','.join(map(str, layout.widths))}), "
            f"model.batch_norm=true and model.dropout=0; --preset {default_preset(self.name)} sets them "
            f"(got widths={','.join(map(str, self.widths))}, batch_norm={str(self.batch_norm).lower()}, "
            f"dropout={self.dropout:g})",
        )

    @property
    def family(self) -> str:
        """"vgg", "plain" or "resnet"."""
        spec = resnet_paper.CONFIGS.get(self.name)
        return "vgg" if spec is None else spec.family


JPEG_DECODERS = ("auto", "window", "simplejpeg", "pil")


@dataclass(frozen=True)
class DataConfig:
    """§3.1 training images: isotropic rescale to S (fixed or jittered), random crop, flip, PCA colour shift, mean subtraction."""

    crop_size: int = paper.CROP
    train_scale: int = 256  # S when not jittering
    scale_jitter: tuple[int, int] | None = None  # (S_min, S_max): S drawn per image, the paper's [256, 512]
    color_shift_std: float = 0.1  # sigma of alpha ~ N(0, sigma) along the RGB PCA axes (AlexNet's scheme)
    normalize: str = (
        "mean"  # "mean": subtract mean RGB (the paper); "mean_std": also divide by the per-channel std
    )
    loader_workers: int = 2  # DataLoader processes per training worker
    shuffle_buffer: int = 2000  # samples in the in-memory shuffle buffer of each loader worker
    val_scale: int | None = None  # Q for per-epoch validation; None -> S, or 384 (scaled) when jittering
    # training-crop JPEG decoder: "auto" = the window decoder (C extension) → simplejpeg → PIL, the first that
    # applies; or one of them by name (same pixels within 2 grey levels; see vggdist/jpeg.py)
    decoder: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.crop_size > 0 and self.crop_size % 32 == 0,
            f"data.crop_size={self.crop_size}: five 2x2 pools need a multiple of 32 (paper 224, mini 32)",
        )
        _check(
            self.train_scale >= self.crop_size,
            f"data.train_scale={self.train_scale} must be >= data.crop_size={self.crop_size} (S >= crop)",
        )
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            _check(
                self.crop_size <= lo <= hi,
                f"data.scale_jitter={self.scale_jitter} needs crop_size <= S_min <= S_max, e.g. 256,512",
            )
        _check(self.color_shift_std >= 0, "data.color_shift_std must be >= 0 (0 turns the colour shift off)")
        _check(
            self.normalize in ("mean", "mean_std"),
            f"data.normalize={self.normalize!r}: use 'mean' (paper) or 'mean_std'",
        )
        _check(self.loader_workers >= 0, "data.loader_workers must be >= 0")
        _check(
            self.decoder in JPEG_DECODERS,
            f"data.decoder={self.decoder!r}: use one of {', '.join(JPEG_DECODERS)}",
        )
        _check(
            self.val_scale is None or self.val_scale >= self.crop_size,
            "data.val_scale must be >= data.crop_size",
        )

    @property
    def validation_scale(self) -> int:
        """Q used for per-epoch single-scale validation: S for fixed S, 384 (paper scale) for jittered S (§4.1)."""
        if self.val_scale is not None:
            return self.val_scale
        if self.scale_jitter is None:
            return self.train_scale
        return paper.to_crop(paper.single_test_scale("256-512"), self.crop_size)


@dataclass(frozen=True)
class OptimConfig:
    """§3.1: mini-batch SGD with momentum, L2 penalty, and lr 1e-2 for a global batch of 256."""

    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    global_batch_size: int = 256
    batch_size_per_worker: int | None = None  # None -> global / workers (with accumulation if it exceeds max)
    max_batch_size_per_worker: int = 256  # memory cap per step; larger shares use gradient accumulation
    lr_scaling: str = "none"  # "none" (paper) | "linear": lr * global_batch_size / base_batch_size
    base_batch_size: int = 256
    warmup_epochs: float = 0.0  # linear warm-up from lr/10 to lr (useful with linear scaling)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr must be positive (paper: 0.01)")
        _check(0 <= self.momentum < 1, "optim.momentum must be in [0, 1) (paper: 0.9)")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0 (paper: 5e-4)")
        _check(self.global_batch_size > 0, "optim.global_batch_size must be positive (paper: 256)")
        _check(self.max_batch_size_per_worker > 0, "optim.max_batch_size_per_worker must be positive")
        _check(
            self.lr_scaling in ("none", "linear"),
            f"optim.lr_scaling={self.lr_scaling!r}: use 'none' or 'linear'",
        )
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")

    @property
    def scaled_lr(self) -> float:
        if self.lr_scaling == "linear":
            return self.lr * self.global_batch_size / self.base_batch_size
        return self.lr


@dataclass(frozen=True)
class ScheduleConfig:
    """§3.1: lr divided by 10 when validation accuracy stops improving; 3 drops and 74 epochs in the paper."""

    epochs: int = 74
    plateau_patience: int = 2  # epochs without val top-1 improvement before dividing the lr
    plateau_threshold: float = 0.01  # improvement (in % top-1 error) that counts as progress
    lr_drop_factor: float = 0.1
    max_lr_drops: int = 3
    samples_per_epoch: int | None = None  # None -> the training manifest's sample count (one pass worth)
    early_stop: bool = False  # stop at the first plateau after the last lr drop (`epochs` is then a cap)
    stall_epochs: int = 2  # warn when the training loss stays at ln(K) for this many first epochs (0: off)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "schedule.epochs must be positive (paper: 74)")
        _check(self.stall_epochs >= 0, "schedule.stall_epochs must be >= 0 (0 turns the stall warning off)")
        _check(self.plateau_patience >= 0, "schedule.plateau_patience must be >= 0")
        _check(0 < self.lr_drop_factor < 1, "schedule.lr_drop_factor must be in (0, 1) (paper: 0.1)")
        _check(self.max_lr_drops >= 0, "schedule.max_lr_drops must be >= 0 (paper: 3)")
        _check(
            self.samples_per_epoch is None or self.samples_per_epoch > 0,
            "schedule.samples_per_epoch must be positive",
        )


@dataclass(frozen=True)
class EvalConfig:
    """§3.2 / §4: test protocols and test scales Q."""

    protocols: tuple[str, ...] = PROTOCOLS
    test_scales: tuple[int, ...] = paper.MULTISCALE_Q
    batch_size: int = 32

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        _check(not bad, f"eval.protocols has unknown {bad}; choose from {', '.join(PROTOCOLS)}")
        _check(
            len(self.test_scales) > 0 and all(q > 0 for q in self.test_scales),
            "eval.test_scales needs at least one positive Q",
        )


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes: workers, devices, numerics, checkpoints, tracking."""

    workers: int = 1
    cpus_per_worker: int = 1  # CPUs Ray reserves per training worker: its loader processes decode JPEGs there
    gpu: bool = False
    seed: int = 0
    init: str = "normal"  # "normal" | "glorot" | "he" | "from-shallower" | "resume-weights"
    init_std: float = 1e-2  # std of the normal init (see vggdist.init for the 1e-2 variance question)
    fill_init: str = (
        "normal"  # scheme of the layers from-shallower leaves random: "normal" (paper) | "glorot" | "he"
    )
    init_from: str | None = None  # MLflow run id or checkpoint path
    bf16: bool | None = None  # None -> on with --gpu
    channels_last: bool | None = None  # None -> on with --gpu
    compile: bool = False
    # SyncBN: batch-norm statistics over the global batch instead of each worker's share. Off by default:
    # He et al. normalise per GPU, which is what large per-worker batches give; it matters when a worker's
    # batch is small (e.g. 256 split over 64 GPUs = 4 images). GPU only (torch's SyncBatchNorm).
    sync_bn: bool = False
    grad_compression: str = "none"  # "none" | "bf16" | "powersgd"
    powersgd_rank: int = 4
    powersgd_start_iter: int = 10
    max_failures: int = 3
    # One worker on a private local Ray trains in the driver's own process (Ray Train's local mode: no Ray
    # processes to start). None: that whenever workers == 1 and no cluster address is given; false: always Ray
    # Train workers (a crashed worker *process* is then restarted too, not only a Python error).
    local_mode: bool | None = None
    keep_checkpoints: int = 2  # newest kept in addition to the best one
    storage_path: str | None = None  # Ray storage (local dir, shared fs, s3://); None -> ~/vggdist_results
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    log_every_steps: int = 50
    mlflow_wait_s: float = 30.0  # at a run's end, how long to wait for MLflow down (then: vggdist sync)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "run.workers must be >= 1")
        _check(
            self.cpus_per_worker >= 1,
            "run.cpus_per_worker must be >= 1 (with --gpu, e.g. 12 on an 8-GPU, 96-core node)",
        )
        _check(
            self.init in INIT_CHOICES,
            f"run.init={self.init!r}: use normal, glorot, he, from-shallower or resume-weights",
        )
        _check(
            self.init not in ("from-shallower", "resume-weights") or self.init_from,
            f"--init {self.init} needs --init-from RUN_ID|CHECKPOINT",
        )
        _check(self.init_std > 0, "run.init_std must be positive")
        _check(
            self.fill_init in ("normal", "glorot", "he"),
            f"run.fill_init={self.fill_init!r}: use normal, glorot or he",
        )
        _check(
            not self.sync_bn or self.gpu,
            "run.sync_bn=true needs --gpu (torch's SyncBatchNorm synchronises GPU tensors only); CPU workers "
            "keep per-worker batch norm",
        )
        _check(
            self.grad_compression in ("none", "bf16", "powersgd"),
            f"run.grad_compression={self.grad_compression!r}: use none, bf16 or powersgd",
        )
        _check(self.max_failures >= 0, "run.max_failures must be >= 0")
        _check(
            not (self.local_mode and self.workers > 1),
            f"run.local_mode=true trains one worker in this process; run.workers={self.workers} needs Ray Train "
            "workers (drop run.local_mode)",
        )
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.mlflow_wait_s >= 0, "run.mlflow_wait_s must be >= 0 (seconds)")

    @property
    def use_bf16(self) -> bool:
        return self.gpu if self.bf16 is None else self.bf16

    @property
    def use_channels_last(self) -> bool:
        return self.gpu if self.channels_last is None else self.channels_last


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.model.family != "vgg" and self.run.init == "from-shallower"),
            f"--init from-shallower is VGG's staged start from net A (§3.1); {self.model.name} trains from "
            "scratch with --init he (or continues a run with --init resume-weights)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'optim.lr': 0.01, 'data.scale_jitter': None, ...}: the MLflow params of a run."""
        return {f"{section}.{k}": v for section, sub in self.to_dict().items() for k, v in sub.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        unknown = set(d) - {f.name for f in fields(Config)}
        _check(
            not unknown,
            f"unknown config sections {sorted(unknown)}; valid: {[f.name for f in fields(Config)]}",
        )
        base = Config()
        kwargs = {}
        for f in fields(Config):
            section = getattr(base, f.name)
            values = d.get(f.name) or {}
            kwargs[f.name] = _replace_checked(section, f.name, values)
        return Config(**kwargs)

    @staticmethod
    def load(path: str | Path) -> Config:
        return Config.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def override(self, assignments: list[str]) -> Config:
        """Apply `section.key=value` strings (the CLI's --set), type-checked against the field."""
        by_section: dict[str, dict[str, Any]] = {}
        for a in assignments:
            key, sep, raw = a.partition("=")
            section, dot, name = key.strip().partition(".")
            _check(bool(sep and dot), f"--set {a!r}: expected section.key=value, e.g. --set optim.lr=0.005")
            _check(
                hasattr(self, section) and dataclasses.is_dataclass(getattr(self, section)),
                f"--set {a!r}: unknown section {section!r}; valid: {[f.name for f in fields(Config)]}",
            )
            by_section.setdefault(section, {})[name] = _Raw(raw.strip())
        # one replace of every section, so cross-section checks see the final values only
        sections = {s: _replace_checked(getattr(self, s), s, v) for s, v in by_section.items()}
        return replace(self, **sections)


@dataclass(frozen=True)
class _Raw:
    """A --set value as typed: parsed only once the field's type is known ('none' is a string for a str field)."""

    text: str


def _parse_value(raw: str) -> Any:
    """'0.005' -> 0.005, '256,512' -> [256, 512], 'none'/'null' -> None, 'true' -> True; YAML scalars otherwise."""
    if raw.lower() in ("none", "null", "~", ""):
        return None
    if "," in raw and not raw.startswith("["):
        return [_parse_value(p.strip()) for p in raw.split(",")]
    for number in (int, float):  # YAML 1.1 reads "1e-3" as a string; Python reads it as the number meant
        try:
            return number(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


def _replace_checked(section: Any, section_name: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in fields(section)}
    unknown = set(values) - known
    _check(
        not unknown,
        f"unknown key(s) {sorted(f'{section_name}.{k}' for k in unknown)}; valid: {sorted(known)}",
    )
    coerced = {k: _coerce(v, hints[k], f"{section_name}.{k}") for k, v in values.items()}
    try:
        return replace(section, **coerced)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{section_name}: {e}") from e


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against the field's type hint; convert lists to tuples and ints to floats where the field says so."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, _Raw):
        if hint is str:  # a plain string field takes the text as typed, "none" included
            return value.text
        optional_str = origin in (typing.Union, types.UnionType) and str in args
        if optional_str and value.text.lower() not in ("none", "null", "~", ""):
            return value.text  # e.g. a run id such as 0123 or 1e10 stays a string
        value = _parse_value(value.text)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _check(type(None) in args, f"{name} cannot be none")
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        _check(len(value) == len(args), f"{name} needs {len(args)} values separated by commas, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if hint is bool:
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{name} must be an integer, got {value!r}",
        )
        return value
    if hint is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{name} must be a number, got {value!r}",
        )
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    return value


def default_preset(model: str) -> str:
    """The preset that trains ``model`` by its paper: ``paper`` for VGG, ``resnet-paper`` for He et al.'s
    ImageNet nets (plain-/resnet-18, -34), ``resnet-mini`` for their CIFAR nets (plain-/resnet-20, -56)."""
    if model not in RESNET_CONFIG_NAMES:
        return "paper"
    return "resnet-paper" if resnet_paper.layout_of(model).scale == "paper" else "resnet-mini"


def _presets_of(model: str) -> tuple[str, ...]:
    return ("paper", "mini") if model not in RESNET_CONFIG_NAMES else (default_preset(model),)


def preset(name: str, model: str | None = None) -> Config:
    """`paper`: the protocol exactly as §3.1–§4 (224 crops, S=256, widths 64…512, FC 4096, 74 epochs).

    `mini`: the same protocol at `paper.SCALES["mini"]` (crop 32) so it trains on 2 CPU cores in minutes: S and Q
    scaled by 32/224, widths divided by 4, FC 256, global batch 64 at the paper's lr 0.01. It is meant for a net
    trained from scratch on a small dataset, so it departs from the paper where that would stall:
    - Glorot initialisation (`run.init`, and `run.fill_init` for the layers the staged init leaves random), the
      paper's footnote: the paper's N(0, 1e-2) start fades through 11+ layers (the signal shrinks ~4x per layer,
      vggdist.init) and a net trained for minutes never leaves ln(K);
    - up to 30 epochs, stopping at the first plateau after the last lr drop (`schedule.early_stop`), with the
      paper's patience of 2 epochs, so a run ends when its validation error stops improving.

    `resnet-paper`: He et al. 2016 §3.4 for the ImageNet nets (plain-18/34, resnet-18/34): SGD with momentum 0.9,
    weight decay 1e-4, global batch 256, lr 0.1 ÷10 on a plateau, no dropout, He init, BN after every conv;
    S ∈ [256, 480] (scale jitter), 224 crops, colour shift; validation on the 224 centre crop at Q=256 (the
    scale of the paper's 10-crop test); test scales Q ∈ {224, 256, 384, 480, 640} for the fully-convolutional
    (dense) test; 120 epochs ("up to 60×10^4 iterations" of 256 images over 1.28M). Shortcut option A.

    `resnet-mini`: the same at crop 32 for the CIFAR nets (plain-/resnet-20, -56; §4.2): S and Q scaled by
    32/224 (S ∈ [37, 69], Q ∈ {32, 37, 55, 69, 91}, validation at 37) like `mini`, and §4.2's CIFAR recipe:
    global batch 128, lr 0.1, weight decay 1e-4, momentum 0.9, option A; `mini`'s schedule (up to 30 epochs,
    early stop). On 2 CPU cores resnet-20 costs ~41M MACs per image (forward), resnet-56 ~125M (VGG mini A
    ~10M): an epoch of a few thousand images takes a minute or so.

    ``model`` defaults to the preset's usual net (A, resnet-34, resnet-20); a net the preset does not train
    is refused with the preset that does (`default_preset`).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    model = model or {"paper": "A", "mini": "A", "resnet-paper": "resnet-34", "resnet-mini": "resnet-20"}[name]
    _check(
        model in CONFIG_NAMES,
        f"unknown network {model!r}; use a VGG configuration ({', '.join(VGG_CONFIG_NAMES)}) or a He et al. "
        f"2016 network ({', '.join(RESNET_CONFIG_NAMES)})",
    )
    _check(
        name in _presets_of(model),
        f"--preset {name} does not train {model}; use --preset {' or '.join(_presets_of(model))}",
    )
    if name == "paper":
        return Config(model=ModelConfig(name=model))
    if name == "mini":
        scale = paper.SCALES["mini"]
        crop = scale["crop_size"]
        return Config(
            model=ModelConfig(name=model, widths=scale["widths"], fc_width=scale["fc_width"]),
            data=DataConfig(
                crop_size=crop, train_scale=paper.to_crop(256, crop), loader_workers=1, shuffle_buffer=500
            ),
            optim=OptimConfig(lr=0.01, global_batch_size=64),
            schedule=ScheduleConfig(epochs=30, plateau_patience=2, early_stop=True),
            eval=EvalConfig(
                test_scales=tuple(paper.to_crop(q, crop) for q in paper.MULTISCALE_Q), batch_size=64
            ),
            run=RunConfig(log_every_steps=20, init="glorot", fill_init="glorot"),
        )
    return _resnet_preset(name, model)


def _resnet_preset(name: str, model: str) -> Config:
    """`resnet-paper` / `resnet-mini` (see `preset`): one recipe, two crops."""
    mini = name == "resnet-mini"
    crop = resnet_paper.layout_of(model).crop_size
    lo, hi = (paper.to_crop(s, crop) for s in resnet_paper.TRAIN_SCALE_JITTER)
    q = paper.to_crop(256, crop)  # the single-crop / 10-crop test scale
    return Config(
        model=ModelConfig(
            name=model,
            widths=resnet_paper.layout_of(model).widths,
            fc_width=0,  # unused: one FC layer on the pooled features
            batch_norm=True,
            dropout=0.0,
        ),
        data=DataConfig(
            crop_size=crop,
            train_scale=lo,
            scale_jitter=(lo, hi),
            val_scale=q,
            **(dict(loader_workers=1, shuffle_buffer=500) if mini else {}),
        ),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, global_batch_size=128 if mini else 256),
        # mini: the mini preset's schedule (up to 30 epochs, early stop on the last plateau)
        schedule=ScheduleConfig(epochs=30, plateau_patience=2, early_stop=True)
        if mini
        else ScheduleConfig(epochs=120),
        eval=EvalConfig(
            protocols=("single", "dense"),
            test_scales=tuple(paper.to_crop(t, crop) for t in resnet_paper.TEST_SCALES),
            batch_size=64 if mini else 32,
        ),
        run=RunConfig(init="he", log_every_steps=20) if mini else RunConfig(init="he"),
    )
