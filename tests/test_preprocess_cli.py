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


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], dict]]:
    """name → (argv changes, environment) of commands that must exit 2 and write nothing."""
    val = fx.write_tar(tmp_path / "val.tar", {"ILSVRC2012_val_00000001.JPEG": fx.rgb_jpeg(40, 30)})
    return {
        "missing source": (["--source", str(tmp_path / "nope")], {}),
        "missing labels": (["--source", str(val), "--labels", str(tmp_path / "gt.txt")], {}),
        "flat tar without labels": (["--source", str(val)], {}),
        "max-side": (["--max-side", "0"], {}),
        "quality": (["--quality", "101"], {}),
        "max-pixels": (["--max-pixels", "0"], {}),
        "max-aspect": (["--max-aspect", "0.5"], {}),
        "max-file-bytes": (["--max-file-bytes", "0"], {}),
        "max-file-bytes unit": (["--max-file-bytes", "lots"], {}),
        "workers": (["--workers", "0"], {}),
        "samples-per-shard": (["--samples-per-shard", "0"], {}),
        "split": (["--split", "test"], {}),
        "http RAY_ADDRESS": ([], {"RAY_ADDRESS": "http://127.0.0.1:1"}),
        "nothing at --address": (["--address", "127.0.0.1:1"], {}),
        "not an address": (["--address", "head-node"], {}),
    }


def test_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path)
    for name, (changes, env) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        argv = [
            "shard",
            "--source",
            str(src),
            "--split",
            "train",
            "--out",
            str(out),
            "--workers",
            "1",
            *changes,
        ]
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()  # argparse's own errors come after its usage block
        assert "error:" in lines[-1] and "Traceback" not in err, (name, err)
        assert len(lines) == 1 or lines[0].startswith("usage:"), (name, err)
        assert not out.exists(), name
    assert "http://127.0.0.1:1" in _exit_2(tmp_path, capsys, monkeypatch, RAY_ADDRESS="http://127.0.0.1:1")


def _exit_2(tmp_path, capsys, monkeypatch, **env) -> str:
    src, out = _folder(tmp_path / "again"), tmp_path / "again-out"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["shard", "--source", str(src), "--split", "train", "--out", str(out)]) == 2
    return capsys.readouterr().err


def test_an_out_that_cannot_hold_this_job_is_refused_before_anything_is_created(tmp_path, capsys):
    src = _folder(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, expect in (
        (foreign, "not empty"),
        (a_file, "not a directory"),
        (src / "dog" / "shards", "inside --source"),
    ):
        argv = ["shard", "--source", str(src), "--split", "train", "--out", str(out), "--workers", "1"]
        assert main(argv) == 2
        assert expect in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # no .parts/ left in someone's directory
    assert a_file.read_text() == "" and not (src / "dog" / "shards").exists()


def test_an_internal_error_prints_its_traceback_and_exits_1(tmp_path, capsys):
    from preprocess.shards import ShardHooks

    def bug(item):
        raise ZeroDivisionError("a bug in a hook")

    src, out = _folder(tmp_path), tmp_path / "out"
    argv = ["shard", "--source", str(src), "--split", "train", "--out", str(out), "--workers", "1"]
    assert main([*argv, "--no-progress"], hooks=ShardHooks(after_rename=bug)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug in a hook" in err and "internal error" in err


def test_max_file_bytes_accepts_units_and_rejects_larger_files_unread(tmp_path, capsys):
    from preprocess.cli import byte_count

    assert [byte_count(t) for t in ("4096", "64M", "64MiB", "1.5k", "2G")] == [
        4096,
        64 << 20,
        64 << 20,
        1536,
        2 << 30,
    ]
    src, out = _folder(tmp_path), tmp_path / "out"
    (src / "dog" / "huge.jpg").write_bytes(fx.rgb_jpeg(40, 40) + bytes(20_000))
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
        "--no-progress",
    ]
    assert main([*argv, "--max-file-bytes", "16k"]) == 0
    assert "too_large 1" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_file_bytes"] == 16384 and manifest["rejected_by_reason"]["too_large"] == 1
