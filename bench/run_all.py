"""Run every benchmark in bench/ and print one combined summary (`make bench` = ``bench/run_all.py --quick``).

Each of preprocess.py, loader.py, train_step.py, allreduce.py, eval.py and startup.py that exists runs in its own
subprocess (so one benchmark's threads, memory and torch settings cannot skew the next), with ``--quick`` when
given and ``--json DIR/<name>.json``; its own table streams through as it runs. The summary lists every row
(ratio > 1: ours is better) and the wall time of each benchmark. Exit status 1 if any benchmark crashed or
wrote no rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Timer  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("preprocess", "loader", "train_step", "allreduce", "eval", "startup")


def run_one(name: str, quick: bool, out_dir: Path) -> tuple[int, float, list[dict]]:
    """Run bench/<name>.py; returns (exit status, seconds, JSON rows)."""
    json_path = out_dir / f"{name}.json"
    json_path.unlink(missing_ok=True)  # rows from an earlier run must not pass for this one's
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--json", str(json_path)]
    if quick:
        cmd.append("--quick")
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    with Timer() as t:
        rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode
    rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    return rc, t.seconds, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--json-dir", type=Path, default=BENCH_DIR / "results", help="where <name>.json go")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = p.parse_args(argv)
    args.json_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only or BENCHMARKS if (BENCH_DIR / f"{n}.py").exists()]

    results = {name: run_one(name, args.quick, args.json_dir) for name in names}

    print(f"\n=== summary ({'--quick' if args.quick else 'full'}; ratio > 1: ours is better)")
    w = max([len(r["name"]) for _, _, rows in results.values() for r in rows] + [20])
    print(f"{'benchmark':<11} {'name':<{w}}  {'unit':<10} {'baseline':>11} {'ours':>11} {'ratio':>8}")
    failed = []
    for name, (rc, seconds, rows) in results.items():
        if rc != 0 or not rows:
            failed.append(name)
            why = f"exit status {rc}" if rc != 0 else "no rows written"
            print(f"{name:<11} FAILED ({why}) after {seconds:.0f} s")
            continue
        for r in rows:
            print(
                f"{name:<11} {r['name']:<{w}}  {r['unit']:<10} {r['baseline']:>11.4g} "
                f"{r['ours']:>11.4g} {r['ratio']:>7.2f}x"
            )
    print("wall time: " + ", ".join(f"{n} {s:.0f} s" for n, (_, s, _) in results.items()))
    print(f"JSON: {args.json_dir}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
