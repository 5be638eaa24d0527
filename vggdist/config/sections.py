"""The six frozen sections of a config (model, data, optim, schedule, eval, run) and their checks.

Defaults are the paper's protocol (§3.1 training, §3.2 testing); each `__post_init__` refuses a bad value with a
message that names the fix. `vggdist.config.root` puts the sections together, `vggdist.config.presets` fills
them for the mini and He et al. recipes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from vggdist import paper, resnet_paper
from vggdist.runmeta import DEFAULT_EXPERIMENT, DENSE, PROTOCOLS, SINGLE, TENCROP, VGG_PROTOCOLS

VGG_CONFIG_NAMES = paper.CONFIG_ORDER
RESNET_CONFIG_NAMES = resnet_paper.CONFIG_ORDER  # He et al. 2016: plain-18 … resnet-56
CONFIG_NAMES = VGG_CONFIG_NAMES + RESNET_CONFIG_NAMES
PRESETS = ("paper", "mini", "resnet-paper", "resnet-mini")
# He et al. 2016's tests (§3.4): the centre crop (the per-epoch validation's), the 10-crop test of Table 2 (at
# Q = 256) and the fully-convolutional multi-scale test (dense at Q in {224, 256, 384, 480, 640}).
RESNET_PROTOCOLS = (SINGLE, TENCROP, DENSE)
INIT_CHOICES = ("normal", "glorot", "he", "from-shallower", "resume-weights")


class ConfigError(ValueError):
    """A configuration value a user gave is invalid; the message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def default_preset(model: str) -> str:
    """The preset that trains ``model`` by its paper: ``paper`` for VGG, ``resnet-paper`` for He et al.'s
    ImageNet nets (plain-/resnet-18, -34), ``resnet-mini`` for their CIFAR nets (plain-/resnet-20, -56)."""
    if model not in RESNET_CONFIG_NAMES:
        return "paper"
    return "resnet-paper" if resnet_paper.layout_of(model).scale == "paper" else "resnet-mini"


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
        """ "vgg", "plain" or "resnet"."""
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
    # undecodable samples skipped per epoch (train, and val likewise) above which the run fails: 0.1 % by default
    max_skipped_fraction: float = 0.001
    # seconds a data loader waits for a batch before it fails the worker (a stuck read, e.g. a hung NFS mount)
    loader_timeout_s: float = 600.0

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
        _check(
            0 <= self.max_skipped_fraction <= 1,
            f"data.max_skipped_fraction={self.max_skipped_fraction}: a fraction in [0, 1] (0.001 = 0.1 %)",
        )
        _check(self.loader_timeout_s > 0, "data.loader_timeout_s must be > 0 (seconds)")

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
    """§3.2 / §4: test protocols and test scales Q (every protocol is scored at every Q, and averaged over them)."""

    protocols: tuple[str, ...] = VGG_PROTOCOLS
    test_scales: tuple[int, ...] = paper.MULTISCALE_Q
    batch_size: int = 32
    # Multi-crop (and combined, which needs it) scores 50 crops per image and scale: where that is too slow, it
    # can run on a stated fraction of the images, the same ones for every run (a hash of the sample key,
    # `vggdist.outcomes.in_subset`); dense and single always score every image. 1.0 = all images.
    multicrop_fraction: float = 1.0

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        _check(not bad, f"eval.protocols has unknown {bad}; choose from {', '.join(PROTOCOLS)}")
        _check(
            0.0 < self.multicrop_fraction <= 1.0,
            f"eval.multicrop_fraction must be in (0, 1], got {self.multicrop_fraction}",
        )
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
