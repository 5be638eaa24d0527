"""vggdist.progress: a bar on a terminal, periodic plain lines elsewhere (never carriage returns in a log)."""

import io
import logging

from vggdist import console
from vggdist.progress import Progress, TrainProgress, clock


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal_and_one_last_line():
    out = io.StringIO()
    p = Progress("shard", 100, stream=out, interval_s=0)
    for _ in range(4):
        p.update(25)
    p.close()
    p.close()  # closing twice prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("shard: 25/100 img (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("shard: 100/100 img (100%)") and " in 0:0" in lines[-1]
    assert len(lines) == 5


def test_plain_lines_are_rate_limited():
    out = io.StringIO()
    with Progress("evaluate", 1000, stream=out, interval_s=3600) as p:
        for _ in range(1000):
            p.update(1)
    assert out.getvalue().count("\n") == 1  # only the last line


def test_a_terminal_gets_a_tqdm_bar():
    out = _Tty()
    with Progress("shard", 10, stream=out) as p:
        p.update(10)
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()


def test_training_display_says_epoch_step_loss_error_speed_and_eta():
    out = io.StringIO()
    t = TrainProgress("A-S256", epochs=3, steps_per_epoch=10, stream=out, interval_s=0)
    t.step(12, loss=1.2345, top1_err=45.6, img_per_s=480.2)
    t.epoch_end(2, 40.0)
    t.step(30, loss=1.0, top1_err=30.0, img_per_s=500)
    t.close()
    first, *_, last = out.getvalue().splitlines()
    assert first.startswith("A-S256 epoch 2/3 step 2/10: 12/30 step (40%)")
    assert "loss 1.234 err 45.6% 480 img/s" in first and "ETA" in first
    assert "val err 40.0% after epoch 2" in last and last.startswith("A-S256 epoch 3/3 step 10/10: 30/30")


def test_resumed_training_counts_from_its_epoch():
    out = io.StringIO()
    t = TrainProgress("D", epochs=4, steps_per_epoch=5, start_epoch=2, stream=out, interval_s=0)
    t.step(11, loss=1.0, top1_err=None, img_per_s=10)
    assert out.getvalue().startswith("D epoch 3/4 step 1/5: 11/20 step")


def test_clock():
    assert clock(42) == "0:42" and clock(723) == "12:03" and clock(3 * 3600 + 25 * 60) == "3:25:00"


def test_quiet_by_default_and_verbose_restores(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.setattr(logging.getLogger("ray.train"), "level", logging.NOTSET)
    console.quiet_libraries()
    assert logging.getLogger("ray.train").level == logging.WARNING
    assert logging.getLogger("alembic").level == logging.WARNING
    assert console.ray_logging_level() == logging.WARNING
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose() and console.ray_logging_level() == logging.INFO
    record = logging.LogRecord("ray", logging.WARNING, "", 0, "Token authentication is enabled for this", (), None)
    assert not console._TokenAuthEnabled().filter(record)


def test_ray_trains_own_warnings_reach_the_console_only_with_verbose(monkeypatch):
    """Under CPU overload Ray Train's controller warns "Failed to send resource request" with a traceback: Ray's
    own console filter, set from our LoggingConfig, drops it unless --verbose; our workers' warnings pass."""
    from ray.train.v2._internal.logging.logging import TrainLogLevelFilter

    def shown(name: str, level: int) -> bool:
        record = logging.LogRecord(name, level, "", 0, "Failed to send resource request.", (), None)
        return TrainLogLevelFilter(console.train_logging_config().log_level).filter(record)

    ray_train = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not shown(ray_train, logging.WARNING) and shown(ray_train, logging.ERROR)
    assert shown("vggdist.ray_worker", logging.WARNING)  # a stalled run's warning is ours, not Ray Train's
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert shown(ray_train, logging.WARNING) and shown(ray_train, logging.INFO)
