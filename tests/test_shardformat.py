"""vggdist.shardformat: manifest and stats readers, the data-directory layouts, their errors, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_data import fake_stats
from vggdist.shardformat import (
    DataError,
    check_stats,
    data_dirs,
    read_manifest,
    read_stats,
    shard_files,
    shard_name,
    split_dir,
)


def write_manifest(d: Path, split: str, sizes: list[int]) -> None:
    """A split directory whose manifest lists `sizes` samples per shard (the shard files are placeholders)."""
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, n in enumerate(sizes):
        (d / shard_name(split, i)).write_bytes(b"")
        shards.append({"name": shard_name(split, i), "samples": n, "bytes": 0, "sha256": "-"})
    manifest = {"format_version": 1, "split": split, "classes": [], "num_samples": sum(sizes), "shards": shards}
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="vggdist-preprocess shard --split train"):
        shard_files(tmp_path, "train")
    write_manifest(tmp_path / "val", "val", [3])
    with pytest.raises(DataError, match="no train shards"):
        read_manifest(tmp_path / "val", "train")
    (tmp_path / "val" / "manifest.json").write_text('{"split": "val", "shards": [')
    with pytest.raises(DataError, match="not valid JSON.*vggdist-preprocess shard"):
        read_manifest(tmp_path, "val")
    (tmp_path / "val" / "manifest.json").write_text('{"split": "val", "num_samples": 3, "shards": [{"name": "x"}]}')
    with pytest.raises(DataError, match="corrupt"):
        read_manifest(tmp_path, "val")
    write_manifest(tmp_path / "v2", "val", [3, 2])
    (tmp_path / "v2" / "val-000001.tar").unlink()
    with pytest.raises(DataError, match="val-000001.tar is listed in manifest.json but missing"):
        shard_files(tmp_path / "v2", "val")
    write_manifest(tmp_path / "v3", "val", [3, 2])
    manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    (tmp_path / "v3" / "manifest.json").write_text(json.dumps({**manifest, "num_samples": 6}))
    with pytest.raises(DataError, match="shards hold 5 samples but num_samples says 6"):
        read_manifest(tmp_path / "v3")


def test_split_dir_layouts_data_dirs_and_shard_files(tmp_path):
    root = tmp_path / "data"
    write_manifest(root / "train", "train", [2, 3])
    with pytest.raises(DataError, match="no val shards"):
        split_dir(root, "val")
    assert data_dirs(root) == (root / "train", None)  # training without per-epoch validation
    write_manifest(root / "val", "val", [4])
    assert split_dir(root, "train") == root / "train"
    assert split_dir(root / "val", "val") == root / "val"  # a split directory itself
    assert data_dirs(root) == (root / "train", root / "val")
    paths, counts = shard_files(root, "train")
    assert [Path(p).name for p in paths] == ["train-000000.tar", "train-000001.tar"] and counts == [2, 3]
    assert read_manifest(root / "train")["split"] == "train"
    with pytest.raises(DataError, match="vggdist-preprocess shard --split train"):
        data_dirs(tmp_path / "nothing")


def test_stats_reader_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vggdist-preprocess shard"):
        read_stats(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stats.json").write_text(json.dumps(fake_stats()))
    assert read_stats(tmp_path) == read_stats(tmp_path / "train") == fake_stats()  # DIR or DIR/train
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_stats(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"mean_rgb": [1, 2, 3]}))
    with pytest.raises(ValueError, match="lacks"):
        read_stats(tmp_path)
    st = fake_stats()
    check_stats(st)
    with pytest.raises(ValueError, match="transposed"):
        check_stats({**st, "eigenvectors": np.array(st["eigenvectors"]).T.tolist()})  # columns, not rows
    with pytest.raises(ValueError, match="3x3"):
        check_stats({**st, "eigenvalues": st["eigenvalues"][:2]})


def test_preprocess_and_the_format_module_do_not_import_torch():
    code = "import sys, preprocess.cli, vggdist.shardformat; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
