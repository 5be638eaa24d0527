"""Checkpoints that carry what made them: model, optimiser, lr schedule, epoch, RNG state, config and dataset stats.

Layout of a checkpoint directory (what Ray Train uploads to the storage path and what `--init-from` accepts):

    checkpoint.pt   torch.save of plain containers and tensors only, so it loads with `torch.load(weights_only=True)`
    config.yaml     the run's Config (readable; `Config.load` restores it)
    meta.json       epoch, metrics, MLflow run id, init mapping: what a person or `vggdist evaluate` looks at first
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from vggdist.config import Config
from vggdist.models import unwrap_model

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def rng_state() -> dict[str, Any]:
    """The torch (CPU, CUDA) and Python RNG states, stored for inspection: a resumed run does not restore them,
    it reseeds every epoch from (seed, epoch, rank), which makes the continuation deterministic on its own."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    config: Config,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory and return it. Only rank 0 calls this."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),  # keys without 'module.' or '_orig_mod.'
        "model_config": config.to_dict()["model"],
        "num_classes": int(getattr(unwrap_model(model), "num_classes", 0)),
        "config": json.loads(json.dumps(config.to_dict())),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if train_state is not None:
        payload["train_state"] = train_state
    if stats is not None:
        payload["stats"] = json.loads(json.dumps(stats))
    payload["rng"] = rng_state()
    tmp = d / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(d / CHECKPOINT_FILE)
    config.save(d / CONFIG_FILE)
    (d / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str) + "\n")
    return d


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory (or its checkpoint.pt) safely: `weights_only=True`, no pickled code."""
    p = Path(path)
    f = p / CHECKPOINT_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with {CHECKPOINT_FILE} (a Ray checkpoint of `vggdist train`) "
            "or the .pt file itself"
        )
    return torch.load(f, map_location=map_location, weights_only=True)


def load_config(path: str | Path) -> Config:
    """The Config stored in a checkpoint (directory or file)."""
    return Config.from_dict(load(path)["config"])


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
