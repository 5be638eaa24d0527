"""A real multi-process Ray cluster for tests: `ray start --head` (+ more nodes on other loopback addresses).

Each cluster gets its own temp dir and ports (GCS, dashboard, Ray Client server, each node's dashboard agent),
and `stop()` kills only the processes whose command line names that temp dir or its ports — never `ray stop`,
which would end every Ray process of the user on the host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the `ray` script of the interpreter running the tests (a venv's bin/), else the one on PATH
RAY = str(Path(sys.executable).parent / "ray")
if not Path(RAY).exists():
    RAY = shutil.which("ray") or "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_port() -> list[str]:
    """A node's dashboard agent on a port of its own: Ray's default (52365) is one per machine, and a node whose
    agent finds it taken (by any other Ray here: a user's, another test's) serves no HTTP, so `ray job submit`
    to its cluster fails for good with "No available agent to submit job"."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


class RayCluster:
    """`temp_dir`: Ray's temp dir for the head (default: a new short one). `ray start` records the cluster in
    `<temp_dir>/ray_current_cluster`: with `temp_dir=<T>/ray`, a process whose RAY_TMPDIR is `<T>` sees this
    cluster as "the cluster recorded on this machine", as a user's processes see one under /tmp/ray."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = True, temp_dir: str | None = None):
        # short: Ray's socket paths are length-limited
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="vgr", dir="/tmp")
        os.makedirs(self.temp_dir, exist_ok=True)
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        cmd = [
            RAY,
            "start",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            *_agent_port(),
        ]
        if dashboard:
            cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        self._run(cmd)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, ip: str, num_cpus: int = 1) -> None:
        """Another raylet on `ip` (any 127.x address): Ray Train sees it as a separate node (node rank 1, …)."""
        self._run(
            [
                RAY,
                "start",
                f"--address={self.address}",
                f"--node-ip-address={ip}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                *_agent_port(),
            ]
        )

    def _run(self, cmd: list[str]) -> None:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def gcs_state(self) -> tuple[list[str], list[str]]:
        """(live node ids, job ids) of this cluster, read from its GCS without joining it: a command that must leave
        the cluster alone is checked by comparing this before and after it ran."""
        import grpc
        from ray.core.generated import gcs_service_pb2 as pb
        from ray.core.generated import gcs_service_pb2_grpc as rpc

        with grpc.insecure_channel(self.address) as channel:
            nodes = rpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(pb.GetAllNodeInfoRequest(), timeout=10)
            jobs = rpc.JobInfoGcsServiceStub(channel).GetAllJobInfo(pb.GetAllJobInfoRequest(), timeout=10)
        alive = sorted(n.node_id.hex() for n in nodes.node_info_list if n.state == 0)
        return alive, sorted(j.job_id.hex() for j in jobs.job_info_list)

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        import ray

        deadline = time.time() + timeout
        while time.time() < deadline:
            if sum(1 for node in ray.nodes() if node["Alive"]) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"only {sum(1 for node in ray.nodes() if node['Alive'])} of {n} Ray nodes came up")

    def _mine(self) -> list[int]:
        marks = (self.temp_dir, f":{self.port}", f"={self.port}")
        return [pid for pid, cmd in _processes() if pid != os.getpid() and any(m in cmd for m in marks)]

    def kill(self) -> None:
        """SIGKILL every process of this cluster at once, as an OOM kill would: its record stays behind."""
        for pid in self._mine():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kill this cluster's processes only (matched by temp dir or GCS port), then remove its temp dir."""
        mine = self._mine()
        # a test cluster keeps nothing worth a graceful exit: a few seconds for SIGTERM, then SIGKILL
        for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for pid in mine:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace_s
            while time.time() < deadline and any(_alive(pid) for pid in mine):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def user_head() -> tuple[RayCluster, str]:
    """A user's `ray start --head` (1 CPU, no dashboard) and the RAY_TMPDIR under which it is "the cluster recorded
    on this machine", as /tmp/ray/ray_current_cluster is for a user's processes."""
    ray_tmpdir = tempfile.mkdtemp(prefix="vgs", dir="/tmp")  # short: Ray's socket paths are length-limited
    # no dashboard: a check reads the head's GCS (RayCluster.gcs_state) or joins it with --address auto
    cluster = RayCluster(num_cpus=1, dashboard=False, temp_dir=f"{ray_tmpdir}/ray")
    if not (Path(ray_tmpdir) / "ray" / "ray_current_cluster").read_text().strip():
        cluster.stop()
        raise RuntimeError(f"ray start --head left no record under {ray_tmpdir}/ray")
    return cluster, ray_tmpdir


def _processes():
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                yield int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"
