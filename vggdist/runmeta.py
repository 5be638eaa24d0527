"""The MLflow contract without MLflow: every tag, metric, artifact and protocol name, plus run metadata.

A user's scripts, the MLflow UI's columns and `vggdist report` read runs by these names, so their string values
never change. Kept apart from `vggdist.tracking` (the code that talks to MLflow) so that the training loop, the
evaluation and the sweep can name things without an MLflow client; `vggdist.tracking` re-exports the names.
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

from vggdist.shardformat import MANIFEST, SHARD_COMMAND

DEFAULT_EXPERIMENT = "vggdist"

# The test protocols, in the order tables list them (labels: `vggdist.paper.PROTOCOL_LABELS`): VGG's §3.2 / §4
# (single, dense, multi-crop, combined) and He et al.'s §3.4 10-crop test (the centre and the four corners, and
# their flips). `VGG_PROTOCOLS` are the VGG presets' and `vggdist evaluate`'s defaults for a VGG run.
SINGLE, TENCROP, DENSE, MULTICROP, COMBINED = "single", "tencrop", "dense", "multicrop", "combined"
PROTOCOLS = (SINGLE, TENCROP, DENSE, MULTICROP, COMBINED)
VGG_PROTOCOLS = (SINGLE, DENSE, MULTICROP, COMBINED)

# ---------------------------------------------------------------------------------------------------- tags
# A training run.
TAG_CONFIG = "vggdist.config"  # the Table 1 column
TAG_STAGE = "vggdist.stage"  # the sweep stage key
TAG_INIT_FROM = "vggdist.init_from"  # the run whose weights started this one
TAG_INIT_MAPPING = "vggdist.init_mapping"  # JSON: source layer -> target layer of the staged init
TAG_CHECKPOINT = "vggdist.checkpoint"  # the latest checkpoint, rewritten every epoch
TAG_BEST_CHECKPOINT = "vggdist.best_checkpoint"
TAG_MANIFEST = "vggdist.data_manifest_sha256"
TAG_CODE_VERSION = "vggdist.code_version"
TAG_WORKERS = "vggdist.workers"  # JSON: rank, node rank, local rank and IP of every worker
TAG_RAY_RUN_NAME = "vggdist.ray_run_name"  # rerunning with this name resumes the run
TAG_STORAGE = "vggdist.storage"  # the run's Ray storage directory
TAG_WARNING = "vggdist.warning"  # a training-health warning (e.g. the stall guard's), in words
TAG_LR_SCHEDULE = "vggdist.lr_schedule"  # JSON list of the lr schedule's decisions, each with its reason
TAG_RAY = "vggdist.ray"  # where it ran, as the command's first line says: "local, 2 CPUs", "cluster at …"
TAG_FAILURE = "vggdist.failure"  # why a FAILED run stopped, in one line (e.g. its storage is full)
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # nests a sweep stage under the sweep run (MLflow's own tag)
# A sweep: its parent run and the stages' child runs.
TAG_SWEEP = "vggdist.sweep"  # SWEEP_PARENT on the sweep's run; the parent run id on its children
SWEEP_PARENT = "parent"
TAG_SWEEP_NAME = "vggdist.sweep_name"
TAG_PLAN = "vggdist.plan"
TAG_TRAIN_SCALE = "vggdist.train_scale"  # paper-equivalent S label: "256", "384", "256-512"
TAG_EVAL_COUNT = "vggdist.eval_count"  # "N counted [+ M skipped (undecodable: keys …)] = T listed"
TAG_EVALUATED = "vggdist.evaluated"  # "true" once the stage's evaluation is logged
TAG_FUSION_DONE = "vggdist.fusion_done"  # "true" on the parent once the fusion results are logged
TRUE = "true"

# ------------------------------------------------------------------------------------------------- metrics
# Per epoch (step = epoch), as `vggdist.train.TrainLoop.fit` reports them.
TRAIN_LOSS = "train/loss"
TRAIN_TOP1_ERR = "train/top1_err"
TRAIN_IMG_PER_S = "train/img_per_s"
TRAIN_SAMPLES = "train/samples"
VAL_TOP1_ERR = "val/top1_err"
VAL_TOP5_ERR = "val/top5_err"
VAL_SAMPLES = "val/samples"
TRAIN_SKIPPED = "train/skipped_samples"  # undecodable training samples skipped (and replaced) this epoch
VAL_SKIPPED = "val/skipped_samples"  # undecodable validation images skipped; val errors are over the rest
LR = "lr"
LR_DROPPED = "lr_dropped"  # 1.0 in an epoch whose validation plateau divided the lr
LR_DROPS = "lr_drops"
EPOCH = "epoch"  # reported to Ray with the metrics; the MLflow step, not a metric
# Every `run.log_every_steps` optimiser steps (step = global step).
STEP_LOSS = "train/step_loss"
STEP_IMG_PER_S = "train/step_img_per_s"
STEP_TOP1_ERR = "train/step_top1_err"
STEP_LR = "train/step_lr"
# Evaluation: `eval_metric_name`; a fusion logged on its first member uses the prefix EVAL_FUSION.
EVAL = "eval"
EVAL_FUSION = "eval_fusion"
ERROR_KINDS = ("top1_err", "top5_err")
CI_KINDS = ("top1_lo", "top1_hi", "top5_lo", "top5_hi")  # the 95 % Wilson interval of each error rate

# ----------------------------------------------------------------------------------------------- artifacts
EVAL_RESULTS = "eval_results"  # .json ({"rows": [...]}) and .md on an evaluated run
FUSION_EVAL_RESULTS = "eval_fusion_results"  # the same for `vggdist evaluate --ensemble`
FUSION_RESULTS = "fusion_results.json"  # a sweep's Table 6 rows, on its parent run
# Per-image outcomes (`vggdist.outcome_file`): what paired tests between runs read after the fact.
EVAL_OUTCOMES = "eval_outcomes.npz"  # on an evaluated run
FUSION_EVAL_OUTCOMES = "eval_fusion_outcomes.npz"  # `vggdist evaluate --ensemble`, on the first member
FUSION_OUTCOMES_DIR = "fusion_outcomes"  # a sweep's fusion groups, <stage keys joined by +>.npz on its parent
PLAN_ARTIFACT = "plan.yaml"  # a sweep's plan, on its parent run
REPORT_DIR = "report"  # `vggdist report`'s files, on the sweep's parent run


def eval_metric_name(
    protocol: str, scales: list[int] | tuple[int, ...], kind: str, prefix: str = EVAL
) -> str:
    """`eval/<protocol>/Q<scales>/<kind>`, e.g. eval/combined/Q256-384-512/top5_err (scales sorted)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    qs = sorted(int(q) for q in scales)
    if not qs or qs[0] <= 0:
        raise ValueError(f"test scales must be positive integers, got {list(scales)!r}")
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"metric kind {kind!r} must be lower-case letters, digits and _ (e.g. top1_err)")
    return f"{prefix}/{protocol}/Q{'-'.join(str(q) for q in qs)}/{kind}"


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
    path = Path(data_dir) / MANIFEST
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found; --data must be a directory written by `{SHARD_COMMAND}`"
        ) from None


def dataset_inputs(train_dir: str | os.PathLike, val_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    """The shards a training run reads, as MLflow dataset inputs (`vggdist.tracking.log_datasets`): name
    ``<data dir>/<split>``, the manifest's sha256 as digest, the shard directory as source, its sample count."""
    out = []
    for directory, context in ((train_dir, "training"), (val_dir, "validation")):
        if directory is None:
            continue
        d = Path(directory).resolve()
        manifest = json.loads((d / MANIFEST).read_text())
        out.append(
            {
                "name": f"{d.parent.name}/{d.name}",
                "digest": manifest_hash(d),
                "source": str(d),
                "num_samples": int(manifest["num_samples"]),
                "context": context,
            }
        )
    return out


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
