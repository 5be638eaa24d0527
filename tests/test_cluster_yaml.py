"""cluster.yaml passes Ray's own cluster-launcher validation and keeps the promises the README makes about it."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cfg)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_with_rays_own_checks():
    cfg = _validate(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("p4", "p5"))  # 8-GPU instances
    assert cfg["head_node_type"] == "head"


def test_unknown_keys_are_rejected_so_the_test_can_fail():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["avaliable_node_types"] = cfg.pop("available_node_types")
    with pytest.raises(Exception):  # noqa: B017 - jsonschema's ValidationError or Ray's ValueError
        _validate(cfg)


def test_services_bind_to_private_or_loopback_addresses_only():
    text = (ROOT / "cluster.yaml").read_text()
    start = " ".join(yaml.safe_load(text)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "mlflow server --host $(hostname -I" in start and "0.0.0.0" not in start
    setup = " ".join(yaml.safe_load(text)["setup_commands"])
    assert "install_pillow_simd.sh" in setup and "-e /home/ubuntu/vggdist" in setup


def test_every_node_installs_the_pinned_stack():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    installs = [c for c in cfg["setup_commands"] + cfg["head_setup_commands"] if "pip install" in c]
    installs = [c for c in installs if "--upgrade pip" not in c]
    assert installs and all("-c /home/ubuntu/vggdist/constraints.txt" in c for c in installs), installs
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    for name in ("torch", "torchvision", "ray", "mlflow", "webdataset"):
        assert name in pins, name
    major, minor = (int(x) for x in pins["torch"].split(".")[:2])
    assert (major, minor) >= (2, 6)  # CVE-2025-32434
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("-c constraints.txt") >= 3


def test_ray_token_auth_and_mlflow_on_postgresql():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in start), key
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--backend-store-uri \"postgresql://" in head and "sqlite" not in head
    assert "--artifacts-destination /mnt/shared/mlflow/artifacts" in head
    assert any("apt-get install" in c and "postgresql" in c for c in cfg["head_setup_commands"])
