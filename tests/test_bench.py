"""Benchmarks train_step / allreduce / eval / run_all at their smallest size, as subprocesses (as run_all runs them)."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import render, run_all  # noqa: E402


def _run(script: str, tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows
    for row in rows:
        assert set(row) == {"name", "unit", "baseline", "ours", "ratio"}, row
        for key in ("baseline", "ours", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, row
        assert row["name"] in proc.stdout  # the table was printed too
    return rows


def test_train_step_smoke(tmp_path):
    rows = _run("train_step", tmp_path)
    assert [r["name"] for r in rows] == ["VGG-11 img/s fp32 vs bf16+cl"]  # no CUDA: no compile, no MFU
    assert rows[0]["unit"] == "img/s"


@pytest.mark.slow
def test_allreduce_smoke(tmp_path):
    rows = {r["name"]: r for r in _run("allreduce", tmp_path)}
    bf16, powersgd = rows["bytes/step none vs bf16"], rows["bytes/step none vs powersgd"]
    assert bf16["ratio"] == pytest.approx(2.0, rel=1e-3)  # counted, not assumed: bf16 is half of fp32
    assert powersgd["ratio"] > 10  # even on the mini VGG-16, whose biases are a larger share
    assert rows["step time none vs bf16"]["unit"] == "s"


def test_eval_smoke(tmp_path):
    (row,) = _run("eval", tmp_path)
    assert row["name"].startswith("mini VGG-16")
    assert row["ratio"] > 1.5  # 6 dense passes per image vs 150 crop passes: dense must be cheaper


@pytest.mark.slow
def test_startup_smoke(tmp_path):
    rows = {r["name"]: r for r in _run("startup", tmp_path)}
    assert set(rows) == {"1 worker: wall", "1 worker: epoch", "1 worker: fixed start-up"}
    wall, epoch = rows["1 worker: wall"], rows["1 worker: epoch"]
    assert wall["unit"] == "s" and epoch["ours"] < wall["ours"] and epoch["baseline"] < wall["baseline"]


def test_run_all_collects_rows_and_fails_on_a_crash(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "eval.py").write_text(
        textwrap.dedent(
            """
            import json, sys
            path = sys.argv[sys.argv.index("--json") + 1]
            quick = "--quick" in sys.argv
            row = {"name": "fake", "unit": "img/s", "baseline": 1.0, "ours": 3.0, "ratio": 3.0}
            json.dump({"rows": [row], "quick": quick}, open(path, "w"))
            """
        )
    )
    (bench / "loader.py").write_text("raise SystemExit('boom')\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", bench)
    out = tmp_path / "results"
    assert run_all.main(["--quick", "--json-dir", str(out)]) == 1
    text = capsys.readouterr().out
    assert "loader      FAILED (exit status 1)" in text
    assert "fake" in text and "3.00x" in text
    assert json.loads((out / "eval.json").read_text())["quick"] is True
    assert "train_step" not in text  # missing benchmarks are skipped, not failures

    (bench / "loader.py").unlink()
    assert run_all.main(["--json-dir", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["quick"] is False


def test_render_writes_one_section_per_benchmark(tmp_path):
    row = {"name": "dense vs multi-crop", "unit": "img/s", "baseline": 6.25, "ours": 41.5, "ratio": 6.64}
    machine = {"date": "2026-12-03", "cpu": "x86", "cores": 2, "gpu": None, "quick": True}
    doc = {"title": "Evaluation", "rows": [row], "notes": ["device: CPU"], "machine": machine}
    (tmp_path / "eval.json").write_text(json.dumps(doc))
    page = render.render(tmp_path)
    assert page.startswith("# Performance") and "do not edit by hand" in page
    assert "| dense vs multi-crop | img/s | 6.25 | 41.5 | 6.64× |" in page
    assert "- device: CPU" in page and "2026-12-03, x86 (2 cores), no GPU" in page and "quick sizes" in page
    assert "Evaluation cost (§3.2)" in page  # what bench/eval.py measures, from its docstring
    assert "## Evaluation\n\n`bench/eval.py`, measured 2026-12-03" in page
    assert page.count("Not run yet: `python bench/") == len(run_all.BENCHMARKS) - 1
