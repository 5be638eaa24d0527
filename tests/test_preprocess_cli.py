"""preprocess.cli: `vggdist-preprocess shard / verify / stats` exit codes, messages, summary; jobs/preprocess.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from preprocess.cli import main

try:
    from tests import preprocess_fixtures as fx
except ImportError:
    import preprocess_fixtures as fx

REPO = Path(__file__).resolve().parent.parent


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    fx.make_image_folder(root, ["dog", "cat"], per_class=3)
    (root / "cat" / "broken.jpg").write_bytes(fx.image_kinds()["garbage"])
    return root


def test_shard_verify_stats_round_trip_with_a_summary_that_adds_up(tmp_path, capsys):
    src, out = _folder(tmp_path), tmp_path / "out"
    argv = [
        "shard",
        "--source",
        str(src),
        "--split",
        "val",
        "--out",
        str(out),
        "--workers",
        "1",
        "--samples-per-shard",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "inputs             7" in text and "written            6" in text
    assert "rejected           1  (undecodable 1" in text and "images/s" in text and "MB" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["wnid"] for c in manifest["classes"]] == ["cat", "dog"]
    keys = [json.loads(line)["source"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert keys == [str(src / "cat" / "broken.jpg")]
    assert main(["verify", str(out)]) == 0
    assert main(["stats", str(out)]) == 0
    assert "mean RGB" in capsys.readouterr().out


def test_verify_exits_nonzero_on_a_corrupted_shard(tmp_path, capsys):
    src, out = _folder(tmp_path), tmp_path / "out"
    assert (
        main(
            [
                "shard",
                "--source",
                str(src),
                "--split",
                "train",
                "--out",
                str(out),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    shard = out / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048] + b"\1" * 2048)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "sha256" in capsys.readouterr().out


def test_usage_and_input_errors_exit_2_with_one_line_naming_the_fix(tmp_path, capsys):
    src, out = _folder(tmp_path), tmp_path / "out"
    base = [
        "shard",
        "--source",
        str(src),
        "--split",
        "train",
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--max-side", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "max_side" in err and len(err.splitlines()) == 1
    assert main([*base, "--max-side", "256", "--overwrite"]) == 0
    assert (
        main(["shard", "--source", str(tmp_path / "nope"), "--split", "train", "--out", str(tmp_path / "o2")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--quality", "0", "--overwrite"]) == 2
    assert main(["shard", "--split", "train"]) == 2  # argparse: --source and --out missing
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_module_and_ray_job_entry_points_run(tmp_path):
    for cmd in (
        [sys.executable, "-m", "preprocess", "--help"],
        [sys.executable, "jobs/preprocess.py", "verify", "-h"],
    ):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage" in res.stdout, res.stderr
    assert len((REPO / "jobs" / "preprocess.py").read_text().splitlines()) <= 30
