"""A real `mlflow server` subprocess on 127.0.0.1 for tests (sqlite backend, proxied local artifacts).

Three ways to use it:

    from tests.mlflow_server import mlflow_server          # module-scoped fixture -> tracking URI
    from tests.mlflow_server import mlflow_server_process  # same server, as an MlflowServer (stop/start)
    uri, stop = start_mlflow_server(tmp_path)              # plain function, you call stop()

`MlflowServer.stop()` then `.start()` restarts on the same port with the same database and artifact
directory (the "server goes away mid-run" test). Only the process group this helper started is signalled.
Start takes ~4 s and ~480 MB (one worker, job execution off).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` whose state lives under `root` (mlflow.db, artifacts/, server.log)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None, backend_uri: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_path = self.root / "mlflow.db"
        self.backend_uri = backend_uri or f"sqlite:///{self.db_path}"  # e.g. postgresql://user@127.0.0.1:PORT/db
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 90.0) -> str:
        """Start (or restart, same port and db) and wait until /health answers; returns the URI."""
        if self.running:
            return self.uri
        env = dict(
            os.environ,
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as logf:
            # Own session: stop() signals this server and its worker children, nothing else.
            self._proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{self._log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers of the group may outlive the leader for a moment; make sure the port is free again.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


def start_mlflow_server(
    tmp_path: str | os.PathLike, port: int | None = None
) -> tuple[str, Callable[[], None]]:
    """Start a server with its state under tmp_path; returns (uri, stop)."""
    server = MlflowServer(tmp_path, port=port)
    return server.start(), server.stop


def _module_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    # Both fixtures share one server per test module, whichever of them the module imported.
    server = getattr(request.module, "_mlflow_test_server", None)
    if server is None:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
        request.module._mlflow_test_server = server
        request.addfinalizer(server.stop)
    server.start()
    return server


@pytest.fixture(scope="module")
def mlflow_server_process(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> MlflowServer:
    """The module's server as an MlflowServer (a test may stop() and start() it again)."""
    return _module_server(request, tmp_path_factory)


@pytest.fixture(scope="module")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tracking URI of the module's server."""
    return _module_server(request, tmp_path_factory).uri
