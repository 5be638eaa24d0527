"""Shared by the tracking tests: the MLflow HTTP variables our policy sets, a temp cwd with MLflow's default
store, and the warnings vggdist.tracking logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
HTTP_VARS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """A temp working directory with MLflow's default (no MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def tracking_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("vggdist.tracking") and r.levelno >= logging.WARNING
    ]
