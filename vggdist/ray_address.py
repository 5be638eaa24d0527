"""Which Ray a command means, checked before anything is written: the address rule and the address probe.

`resolve` applies the rule (``--address``, else ``RAY_ADDRESS``, else a private local Ray; ``auto`` for the
cluster `ray start --head` recorded on this machine) without touching the network; `check` probes a cluster
address with one gRPC call to its GCS, so a typo, a dead head or a dashboard port fails in seconds with
:class:`AddressError` (a usage error, exit 2). `vggdist.cluster` connects to what they name; see its docstring
for the whole rule.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

AUTO = "auto"
LOCAL = "local"
ENV = "RAY_ADDRESS"
PROBE_TIMEOUT_S = 10.0  # one gRPC call; a blackholed host costs this much, a closed port milliseconds


_HTTP = re.compile(r"^https?://", re.IGNORECASE)
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})$")


class AddressError(ValueError):
    """A Ray address that cannot work (a usage error, exit code 2); the message is one line naming the fix."""


@dataclass(frozen=True)
class Target:
    """Where the rule says to run: a cluster address, or None for a private local Ray."""

    address: str | None  # as given: "HOST:PORT", "ray://HOST:PORT", "auto"; None: private local Ray
    origin: str  # "--address", "RAY_ADDRESS" or "default"

    @property
    def local(self) -> bool:
        return self.address is None

    @property
    def named(self) -> str:
        """The address and where it came from, for messages: "'10.0.0.5:6379' (--address)"."""
        return f"{self.address!r} ({self.origin})" if self.address else "a private local Ray"


# ------------------------------------------------------------------------------------------------- the rule


def resolve(address: str | None = None, environ: Mapping[str, str] | None = None) -> Target:
    """The address rule, without touching the network: `address` (the flag), else RAY_ADDRESS, else local.

    Raises AddressError for a dashboard URL or something that is not HOST:PORT."""
    env = os.environ if environ is None else environ
    if address:
        target = Target(address.strip(), "--address")
    elif env.get(ENV, "").strip():
        target = Target(env[ENV].strip(), ENV)
    else:
        return Target(None, "default")
    if target.address == LOCAL:
        return Target(None, target.origin)
    if target.address == AUTO:
        return target
    if _HTTP.match(target.address):
        raise AddressError(
            f"Ray address {target.named} is an HTTP URL: that is the dashboard / job server, which `ray job "
            f"submit --address {target.address}` takes to run a command as a job; a command run here needs "
            "the cluster's GCS address HOST:PORT (e.g. 10.0.0.5:6379, `ray status` on the head prints it), "
            "or no address for a private local Ray"
        )
    if _HOST_PORT.match(_strip_client(target.address)) is None:
        raise AddressError(
            f"Ray address {target.named} is not HOST:PORT: use the cluster's GCS address (e.g. "
            "10.0.0.5:6379), ray://HOST:10001 for Ray Client, `auto` for the cluster started on this machine "
            "(`ray start --head`), or no address for a private local Ray"
        )
    return target


def _strip_client(address: str) -> str:
    return address[len("ray://") :] if address.startswith("ray://") else address


def recorded_address(temp_dir: str | None = None) -> str | None:
    """The GCS address `ray start --head` recorded on this machine (what `--address auto` means), if any."""
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(temp_dir)) as f:
            return f.read().strip() or None
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ the probe


@dataclass(frozen=True)
class Probe:
    """What the GCS at an address said: its live nodes and their resources (None when it refused to say)."""

    address: str
    nodes: int | None = None
    cpus: float = 0
    gpus: float = 0


def check(target: Target, timeout_s: float = PROBE_TIMEOUT_S) -> Probe | None:
    """Probe a cluster target before `ray.init` (None for a local target); AddressError within `timeout_s`
    when no Ray cluster answers there, naming the address and the fix."""
    if target.local:
        return None
    address = target.address
    if address == AUTO:
        address = recorded_address()
        if address is None:
            raise AddressError(
                f"--address auto {_via(target)}found no Ray cluster started on this machine (`ray start "
                "--head` records one); start it, give its address, or drop --address for a private local Ray"
            )
    if address.startswith("ray://"):
        _tcp_check(target, _strip_client(address), timeout_s)
        return Probe(address)
    return _gcs_probe(target, address, timeout_s)


def _via(target: Target) -> str:
    return "(RAY_ADDRESS) " if target.origin == ENV else ""


def _split(address: str) -> tuple[str, int]:
    m = _HOST_PORT.match(address)
    if m is None:
        raise AddressError(f"Ray address {address!r} is not HOST:PORT")
    return m["host"].strip("[]"), int(m["port"])


def _unreachable(target: Target, address: str, why: str) -> AddressError:
    recorded = target.address == AUTO
    what = (
        f"the Ray cluster recorded on this machine ({address}, --address auto)"
        if recorded
        else (f"Ray address {target.named}")
    )
    fix = (
        "it was probably stopped or killed: start it again (`ray start --head`) or drop --address for a "
        "private local Ray"
        if recorded
        else "start the cluster (`ray start --head` on the head node), fix the address (the GCS port, 6379 "
        "by default), or drop it for a private local Ray"
    )
    return AddressError(f"no Ray cluster answers at {what}: {why}; {fix}")


def _tcp_check(target: Target, address: str, timeout_s: float) -> None:
    host, port = _split(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise _unreachable(target, address, e.strerror or type(e).__name__) from None


def _gcs_probe(target: Target, address: str, timeout_s: float) -> Probe:
    """One GetAllNodeInfo call to the GCS at `address`; an HTTP/1 answer there is named as a dashboard."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    host, port = _split(address)
    t0 = time.monotonic()
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), timeout=timeout_s
        )
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:  # a GCS with token auth: ray.init brings the token
            return Probe(address)
        details = (e.details() or str(code)).strip()
        if "HTTP/2" in details or "http2" in details.lower():
            raise AddressError(
                f"Ray address {target.named} answers HTTP, not Ray's GCS: a dashboard / job server port "
                f"(8265 by default) is what `ray job submit --address http://{address}` takes; a command run "
                "here needs the cluster's GCS address HOST:PORT (6379 by default), or no address for a "
                "private local Ray"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within {timeout_s:.0f} s"
        elif "refused" in details.lower():
            why = "connection refused"
        else:
            why = details.split(";")[-1].strip()[:160]
        raise _unreachable(target, address, why) from None
    finally:
        channel.close()
    alive = [n for n in reply.node_info_list if n.state == 0]  # GcsNodeInfo.ALIVE
    log.debug("GCS at %s answered in %.2f s: %d live nodes", address, time.monotonic() - t0, len(alive))
    if not alive:
        raise _unreachable(target, address, "its GCS answers but has no live node")
    return Probe(
        address,
        nodes=len(alive),
        cpus=sum(n.resources_total.get("CPU", 0) for n in alive),
        gpus=sum(n.resources_total.get("GPU", 0) for n in alive),
    )
