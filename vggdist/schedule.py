"""§3.1 learning-rate schedule and the checks that tell a user whether training learns at all.

The paper: "the learning rate was initially set to 10^-2, and then decreased by a factor of 10 when the
validation set accuracy stopped improving. In total, the learning rate was decreased 3 times, and the learning
was stopped after 370K iterations (74 epochs)."

`LrSchedule` implements that rule with two guards a literal reading lacks:
- **No drop at chance.** Validation error that never left chance level has not "stopped improving": it never
  started. Dividing the lr then only makes a stuck net more stuck, so the rule holds the lr until the best
  validation error lies clearly below chance (by two binomial standard errors of the validation set, at least
  one point). The stall guard (below) says what to change instead.
- **Stop on the last plateau** (`schedule.early_stop`): once the lr has been divided `max_lr_drops` times, the
  next plateau ends training — "trains until its validation error stops improving" with `epochs` as a cap.

Every decision (drop, hold at chance, stop) is a `ScheduleEvent` with its reason, kept in the checkpoint and
shown in MLflow.

`StallGuard` watches the first epochs: a training loss that stays within 1 % of ln(K) — the loss of uniform
posteriors over K classes — means the network is not learning, most often because its initialisation
or learning rate is wrong for its depth. It produces one warning naming the likely fix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from vggdist.config import OptimConfig, RunConfig, ScheduleConfig

log = logging.getLogger(__name__)

DROP, HOLD, STOP = "drop", "hold", "stop"


def chance_top1_err(num_classes: int) -> float:
    """Top-1 error (%) of a classifier that guesses uniformly among `num_classes`."""
    return 100.0 * (1.0 - 1.0 / num_classes)


CHANCE_LOSS_TOLERANCE = 0.01  # a training loss within 1 % of ln(K) is "still at chance"


def loss_at_chance(train_loss: float, num_classes: int) -> bool:
    """True when a mean cross-entropy is within a few per cent of ln(K), the loss of uniform posteriors."""
    return num_classes >= 2 and abs(train_loss - math.log(num_classes)) <= CHANCE_LOSS_TOLERANCE * math.log(
        num_classes
    )


def chance_margin(num_classes: int, n: int | None) -> float:
    """How far (points) below chance an error must lie to count as learning: 2 binomial SEs on n images, >= 1."""
    if not n:
        return 1.0
    p = 1.0 - 1.0 / num_classes
    return max(1.0, 2.0 * 100.0 * math.sqrt(p * (1.0 - p) / n))


@dataclass(frozen=True)
class ScheduleEvent:
    """One decision of the schedule, after epoch `epoch` (1-based)."""

    epoch: int
    action: str  # drop | hold | stop
    lr_before: float
    lr_after: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LrSchedule:
    """lr = base × factor^drops, with an optional linear warm-up from base/10 over the first `warmup_epochs`."""

    def __init__(
        self,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        steps_per_epoch: int,
        num_classes: int | None = None,
    ):
        self.base_lr = optim.scaled_lr
        self.warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
        self.cfg = schedule
        self.num_classes = num_classes
        self.drops = 0
        self.best_err = math.inf
        self.bad_epochs = 0
        self.stopped = False
        self.events: list[ScheduleEvent] = []
        self._holding = False  # a hold at chance was recorded and nothing improved since

    def lr(self, step: int) -> float:
        lr = self.base_lr * self.cfg.lr_drop_factor**self.drops
        if step < self.warmup_steps:
            lr *= 0.1 + 0.9 * step / self.warmup_steps
        return lr

    @property
    def current_lr(self) -> float:
        """The lr after warm-up at the current number of drops."""
        return self.base_lr * self.cfg.lr_drop_factor**self.drops

    def at_chance(self, n: int | None = None) -> bool:
        """True while the best validation error is not clearly below chance (unknown class count: never)."""
        if not self.num_classes or self.num_classes < 2:
            return False
        return self.best_err >= chance_top1_err(self.num_classes) - chance_margin(self.num_classes, n)

    def observe(
        self, val_top1_err: float, *, epoch: int, n: int | None = None, train_loss: float | None = None
    ) -> ScheduleEvent | None:
        """Record epoch `epoch`'s validation top-1 error (on n images) and mean training loss; the decision it
        caused, if any. A plateau drops the lr only once the net has started learning: its best validation
        error clearly below chance, and its training loss away from ln(K)."""
        if val_top1_err < self.best_err - self.cfg.plateau_threshold:
            self.best_err = val_top1_err
            self.bad_epochs = 0
            self._holding = False
            return None
        self.bad_epochs += 1
        if self.bad_epochs <= self.cfg.plateau_patience:
            return None
        before = self.current_lr
        stalled = (
            f"validation top-1 error has not improved on {self.best_err:.2f}% for {self.bad_epochs} epochs"
        )
        loss_stuck = train_loss is not None and loss_at_chance(train_loss, self.num_classes or 0)
        if self.at_chance(n) or loss_stuck:
            if self._holding:
                return None
            self._holding = True
            if self.at_chance(n):
                why = f"it is still at chance level ({chance_top1_err(self.num_classes or 2):.1f}%)"
            else:
                why = f"the training loss {train_loss:.4f} is still ln({self.num_classes}), uniform guessing"
            return self._event(
                epoch,
                HOLD,
                before,
                before,
                f"{stalled}, but {why}: the net has not started learning, so the lr is kept (a drop would "
                "not help it start)",
            )
        self.bad_epochs = 0
        if self.drops < self.cfg.max_lr_drops:
            self.drops += 1
            return self._event(
                epoch, DROP, before, self.current_lr, f"{stalled}: lr divided (drop {self.drops})"
            )
        if self.cfg.early_stop:
            self.stopped = True
            return self._event(
                epoch,
                STOP,
                before,
                before,
                f"{stalled} after the last of {self.cfg.max_lr_drops} lr drops: stop",
            )
        return None

    def _event(self, epoch: int, action: str, before: float, after: float, reason: str) -> ScheduleEvent:
        event = ScheduleEvent(epoch, action, before, after, reason)
        self.events.append(event)
        log.info("epoch %d: %s", epoch, reason)
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "drops": self.drops,
            "best_err": self.best_err,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "holding": self._holding,
            "events": [e.to_dict() for e in self.events],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.drops, self.best_err, self.bad_epochs = (
            int(d["drops"]),
            float(d["best_err"]),
            int(d["bad_epochs"]),
        )
        self.stopped = bool(d.get("stopped", False))
        self._holding = bool(d.get("holding", False))
        self.events = [ScheduleEvent(**e) for e in d.get("events", [])]


class StallGuard:
    """Warns once when the training loss of the first `schedule.stall_epochs` epochs all stay near ln(K)."""

    TOLERANCE = CHANCE_LOSS_TOLERANCE

    def __init__(self, schedule: ScheduleConfig, run: RunConfig, optim: OptimConfig, num_classes: int):
        self.epochs = schedule.stall_epochs
        self.run, self.optim = run, optim
        self.num_classes = num_classes
        self.stalled_epochs = 0
        self.warning: str | None = None

    @property
    def chance_loss(self) -> float:
        return math.log(self.num_classes)

    def observe(self, train_loss: float, epoch: int) -> str | None:
        """Record epoch `epoch`'s mean training loss; the warning text the first time the guard fires."""
        if self.warning is not None or self.epochs <= 0 or self.num_classes < 2 or epoch > self.epochs:
            return None
        if not loss_at_chance(train_loss, self.num_classes):
            self.epochs = 0  # it moved: the guard is done
            return None
        self.stalled_epochs += 1
        if self.stalled_epochs < self.epochs:
            return None
        self.warning = (
            f"training is not learning: the training loss stayed at {train_loss:.4f}, within "
            f"{100 * self.TOLERANCE:.0f}% of ln({self.num_classes}) = {self.chance_loss:.4f} (uniform guessing), "
            f"for the first {self.epochs} epochs. Likely cause: {self._cause()}"
        )
        return self.warning

    def _cause(self) -> str:
        lr = f"the learning rate (optim.lr={self.optim.lr:g}; try --set optim.lr={self.optim.lr * 10:g})"
        if self.run.init == "normal":
            return (
                f"the N(0, {self.run.init_std:g}^2) initialisation, whose signal fades through many layers "
                f"(the paper trained its deeper nets from net A); use --init glorot, or check {lr}"
            )
        return f"{lr}, or the initialisation (--init glorot / from-shallower)"

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "stalled_epochs": self.stalled_epochs, "warning": self.warning}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epochs = int(d.get("epochs", self.epochs))
        self.stalled_epochs = int(d.get("stalled_epochs", 0))
        self.warning = d.get("warning")
