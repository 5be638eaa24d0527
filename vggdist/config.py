"""Typed, frozen configuration for every stage: the paper's protocol (§3.1 training, §3.2 testing) as defaults.

A `Config` is five frozen dataclasses (model, data, optim, schedule, eval) plus `run` (how and where it runs).
Presets are functions (`preset("paper")`, `preset("mini")`); YAML is how a config is saved and loaded, not where
defaults live; `--set optim.lr=0.005` overrides are type-checked against the field and refuse unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vggdist import paper
from vggdist.runmeta import DEFAULT_EXPERIMENT, PROTOCOLS

CONFIG_NAMES = paper.CONFIG_ORDER


class ConfigError(ValueError):
    """A configuration value a user gave is invalid; the message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Table 1: which column, and at which width (paper or mini scale)."""

    name: str = "A"
    widths: tuple[int, ...] = paper.WIDTHS
    fc_width: int = paper.FC_WIDTH
    batch_norm: bool = False
    dropout: float = 0.5

    def __post_init__(self) -> None:
        _check(
            self.name in CONFIG_NAMES,
            f"model.name={self.name!r} is not a VGG configuration; use one of {', '.join(CONFIG_NAMES)}",
        )
        _check(
            len(self.widths) == 5 and all(w > 0 for w in self.widths),
            "model.widths needs 5 positive block widths, e.g. 64,128,256,512,512",
        )
        _check(self.fc_width > 0, "model.fc_width must be positive (paper: 4096)")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1) (paper: 0.5)")


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
    # applies; or one of them by name (same pixels within 2 grey levels; see vggdist/transforms.py)
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
    init: str = "normal"  # "normal" | "glorot" | "from-shallower" | "resume-weights"
    init_std: float = 1e-2  # std of the normal init (see vggdist.init for the 1e-2 variance question)
    fill_init: str = (
        "normal"  # scheme of the layers from-shallower leaves random: "normal" (paper) | "glorot"
    )
    init_from: str | None = None  # MLflow run id or checkpoint path
    bf16: bool | None = None  # None -> on with --gpu
    channels_last: bool | None = None  # None -> on with --gpu
    compile: bool = False
    grad_compression: str = "none"  # "none" | "bf16" | "powersgd"
    powersgd_rank: int = 4
    powersgd_start_iter: int = 10
    max_failures: int = 3
    keep_checkpoints: int = 2  # newest kept in addition to the best one
    storage_path: str | None = None  # Ray storage (local dir, shared fs, s3://); None -> ~/vggdist_results
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "run.workers must be >= 1")
        _check(
            self.cpus_per_worker >= 1,
            "run.cpus_per_worker must be >= 1 (with --gpu, e.g. 12 on an 8-GPU, 96-core node)",
        )
        _check(
            self.init in ("normal", "glorot", "from-shallower", "resume-weights"),
            f"run.init={self.init!r}: use normal, glorot, from-shallower or resume-weights",
        )
        _check(
            self.init not in ("from-shallower", "resume-weights") or self.init_from,
            f"--init {self.init} needs --init-from RUN_ID|CHECKPOINT",
        )
        _check(self.init_std > 0, "run.init_std must be positive")
        _check(
            self.fill_init in ("normal", "glorot"), f"run.fill_init={self.fill_init!r}: use normal or glorot"
        )
        _check(
            self.grad_compression in ("none", "bf16", "powersgd"),
            f"run.grad_compression={self.grad_compression!r}: use none, bf16 or powersgd",
        )
        _check(self.max_failures >= 0, "run.max_failures must be >= 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")

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
        out = self
        for section, values in by_section.items():
            out = replace(out, **{section: _replace_checked(getattr(out, section), section, values)})
        return out


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


def preset(name: str, model: str = "A") -> Config:
    """`paper`: the protocol exactly as §3.1–§4 (224 crops, S=256, widths 64…512, FC 4096, 74 epochs).

    `mini`: the same protocol at `paper.SCALES["mini"]` (crop 32) so it trains on 2 CPU cores in minutes: S and Q
    scaled by 32/224, widths divided by 4, FC 256, global batch 64 at the paper's lr 0.01. It is meant for a net
    trained from scratch on a small dataset, so it departs from the paper where that would stall:
    - Glorot initialisation (`run.init`, and `run.fill_init` for the layers the staged init leaves random), the
      paper's footnote: the paper's N(0, 1e-2) start fades through 11+ layers (the signal shrinks ~4x per layer,
      vggdist.init) and a net trained for minutes never leaves ln(K);
    - up to 30 epochs, stopping at the first plateau after the last lr drop (`schedule.early_stop`), with the
      paper's patience of 2 epochs, so a run ends when its validation error stops improving.
    """
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
    raise ConfigError(f"unknown preset {name!r}; use 'paper' or 'mini'")
