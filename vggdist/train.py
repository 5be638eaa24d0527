"""§3.1 training: mini-batch SGD with momentum, weight decay, dropout, lr divided by 10 on a validation plateau.

Plain PyTorch, no ray and no mlflow: `vggdist.ray_train` supplies the data, the cross-rank sum (`reduce`) and what
happens at the end of an epoch (checkpoint, `ray.train.report`, MLflow); a test drives `TrainLoop.fit` directly with
a list-appending callback.

The global batch (256 in the paper) is kept whatever the number of workers: each optimiser step sums the gradients
of `workers × batch_size_per_worker × accum_steps` images (`batch_plan`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vggdist import runmeta
from vggdist.config import Config, OptimConfig
from vggdist.models import unwrap_model
from vggdist.schedule import DROP, LrSchedule, StallGuard

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (uint8 images (B, 3, crop, crop), int64 labels (B,))
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks (identity on one process)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: the run stops instead of writing a useless checkpoint."""


@dataclass(frozen=True)
class BatchPlan:
    workers: int
    batch_size_per_worker: int  # images per forward/backward on one worker
    accum_steps: int  # micro-batches summed before each optimiser step

    @property
    def global_batch_size(self) -> int:
        return self.workers * self.batch_size_per_worker * self.accum_steps


def batch_plan(optim: OptimConfig, workers: int) -> BatchPlan:
    """Split the global batch over `workers`, accumulating gradients when a worker's share exceeds its memory cap.

    >>> batch_plan(OptimConfig(global_batch_size=256, max_batch_size_per_worker=64), 2)
    BatchPlan(workers=2, batch_size_per_worker=64, accum_steps=2)
    """
    g = optim.global_batch_size
    if optim.batch_size_per_worker is not None:
        per = optim.batch_size_per_worker
        if g % (workers * per):
            raise ValueError(
                f"global batch {g} is not a multiple of {workers} workers x {per} images; "
                f"set optim.batch_size_per_worker to a divisor of {g // workers if g % workers == 0 else g} or change --workers"
            )
        return BatchPlan(workers, per, g // (workers * per))
    if g % workers:
        divisors = [w for w in range(1, min(g, 64) + 1) if g % w == 0]
        raise ValueError(
            f"global batch {g} cannot be split evenly over {workers} workers; use --workers in {divisors} "
            "or set optim.global_batch_size (with optim.lr_scaling=linear)"
        )
    share = g // workers
    accum = math.ceil(share / optim.max_batch_size_per_worker)
    while share % accum:
        accum += 1
    return BatchPlan(workers, share // accum, accum)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum; the L2 penalty (weight decay) on all weights and biases, as in the paper's Caffe setup."""
    return torch.optim.SGD(
        model.parameters(), lr=optim.scaled_lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """Number of samples whose label is within the top-k logits, for each k (k clamped to the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top.eq(labels[:, None])
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


class TrainLoop:
    """One worker's view of training: the model, its optimiser and schedule, and how a batch becomes a step."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        *,
        plan: BatchPlan,
        steps_per_epoch: int,
        augment: nn.Module,
        device: torch.device,
        reduce: Reduce | None = None,
        is_rank0: bool = True,
        num_classes: int | None = None,
    ):
        self.model = model
        self.cfg = cfg
        self.plan = plan
        self.steps_per_epoch = steps_per_epoch
        self.augment = augment.to(device)
        self.device = device
        self.reduce = reduce or (lambda t: t)
        self.is_rank0 = is_rank0
        self.optimizer = build_optimizer(model, cfg.optim)
        num_classes = num_classes or int(getattr(unwrap_model(model), "num_classes", 0)) or None
        self.schedule = LrSchedule(cfg.optim, cfg.schedule, steps_per_epoch, num_classes)
        self.stall_guard = StallGuard(cfg.schedule, cfg.run, cfg.optim, num_classes or 0)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps taken
        self.memory_format = torch.channels_last if cfg.run.use_channels_last else torch.contiguous_format
        self.autocast_dtype = torch.bfloat16 if cfg.run.use_bf16 else None

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "stall_guard": self.stall_guard.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any], optimizer: dict[str, Any] | None = None) -> None:
        self.epoch, self.step = int(d["epoch"]), int(d["step"])
        self.schedule.load_state_dict(d["schedule"])
        self.stall_guard.load_state_dict(d.get("stall_guard", {}))
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    # -- steps ------------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        x = self.augment(
            x, train=train
        )  # uint8 -> float, colour shift (train), mean subtraction: (B, 3, crop, crop)
        return x.contiguous(memory_format=self.memory_format)

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimiser step over `accum_steps` micro-batches; returns (loss_sum, top1_correct, samples) on device."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for i, (images, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.model, "no_sync")
                else self.model.no_sync()
            )
            labels = labels.to(self.device, non_blocking=True)
            with sync:
                with self._autocast():
                    logits = self.model(self._inputs(images, train=True))
                    loss = F.cross_entropy(logits.float(), labels)
                (loss / len(micro_batches)).backward()
            (top1,) = topk_correct(logits.detach(), labels, ks=(1,))
            totals += torch.stack(
                [
                    loss.detach().double() * labels.numel(),
                    top1.double(),
                    torch.tensor(labels.numel(), device=self.device, dtype=torch.float64),
                ]
            )
        self.optimizer.step()
        self.step += 1
        return totals

    def train_epoch(
        self, batches: Iterable[Batch], log_fn: Callable[[dict[str, float], int], None] | None = None
    ) -> dict[str, float]:
        """Run `steps_per_epoch` optimiser steps; returns the epoch's train metrics summed over all ranks."""
        t0 = time.perf_counter()
        window = torch.zeros(3, device=self.device, dtype=torch.float64)
        epoch_totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        it = iter(batches)
        window_t0 = t0
        every = max(1, self.cfg.run.log_every_steps)
        for s in range(self.steps_per_epoch):
            micro = [next(it) for _ in range(self.plan.accum_steps)]
            window += self.train_step(micro)
            if (s + 1) % every == 0 or s + 1 == self.steps_per_epoch:
                # one cross-rank sum per `every` steps: also how every rank learns about a NaN at the same time
                summed = self.reduce(window.clone())
                self._check_finite(summed)
                epoch_totals += summed
                if log_fn is not None and self.is_rank0:
                    dt = time.perf_counter() - window_t0
                    log_fn(
                        {
                            runmeta.STEP_LOSS: float(summed[0] / summed[2]),
                            runmeta.STEP_TOP1_ERR: 100.0 * (1.0 - float(summed[1] / summed[2])),
                            runmeta.STEP_IMG_PER_S: float(summed[2] / dt),
                            runmeta.STEP_LR: self.schedule.lr(self.step),
                        },
                        self.step,
                    )
                window.zero_()
                window_t0 = time.perf_counter()
        elapsed = time.perf_counter() - t0
        loss_sum, top1, n = (float(v) for v in epoch_totals)
        return {
            runmeta.TRAIN_LOSS: loss_sum / n,
            runmeta.TRAIN_TOP1_ERR: 100.0 * (1.0 - top1 / n),
            runmeta.TRAIN_IMG_PER_S: n / elapsed,
            runmeta.TRAIN_SAMPLES: n,
            runmeta.LR: self.schedule.lr(self.step - 1),
        }

    def _check_finite(self, summed: torch.Tensor) -> None:
        if not math.isfinite(float(summed[0])):
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {self.epoch + 1}, step {self.step}: lower optim.lr "
                f"(now {self.schedule.lr(self.step):g}), use --init from-shallower for deep nets (§3.1), or check the input statistics"
            )

    @torch.no_grad()
    def validate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Single-scale centre-crop validation; exact counts summed over ranks (no padding, no dropped batch)."""
        net = unwrap_model(self.model)  # no DDP collectives here: ranks may hold different numbers of images
        net.eval()
        counts = torch.zeros(3, device=self.device, dtype=torch.float64)  # (n, top1_correct, top5_correct)
        for images, labels in batches:
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = net(self._inputs(images, train=False))
            top1, top5 = topk_correct(logits.float(), labels, ks=(1, 5))
            counts += torch.stack(
                [
                    torch.tensor(labels.numel(), device=self.device, dtype=torch.float64),
                    top1.double(),
                    top5.double(),
                ]
            )
        n, top1, top5 = (float(v) for v in self.reduce(counts))
        if n == 0:
            return {runmeta.VAL_SAMPLES: 0.0}
        return {
            runmeta.VAL_SAMPLES: n,
            runmeta.VAL_TOP1_ERR: 100.0 * (1 - top1 / n),
            runmeta.VAL_TOP5_ERR: 100.0 * (1 - top5 / n),
        }

    def fit(
        self,
        train_batches: Callable[[int], Iterable[Batch]],
        val_batches: Callable[[], Iterable[Batch]] | None,
        on_epoch_end: Callable[[dict[str, float], TrainLoop], None],
        log_fn: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        """Train from `self.epoch` to `schedule.epochs`, calling `on_epoch_end(metrics, self)` after every epoch.

        `train_batches(epoch)` yields at least `steps_per_epoch × accum_steps` batches; `val_batches()` every validation
        image exactly once across ranks. `on_epoch_end` is called on every rank (Ray's report is a barrier).
        """
        while self.epoch < self.cfg.schedule.epochs and not self.schedule.stopped:
            metrics = self.train_epoch(train_batches(self.epoch), log_fn)
            warning = self.stall_guard.observe(metrics[runmeta.TRAIN_LOSS], self.epoch + 1)
            if warning and self.is_rank0:
                log.warning(warning)
            if val_batches is not None:
                metrics.update(self.validate(val_batches()))
                if runmeta.VAL_TOP1_ERR in metrics:
                    event = self.schedule.observe(
                        metrics[runmeta.VAL_TOP1_ERR],
                        epoch=self.epoch + 1,
                        n=int(metrics[runmeta.VAL_SAMPLES]),
                        train_loss=metrics[runmeta.TRAIN_LOSS],
                    )
                    metrics[runmeta.LR_DROPPED] = float(event is not None and event.action == DROP)
            self.epoch += 1
            metrics[runmeta.EPOCH] = float(self.epoch)
            metrics[runmeta.LR_DROPS] = float(self.schedule.drops)
            on_epoch_end(metrics, self)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The network of `cfg.model`: a Table 1 VGG at the crop of `cfg.data` (`vggdist.models.build_vgg`), or a
    He et al. 2016 plain / residual net (`vggdist.resnet.build_resnet`), which takes any crop."""
    m = cfg.model
    if m.family != "vgg":
        from vggdist.resnet import build_resnet

        return build_resnet(m.name, num_classes, widths=m.widths, shortcut=m.shortcut)
    from vggdist.models import build_vgg

    return build_vgg(
        m.name,
        num_classes,
        widths=m.widths,
        fc_width=m.fc_width,
        crop_size=cfg.data.crop_size,
        batch_norm=m.batch_norm,
        dropout=m.dropout,
    )


def sync_batch_norm(model: nn.Module, enabled: bool) -> nn.Module:
    """``run.sync_bn``: every BN layer as `torch.nn.SyncBatchNorm`, before DDP wraps the model.

    Training statistics are then computed over the global batch rather than each worker's share; the state
    dict keeps its keys, so checkpoints load into the plain network for evaluation, which uses the running
    statistics (eval mode) and never synchronises. Without a process group of 2+ ranks it computes exactly
    what BatchNorm2d does.
    """
    if not enabled:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def apply_init(
    model: nn.Module, cfg: Config, init_state: dict[str, torch.Tensor] | None = None
) -> dict[str, str]:
    """§3.1 initialisation chosen by `run.init`; returns the layer mapping applied (empty for a random init).

    - normal / glorot / he: random init (`vggdist.init.init_weights`); he is He et al.'s, for their nets.
    - from-shallower (VGG only; `Config` refuses it for He et al.'s nets): random init (`run.fill_init`), then net A's conv1_1, conv2_1, conv3_1, conv3_2, fc6–fc8 copied in
      (`vggdist.init.init_from_shallower`), the staged start of the deeper nets.
    - resume-weights: every weight from `init_state` (same configuration), e.g. S=384 fine-tuned from S=256.
    """
    from vggdist.init import init_from_shallower, init_weights

    init = cfg.run.init
    scheme = {"normal": "normal", "glorot": "glorot", "he": "he"}.get(init, cfg.run.fill_init)
    init_weights(model, scheme, std=cfg.run.init_std)
    if init in ("normal", "glorot", "he"):
        return {}
    if init_state is None:
        raise ValueError(f"--init {init} needs the weights of --init-from")
    if init == "from-shallower":
        return init_from_shallower(model, init_state)
    from vggdist.models import strip_wrapper_prefixes

    state = strip_wrapper_prefixes(init_state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        alternative = (
            "use --init from-shallower to start a deeper net from net A"
            if cfg.model.family == "vgg"
            else "use --init he to start from scratch"
        )
        raise ValueError(
            f"--init resume-weights needs a checkpoint of the same configuration and scale as {cfg.model.name}: {str(e).splitlines()[0]}; "
            f"{alternative}"
        ) from None
    return {"*": "*"}
