"""Checkpoints that carry what made them: model, optimiser, lr schedule, epoch, RNG state, config and dataset stats.

Layout of a checkpoint directory (what Ray Train uploads to the storage path and what `--init-from` accepts):

    checkpoint.pt   torch.save of plain containers and tensors only, so it loads with `torch.load(weights_only=True)`
    config.yaml     the run's Config (readable; `Config.load` restores it)
    meta.json       epoch, metrics, dataset manifest hash, code version: what a person or `vggdist evaluate` looks at first
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from vggdist.config import Config

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers, so state-dict keys never carry 'module.' or '_orig_mod.'."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    # weights_only loading turns the tuple of ints into lists: rebuild the shape random.setstate expects
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    config: Config,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    with_rng: bool = True,
) -> Path:
    """Write a checkpoint directory and return it. Only rank 0 calls this."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "model": unwrap(model).state_dict(),
        "model_config": config.to_dict()["model"],
        "num_classes": int(getattr(unwrap(model), "num_classes", 0)),
        "config": json.loads(json.dumps(config.to_dict())),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if schedule is not None:
        payload["schedule"] = schedule
    if train_state is not None:
        payload["train_state"] = train_state
    if stats is not None:
        payload["stats"] = json.loads(json.dumps(stats))
    if with_rng:
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
