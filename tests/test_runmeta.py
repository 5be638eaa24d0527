"""The names and facts every run records (vggdist.runmeta): evaluation metric names, the code version, the
manifest hash."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from vggdist import __version__, runmeta


def test_eval_metric_names_round_trip():
    assert (
        runmeta.eval_metric_name("combined", [512, 256, 384], "top5_err")
        == "eval/combined/Q256-384-512/top5_err"
    )
    assert runmeta.eval_metric_name("single", (224,), "top1_err") == "eval/single/Q224/top1_err"
    assert runmeta.parse_eval_metric_name("eval/dense/Q32-48/top1_err") == ("dense", (32, 48), "top1_err")
    assert runmeta.parse_eval_metric_name("val/top1_err") is None
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        runmeta.eval_metric_name("sevencrop", [256], "top1_err")
    with pytest.raises(ValueError, match="positive"):
        runmeta.eval_metric_name("dense", [], "top1_err")


def test_code_version_names_the_git_commit():
    version = runmeta.code_version()
    pkg = Path(runmeta.__file__).parent
    sha = subprocess.run(
        ["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if sha.returncode != 0:  # an installed copy outside git
        assert version == __version__
        return
    assert re.fullmatch(rf"{re.escape(__version__)}\+{sha.stdout.strip()}(-dirty)?", version), version


def test_manifest_hash(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b'{"format": 1}')
    assert runmeta.manifest_hash(tmp_path) == hashlib.sha256(b'{"format": 1}').hexdigest()
    with pytest.raises(FileNotFoundError, match="vggdist-preprocess shard"):
        runmeta.manifest_hash(tmp_path / "missing")
