"""`vggdist` as a user runs it, for end-to-end tests: a fresh process on a private local Ray (no inherited
RAY_ADDRESS), with MLflow in a SQLite file of the test's directory and this checkout first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], tmp: Path, extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m vggdist.cli ARGS` in `tmp` (its `mlflow.db`), with `extra_env` added (e.g. S3 credentials)."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "vggdist.cli", *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=300
    )
