"""Shared plumbing for the benchmarks in bench/: argument parsing, the side-by-side table, the JSON rows.

Every benchmark measures a baseline and ours in the same run and reports the ratio, with ratio > 1 meaning ours is
better (rates: ours / baseline; costs such as seconds or bytes: baseline / ours).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    baseline: float
    ours: float
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.baseline if self.baseline else float("inf")
        return self.baseline / self.ours if self.ours else float("inf")

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("higher_is_better")
        d["ratio"] = round(self.ratio, 4)
        return d


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="small sizes, finishes in about a minute on 2 CPU cores"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help='also write {"rows": [...]} to PATH')
    return p


def report(
    title: str, rows: list[Row], json_path: Path | None = None, notes: list[str] | None = None
) -> None:
    """Print `rows` as a table (baseline, ours, ratio) and optionally write them as JSON, with the notes and the
    machine they were measured on (what `bench/render.py` turns into docs/performance.md)."""
    w = max([len(r.name) for r in rows] + [4])
    print(f"\n{title}")
    print(f"{'name':<{w}}  {'unit':<10} {'baseline':>12} {'ours':>12} {'ratio':>8}")
    print("-" * (w + 48))
    for r in rows:
        print(f"{r.name:<{w}}  {r.unit:<10} {r.baseline:>12.4g} {r.ours:>12.4g} {r.ratio:>7.2f}x")
    for n in notes or []:
        print(f"  note: {n}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "title": title,
            "rows": [r.as_json() for r in rows],
            "notes": notes or [],
            "machine": machine(),
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where and how a benchmark ran: date, CPU, cores, GPU, library versions, quick or full sizes."""
    import PIL
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "quick": "--quick" in sys.argv,
    }


class Timer:
    """`with Timer() as t: ...; t.seconds` using perf_counter."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
