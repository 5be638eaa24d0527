"""System metrics of the process that trains: CPU, memory, and GPU where NVML finds one, as MLflow names them.

MLflow's own monitors (`mlflow.system_metrics`: psutil for CPU and memory, pynvml for GPUs) take the samples;
a daemon thread takes one every `interval_s` (10 s at least, so training does not notice) and once more when
it stops, and logs them as ``system/<name>`` metrics through the caller's logging function: rank 0's tracker,
so they go into the run's durable spool like every other metric and show in the MLflow UI's "System metrics".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 10.0
PREFIX = "system/"


def _monitors() -> list:
    """MLflow's CPU and disk monitors, and its GPU monitor where pynvml finds a GPU."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor

    monitors = [CPUMonitor(), DiskMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as e:  # no pynvml, no driver, no GPU: CPU and memory only
        log.debug("no GPU system metrics: %s", e)
    return monitors


class SystemMetrics:
    """Samples system metrics in a daemon thread and hands them to `log(metrics, step)`; `stop()` takes a last
    sample and joins the thread. A failing `log` (e.g. a full storage) ends the sampling, not the run."""

    def __init__(self, log_fn: Callable[[dict[str, float], int], None], interval_s: float = MIN_INTERVAL_S):
        self.log_fn = log_fn
        self.interval_s = max(MIN_INTERVAL_S, interval_s)
        self.samples = 0
        self._stop = threading.Event()
        self._monitors = _monitors()
        for m in self._monitors:  # psutil's first CPU reading only sets the baseline
            m.collect_metrics()
            m.clear_metrics()
        self._thread = threading.Thread(target=self._run, name="vggdist-system-metrics", daemon=True)

    def start(self) -> SystemMetrics:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._sample():
                return

    def _sample(self) -> bool:
        metrics: dict[str, float] = {}
        try:
            for m in self._monitors:
                m.collect_metrics()
                metrics.update({f"{PREFIX}{k}": float(v) for k, v in m.aggregate_metrics().items()})
                m.clear_metrics()
            self.log_fn(metrics, self.samples)
        except Exception as e:
            log.warning("system metrics stopped: %s: %s", type(e).__name__, e)
            return False
        self.samples += 1
        return True

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
