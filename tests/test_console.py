"""What reaches the screen from Ray workers: our progress lines as they are, Ray's decoration only with --verbose.

A real local Ray in a fresh process (Ray reads its log settings when it is imported): two tasks print
alike lines, as two sweep stages' progress lines are.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from vggdist import cluster, console

    console.set_verbose(sys.argv[1] == "1")
    cluster.connect(None, num_cpus=2, include_dashboard=False, announce=False)
    import ray

    @ray.remote(num_cpus=1)
    def stage(name):
        for epoch in (1, 2):
            print(f"{name} epoch {epoch}/2 step 7/7: loss 2.30 err 88.0%", flush=True)
        return name

    ray.get([stage.remote("1-A-S256"), stage.remote("1-D-S256-random")])
    time.sleep(1.5)  # the driver prints forwarded worker lines asynchronously
    ray.shutdown()
    """
)


def _run(verbose: bool) -> list[str]:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if verbose else "0"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [line for line in (p.stdout + p.stderr).splitlines() if " epoch " in line]


def test_worker_progress_lines_print_as_they_are():
    lines = _run(verbose=False)
    # every line of both stages arrives, none folded into "[repeated 2x across cluster]", none decorated
    for name in ("1-A-S256", "1-D-S256-random"):
        assert sum(line.startswith(name + " epoch") for line in lines) == 2, lines
    assert not [line for line in lines if "pid=" in line or "\x1b[" in line or "repeated" in line], lines
