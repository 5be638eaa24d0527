"""The address rule of every entry point (`vggdist.cluster`): which address wins, and how a wrong one fails.

No Ray cluster here: the probes meet real sockets (a closed port, an HTTP server, a listener that never
answers) and a real `ray_current_cluster` record. A running and a killed `ray start --head` are in
tests/test_startup.py.
"""

import http.server
import os
import socket
import threading
import time

import pytest

from vggdist import cluster
from vggdist.cluster import AddressError, Target, Where, check, resolve


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flag_then_ray_address_then_a_private_local_ray():
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert resolve("10.0.0.9:6379", env) == Target("10.0.0.9:6379", "--address")
    assert resolve(None, env) == Target("10.0.0.5:6379", "RAY_ADDRESS")
    assert resolve(None, {}) == Target(None, "default") and resolve(None, {}).local
    assert resolve(None, {"RAY_ADDRESS": "  "}).local
    assert resolve("local", env).local  # explicitly local, even with RAY_ADDRESS set
    assert resolve("auto", env) == Target("auto", "--address")  # --address auto beats RAY_ADDRESS
    assert resolve("ray://head:10001", {}).address == "ray://head:10001"
    assert resolve("[::1]:6379", {}).address == "[::1]:6379"


@pytest.mark.parametrize(
    "flag, env, origin",
    [("http://127.0.0.1:8265", {}, "--address"), (None, {"RAY_ADDRESS": "https://head:8265"}, "RAY_ADDRESS")],
)
def test_a_dashboard_url_is_refused_explaining_the_difference(flag, env, origin):
    with pytest.raises(AddressError) as e:
        resolve(flag, env)
    text = str(e.value)
    assert "\n" not in text and origin in text
    assert "ray job submit --address http" in text and "GCS address HOST:PORT" in text


@pytest.mark.parametrize("bad", ["head-node", "10.0.0.5", "10.0.0.5:port", "tcp:/x:1"])
def test_not_host_port_is_refused(bad):
    with pytest.raises(AddressError, match="is not HOST:PORT"):
        resolve(bad, {})


def test_nothing_listening_fails_in_seconds_naming_the_address_and_the_fix():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(AddressError) as e:
        check(resolve(f"127.0.0.1:{port}", {}))
    assert time.monotonic() - t0 < 10
    text = str(e.value)
    assert f"127.0.0.1:{port}" in text and "connection refused" in text and "ray start --head" in text


def test_an_http_server_where_the_gcs_belongs_is_named_as_a_dashboard():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(AddressError, match="answers HTTP, not Ray's GCS") as e:
            check(resolve(None, {"RAY_ADDRESS": f"127.0.0.1:{server.server_address[1]}"}))
        assert "RAY_ADDRESS" in str(e.value) and "ray job submit --address http://" in str(e.value)
    finally:
        server.shutdown()


def test_a_listener_that_never_answers_fails_after_the_timeout():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (kernel backlog) and never says a word
    try:
        t0 = time.monotonic()
        with pytest.raises(AddressError, match="no answer within 1 s"):
            check(resolve(f"127.0.0.1:{silent.getsockname()[1]}", {}), timeout_s=1.0)
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()


def test_auto_means_the_cluster_recorded_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's record: $RAY_TMPDIR/ray/ray_current_cluster
    with pytest.raises(AddressError, match="found no Ray cluster started on this machine"):
        check(resolve("auto", {}))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
    with pytest.raises(AddressError, match="recorded on this machine .* probably stopped or killed"):
        check(resolve("auto", {}))
    assert check(resolve(None, {})) is None  # the default never reads the record


def test_where_says_it_in_one_line():
    assert str(Where("local", cpus=2)) == "Ray: local, 2 CPUs"
    assert str(Where("local", cpus=1, gpus=1)) == "Ray: local, 1 CPU, 1 GPU"
    assert (
        str(Where("cluster", "10.0.0.5:6379", nodes=8, cpus=512, gpus=64))
        == "Ray: cluster at 10.0.0.5:6379, 8 nodes, 512 CPUs, 64 GPUs"
    )
    assert str(cluster.in_process(cpus=2)).startswith("Ray: local, Ray Train local mode")
    assert not Where("cluster", "h:1").local and Where("in-process").local


def test_the_private_rays_dashboard_address_is_in_the_environment_only_while_it_starts(monkeypatch):
    """Its node's processes inherit RAY_API_SERVER_ADDRESS; this process keeps what it had (Ray's job and state
    clients here would otherwise go to that dashboard whatever address they are given)."""
    monkeypatch.setenv(cluster.API_SERVER_ENV, "http://10.0.0.5:8265")
    monkeypatch.delenv("VGGDIST_UNSET_PROBE", raising=False)
    with cluster._inherited({cluster.API_SERVER_ENV: "http://127.0.0.1:1234", "VGGDIST_UNSET_PROBE": "x"}):
        seen = {k: os.environ.get(k) for k in (cluster.API_SERVER_ENV, "VGGDIST_UNSET_PROBE")}
    assert seen == {cluster.API_SERVER_ENV: "http://127.0.0.1:1234", "VGGDIST_UNSET_PROBE": "x"}
    assert os.environ[cluster.API_SERVER_ENV] == "http://10.0.0.5:8265" and "VGGDIST_UNSET_PROBE" not in os.environ
