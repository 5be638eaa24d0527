"""Checkpoints that carry what made them: model, optimiser, lr schedule, epoch, RNG state, config and dataset stats.

Layout of a checkpoint directory (what Ray Train uploads to the storage path and what `--init-from` accepts):

    checkpoint.pt   torch.save of plain containers and tensors only, so it loads with `torch.load(weights_only=True)`
    config.yaml     the run's Config (readable; `Config.load` restores it)
    meta.json       epoch, metrics, MLflow run id, init mapping: what a person or `vggdist evaluate` looks at first
    manifest.json   written last: the size and SHA-256 of every other file

Integrity: a checkpoint is copied into the run's storage file by file (`vggdist.checkpoint_store`, with the
manifest last), and a copy cut short (a full disk, a killed process) leaves a directory that must never pass for a
checkpoint. So every load (`load`, hence resume, `--init-from` and evaluation) first checks the directory against
its manifest (`verify`): a missing manifest, a missing file, or a file of another size or hash is refused with
:class:`InvalidCheckpoint`, naming what is wrong.
"""

from __future__ import annotations

import hashlib
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
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class InvalidCheckpoint(ValueError):
    """A directory that is not a whole checkpoint (cut short while being written or copied, or altered since)."""


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
    write_manifest(d)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path) -> dict[str, Any]:
    """Record the size and SHA-256 of every file in `directory` in its manifest.json (written last, atomically)."""
    d = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    tmp = d / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(d / MANIFEST_FILE)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory; InvalidCheckpoint when it is missing or unreadable."""
    f = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(f.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or CHECKPOINT_FILE not in files:
            raise ValueError(f"no {CHECKPOINT_FILE} entry")
    except FileNotFoundError:
        raise InvalidCheckpoint(
            f"{directory} is not a whole checkpoint: it has no {MANIFEST_FILE} (written last, so its copy was cut "
            "short, or it was not written by `vggdist train`)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidCheckpoint(f"{directory}: unreadable {MANIFEST_FILE} ({e})") from None
    return manifest


def verify(directory: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest (sizes, and with `hashes` the SHA-256 of each file);
    returns the manifest, raises InvalidCheckpoint naming the first file that does not match."""
    d = Path(directory)
    manifest = read_manifest(d)
    for name, want in manifest["files"].items():
        p = d / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise InvalidCheckpoint(f"{d} is not a whole checkpoint: {name} is missing") from None
        if size != want["bytes"]:
            raise InvalidCheckpoint(
                f"{d} is not a whole checkpoint: {name} has {size:,} bytes, its writer wrote {want['bytes']:,}"
            )
        if hashes and _sha256(p) != want["sha256"]:
            raise InvalidCheckpoint(
                f"{d} is not a whole checkpoint: {name} differs from what its writer wrote"
            )
    return manifest


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory (or its checkpoint.pt) safely: `weights_only=True`, no pickled code. The
    directory is checked against its manifest first (a .pt file given alone, when its directory has one)."""
    p = Path(path)
    f = p / CHECKPOINT_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with {CHECKPOINT_FILE} (a Ray checkpoint of `vggdist train`) "
            "or the .pt file itself"
        )
    if p.is_dir() or (f.parent / MANIFEST_FILE).is_file():
        verify(f.parent)
    return torch.load(f, map_location=map_location, weights_only=True)


def load_config(path: str | Path) -> Config:
    """The Config stored in a checkpoint (directory or file)."""
    return Config.from_dict(load(path)["config"])


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
