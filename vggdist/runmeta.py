"""Run metadata without MLflow: tag and metric names (DESIGN §5), code version, dataset manifest hash, tables.

Kept apart from `vggdist.tracking` (the one module that talks to MLflow) so that naming and metadata can be used
and tested without an MLflow client; `vggdist.tracking` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "vggdist"

# Tags (DESIGN §5). TAG_CHECKPOINT is rewritten every epoch with the latest checkpoint location.
TAG_CONFIG = "vggdist.config"
TAG_STAGE = "vggdist.stage"
TAG_INIT_FROM = "vggdist.init_from"
TAG_INIT_MAPPING = "vggdist.init_mapping"
TAG_CHECKPOINT = "vggdist.checkpoint"
TAG_MANIFEST = "vggdist.data_manifest_sha256"
TAG_CODE_VERSION = "vggdist.code_version"
TAG_WARNING = "vggdist.warning"  # a training-health warning (e.g. the stall guard's), in words
TAG_LR_SCHEDULE = "vggdist.lr_schedule"  # JSON list of the lr schedule's decisions, each with its reason
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # nests a sweep stage under the sweep run (MLflow's own tag)

PROTOCOLS = ("single", "dense", "multicrop", "combined")


def eval_metric_name(protocol: str, scales: list[int] | tuple[int, ...], kind: str) -> str:
    """`eval/<protocol>/Q<scales>/<kind>`, e.g. eval/combined/Q256-384-512/top5_err (scales sorted)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    qs = sorted(int(q) for q in scales)
    if not qs or qs[0] <= 0:
        raise ValueError(f"test scales must be positive integers, got {list(scales)!r}")
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"metric kind {kind!r} must be lower-case letters, digits and _ (e.g. top1_err)")
    return f"eval/{protocol}/Q{'-'.join(str(q) for q in qs)}/{kind}"


def parse_eval_metric_name(name: str) -> tuple[str, tuple[int, ...], str] | None:
    """Inverse of `eval_metric_name`: (protocol, scales, kind), or None for any other metric."""
    m = re.fullmatch(r"eval/([a-z]+)/Q(\d+(?:-\d+)*)/([a-z0-9_]+)", name)
    if m is None or m.group(1) not in PROTOCOLS:
        return None
    return m.group(1), tuple(int(q) for q in m.group(2).split("-")), m.group(3)


def flatten(d: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings / dataclasses -> {"optim.lr": 0.01, ...}."""
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
            out.update(flatten(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def _param_str(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return str(v)


def code_version() -> str:
    """Package version, plus `+<git short sha>[-dirty]` when the package source is tracked by git."""
    from vggdist import __version__

    pkg_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(pkg_dir), *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # fails unless the package source is tracked
        sha = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{sha}" + ("-dirty" if dirty else "")


def manifest_hash(data_dir: str | os.PathLike) -> str:
    """sha256 of DIR/manifest.json as written by `vggdist-preprocess shard`."""
    path = Path(data_dir) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found; --data must be a directory written by `vggdist-preprocess shard`"
        ) from None


# ------------------------------------------------------------------------------------------- Tracker


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table; columns in first-seen order, floats to 4 decimals."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
