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
    assert "torch==2.14.1" in setup and "install_pillow_simd.sh" in setup and "-e /home/ubuntu/vggdist" in setup
