"""How far a stage is and how long it has left: one display per stage, on stderr (stdout stays machine-readable).

On a terminal it is a tqdm bar redrawn in place. Anywhere else (CI, ``ray job logs``, a pipe, a file, and a
Ray worker, whose output Ray forwards to the driver line by line) it is a plain line at most every
`interval_s` seconds and a last line when the stage ends: never carriage-return updates that a log would keep.

`Progress` counts items (images sharded, images evaluated); `TrainProgress` is rank 0's view of training
(epoch, step/steps, loss, error, img/s, ETA), fed by `vggdist.ray_train`'s worker loop through the training
loop's step and epoch callbacks, so `vggdist.train` itself prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

INTERVAL_S = 30.0  # a plain line at most this often


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def clock(seconds: float) -> str:
    """ "0:42", "12:03", "3:25:00"."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Items done out of `total` under a name: a bar on a terminal, periodic plain lines elsewhere."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "img",
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        interval_s: float = INTERVAL_S,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.interval_s = interval_s
        self.postfix = ""
        self._t0 = self._last = time.monotonic()
        self._initial = initial
        self._bar = None
        self._closed = False
        if enabled and self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.interval_s:
            self._line()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)

    def eta_s(self) -> float | None:
        done = self.n - self._initial
        elapsed = time.monotonic() - self._t0
        if done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.n) * elapsed / done

    def _line(self, final: bool = False) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{pct}"]
        if self.postfix:
            parts.append(self.postfix)
        if final:
            parts.append(f"in {clock(elapsed)}")
        else:
            eta = self.eta_s()
            parts.append(f"ETA {clock(eta)}" if eta is not None else "")
        print(", ".join(p for p in parts if p), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainProgress:
    """Rank 0's training display: ``A-S256 epoch 3/30 step 12/15 loss 1.234 err 45.6% 480 img/s`` and the ETA of
    the run (every remaining epoch at the speed so far: an upper bound when early stopping ends it sooner)."""

    def __init__(
        self,
        name: str,
        *,
        epochs: int,
        steps_per_epoch: int,
        start_epoch: int = 0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        interval_s: float = INTERVAL_S,
    ):
        self.name, self.epochs, self.steps_per_epoch = name, epochs, steps_per_epoch
        self.epoch = start_epoch
        self.bar = Progress(
            self._desc(start_epoch, 0),
            epochs * steps_per_epoch,
            unit="step",
            initial=start_epoch * steps_per_epoch,
            stream=stream,
            terminal=terminal,
            interval_s=interval_s,
        )
        self.val = ""

    def _desc(self, epoch: int, step: int) -> str:
        return f"{self.name} epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch}"

    def step(self, step: int, loss: float, top1_err: float | None, img_per_s: float) -> None:
        """After optimiser step `step` (counted over the whole run) with the latest window's numbers."""
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        self.epoch = epoch
        err = f" err {top1_err:.1f}%" if top1_err is not None else ""
        self.bar.set_description(self._desc(epoch, in_epoch + 1))
        self.bar.set_postfix(f"loss {loss:.3f}{err} {img_per_s:,.0f} img/s{self.val}")
        self.bar.update(step - self.bar.n)

    def epoch_end(self, epoch: int, val_top1_err: float | None) -> None:
        if val_top1_err is not None:
            self.val = f" (val err {val_top1_err:.1f}% after epoch {epoch})"

    def close(self) -> None:
        self.bar.close()
