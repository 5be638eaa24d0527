"""The shard format: what `vggdist-preprocess shard` writes and every reader of it expects.

A data directory DIR holds one split directory per split (DIR/train, DIR/val), or is one itself:

    train-000000.tar …  WebDataset shards; each sample is <key>.jpg (an RGB JPEG), <key>.cls (the class
                        index as ASCII digits) and <key>.json (wnid, source path, width, height)
    manifest.json       format_version, split, classes [{index, wnid, name}], num_samples,
                        shards [{name, samples, bytes, sha256}], and how the shards were made
    stats.json          images, pixels, mean_rgb and cov_rgb (0-255 values), eigenvalues and eigenvectors
                        (row i belongs to eigenvalue i) of the RGB covariance, the exact integer sums
    rejects.jsonl       one {source, reason, detail} per input that was not written
    .parts/             the shard job's progress (done markers, job identity, lock): a rerun resumes from it

Readers here check what they read and say which command fixes a problem. No torch or webdataset import:
`preprocess` imports this module without loading the training stack.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FORMAT_VERSION = 1
TOOL = "vggdist-preprocess"
SHARD_COMMAND = f"{TOOL} shard"
MANIFEST = "manifest.json"
STATS = "stats.json"
REJECTS = "rejects.jsonl"
PARTS = ".parts"
SPLITS = ("train", "val")
SAMPLE_MEMBERS = ("cls", "jpg", "json")  # the members of every sample, sorted
SHARD_NAME_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
STATS_KEYS = ("mean_rgb", "eigenvalues", "eigenvectors")  # what training needs from stats.json


class DataError(ValueError):
    """The shards or their metadata are missing or inconsistent; the message says what to run."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------- manifest


def load_manifest(directory: str | Path) -> dict:
    """`directory/manifest.json` as written, unchecked (present only once a shard job has completed)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run (or finish, by rerunning) `{SHARD_COMMAND} ... --out {directory}`"
        )
    return _parse_manifest(path)


def _fix(directory: Path) -> str:
    return f"rerun `{SHARD_COMMAND} --split SPLIT --out {directory}` (it resumes) and `{TOOL} verify {directory}`"


def _parse_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {_fix(path.parent)}") from e


def _checked_manifest(path: Path) -> dict:
    """manifest.json at `path`, with its shard list and sample counts checked for consistency."""
    m = _parse_manifest(path)
    fix = _fix(path.parent)
    try:
        shards = m["shards"]
        counts = [int(s["samples"]) for s in shards]
        names = [str(s["name"]) for s in shards]
        total = int(m["num_samples"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is corrupt (missing or malformed {e}); {fix}") from e
    if not shards or any(c < 0 for c in counts) or any("/" in n for n in names):
        raise DataError(f"{path} lists no shards or invalid ones; {fix}")
    if sum(counts) != total:
        raise DataError(f"{path}: shards hold {sum(counts)} samples but num_samples says {total}; {fix}")
    return m


def split_dir(data_dir: str | Path, split: str) -> Path:
    """The directory holding `split`'s shards: `data_dir` itself if its manifest is that split, else `data_dir/split`."""
    d = Path(data_dir)
    found = None
    for cand in (d, d / split):
        path = cand / MANIFEST
        if path.is_file():
            m = _checked_manifest(path)
            if m.get("split", split) == split:
                return cand
            found = found or (path, m.get("split"))
    held = f" ({found[0]} is split {found[1]!r})" if found else ""
    raise DataError(
        f"no {split} shards under {d}{held}: write them with `{SHARD_COMMAND} --split {split} --out {d / split}`"
    )


def read_manifest(data_dir: str | Path, split: str | None = None) -> dict:
    """manifest.json of `data_dir` (or of its `split` directory, see `split_dir`), checked for consistency."""
    d = split_dir(data_dir, split) if split is not None else Path(data_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: write the shards with `{SHARD_COMMAND} --split SPLIT --out {d}`")
    return _checked_manifest(path)


def data_dirs(data_dir: str | Path) -> tuple[Path, Path | None]:
    """`--data DIR`: (DIR/train, DIR/val or None), absolute; DIR may also be the train split itself.

    Raises DataError naming the command to run when there are no training shards; training runs without
    per-epoch validation when there is no val split.
    """
    root = Path(data_dir).expanduser().resolve()
    train_dir = split_dir(root, "train").resolve()
    try:
        val_dir = split_dir(root, "val").resolve()
    except DataError:
        val_dir = None
    return train_dir, val_dir


def shard_files(data_dir: str | Path, split: str) -> tuple[list[str], list[int]]:
    """Paths of `split`'s shards in manifest order (each checked to exist), and their sample counts."""
    d = split_dir(data_dir, split)
    m = _checked_manifest(d / MANIFEST)
    paths, counts = [], []
    for s in m["shards"]:
        path = d / s["name"]
        if not path.is_file():
            raise DataError(
                f"{path} is listed in {MANIFEST} but missing; rerun `{SHARD_COMMAND} --split {split} --out {d}`"
            )
        paths.append(str(path))
        counts.append(int(s["samples"]))
    return paths, counts


# ------------------------------------------------------------------------------------------------- stats


def read_stats(data_dir: str | Path) -> dict:
    """stats.json (mean RGB, covariance, PCA of the training pixels) of `data_dir` or of `data_dir/train`."""
    path = Path(data_dir) / STATS
    if not path.is_file() and (Path(data_dir) / "train" / STATS).is_file():
        path = Path(data_dir) / "train" / STATS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: write the training shards and their stats with "
            f"`{SHARD_COMMAND} --split train --out {data_dir}`"
        )
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); re-run `{SHARD_COMMAND} --split train` to rewrite it"
        ) from e
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run `{SHARD_COMMAND} --split train`")
    return stats


def check_stats(stats: dict) -> None:
    """Raise unless `stats` has 3 eigenvalues, a 3x3 eigenvector list, and (when it has cov_rgb) row i of the
    eigenvectors is the eigenvector of eigenvalue i: C pᵢ = λᵢ pᵢ (numpy's eigh returns them as columns)."""
    values, vectors = stats["eigenvalues"], stats["eigenvectors"]
    if len(values) != 3 or len(vectors) != 3 or any(len(row) != 3 for row in vectors):
        raise ValueError(f"{STATS} needs 3 eigenvalues and a 3x3 eigenvectors list; re-run preprocessing")
    if "cov_rgb" not in stats:
        return
    cov = stats["cov_rgb"]
    tol = 1e-3 * max(max(values), 1e-9)
    for i in range(3):
        for j in range(3):
            lhs = sum(vectors[i][k] * cov[k][j] for k in range(3))  # (P C)[i][j], C symmetric
            rhs = values[i] * vectors[i][j]
            if abs(lhs - rhs) > tol + 1e-5 * abs(rhs):  # numpy.allclose's test
                raise ValueError(
                    f"{STATS}: eigenvectors[i] is not the eigenvector of eigenvalues[i] of cov_rgb "
                    f"(a transposed matrix?); rewrite it with `{SHARD_COMMAND} --split train`"
                )
