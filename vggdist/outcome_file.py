"""Per-image evaluation outcomes on disk: the artifact that lets `vggdist report` run paired tests after the fact.

Every evaluation (`vggdist evaluate`, a sweep stage, a fusion) stores, next to its error rates, which images each
setting (protocol, scales) classified correctly: `eval_outcomes.npz` on the evaluated run. Two runs scored on the
same images can then be compared image by image (McNemar, `vggdist.significance`) long after their evaluations,
without rerunning them.

The file is a compressed numpy ``.npz`` with no pickles (``np.load(allow_pickle=False)`` reads it):

- ``meta``: UTF-8 JSON (as uint8) — ``format`` (`FORMAT`), ``settings`` (one entry per row: protocol, scales,
  paper_scales), ``n`` (keys stored), plus whatever the writer adds (run ids, split, data manifest hash);
- ``keys``: the sample keys, once, UTF-8 joined by newlines;
- ``top1``, ``top5``: (settings, ⌈n/8⌉) uint8, each setting's hits packed 8 per byte (``np.packbits``);
- ``scored``: the same shape, which keys each setting scored (all of them unless a protocol was run on a stated
  subset of the images).

At ImageNet scale (50,000 images, ~15 settings) that is 3 bits per image and setting plus the keys once: well under
a megabyte compressed. numpy only (no torch, no MLflow), so the report reads it without the training stack.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vggdist.outcomes import EvalKey, Outcomes
from vggdist.significance import ErrorRate

FORMAT = "vggdist.eval_outcomes/1"
METRICS = ("top1", "top5")


@dataclass(frozen=True)
class RowOutcome:
    """One setting's per-image result: image `keys[i]` was a top-1 / top-5 hit iff `top1[i]` / `top5[i]`."""

    keys: np.ndarray  # str, unique sample keys
    top1: np.ndarray  # bool
    top5: np.ndarray  # bool

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.top1) == len(self.top5):
            raise ValueError(
                f"a row needs one hit per key: {len(self.keys)} keys, {len(self.top1)} top-1, "
                f"{len(self.top5)} top-5"
            )

    @property
    def n(self) -> int:
        return len(self.keys)

    def hits(self, metric: str) -> np.ndarray:
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: use one of {', '.join(METRICS)}")
        return self.top1 if metric == "top1" else self.top5

    def error_rate(self, metric: str = "top1") -> ErrorRate:
        """The error rate in % with its n and 95 % Wilson interval."""
        return ErrorRate(int(self.n - self.hits(metric).sum()), self.n)


@dataclass
class OutcomeFile:
    """What one `eval_outcomes.npz` holds: every setting's `RowOutcome` and their paper-unit scales."""

    meta: dict[str, Any]
    rows: dict[EvalKey, RowOutcome]
    paper_scales: dict[EvalKey, tuple[int, ...]] = field(default_factory=dict)

    def find(self, protocol: str, paper_scales: Sequence[int]) -> RowOutcome | None:
        """The row of `protocol` at these paper-unit test scales (order ignored), or None."""
        want = tuple(sorted(int(q) for q in paper_scales))
        for key, row in self.rows.items():
            qs = self.paper_scales.get(key, key.scales)
            if key.protocol == protocol and tuple(sorted(qs)) == want:
                return row
        return None


def _text(a: np.ndarray) -> str:
    return a.tobytes().decode("utf-8")


def _bytes(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)


def write_rows(
    path: str | os.PathLike,
    rows: Mapping[EvalKey, RowOutcome],
    *,
    paper_scales: Mapping[EvalKey, Sequence[int]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write `rows` (settings → per-image hits, each over its own images) as one outcomes file at `path`.

    The keys are stored once: the union of every row's keys, in first-seen order. The file appears whole or not
    at all (written under a temporary name, then renamed)."""
    if not rows:
        raise ValueError("no evaluation settings to store")
    index: dict[str, int] = {}
    for row in rows.values():
        if len(set(row.keys.tolist())) != row.n:
            raise ValueError("sample keys must be unique within an evaluated row")
        for k in row.keys.tolist():
            if "\n" in k:
                raise ValueError(f"sample key {k!r} contains a newline")
            index.setdefault(k, len(index))
    n = len(index)
    packed = {m: [] for m in (*METRICS, "scored")}
    settings = []
    for key, row in rows.items():
        pos = np.fromiter((index[k] for k in row.keys.tolist()), dtype=np.int64, count=row.n)
        for name, values in (("top1", row.top1), ("top5", row.top5), ("scored", np.ones(row.n, bool))):
            full = np.zeros(n, dtype=bool)
            full[pos] = values
            packed[name].append(np.packbits(full))
        qs = (paper_scales or {}).get(key, key.scales)
        settings.append({"protocol": key.protocol, "scales": list(key.scales), "paper_scales": list(qs)})
    header = {**(meta or {}), "format": FORMAT, "settings": settings, "n": n}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            meta=_bytes(json.dumps(header)),
            keys=_bytes("\n".join(index)),
            **{name: np.stack(arrays) for name, arrays in packed.items()},
        )
    os.replace(tmp, path)


def write_outcomes(
    path: str | os.PathLike,
    outcomes: Outcomes,
    *,
    paper_scales: Mapping[int, int] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write an evaluation's `Outcomes`; `paper_scales` maps each test scale Q to its paper-unit equivalent
    (e.g. 37 → 256 at crop 32). A setting scored on a stated subset (`Outcomes.scored`) keeps only those images."""
    keys = np.array(outcomes.keys, dtype=str)
    rows = {}
    for k in outcomes.top1:
        m = outcomes.scored_mask(k)
        rows[k] = RowOutcome(keys[m], outcomes.top1[k][m], outcomes.top5[k][m])
    to_paper = dict(paper_scales or {})
    write_rows(
        path,
        rows,
        paper_scales={k: [to_paper.get(q, q) for q in k.scales] for k in rows},
        meta=meta,
    )


def read_outcomes(path: str | os.PathLike) -> OutcomeFile:
    """Read an outcomes file; a file that is not one (or of an unknown format version) raises ValueError."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            meta = json.loads(_text(z["meta"]))
            keys_text = _text(z["keys"])
            arrays = {name: z[name] for name in (*METRICS, "scored")}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a vggdist outcomes file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: outcomes format {meta.get('format')!r}, this vggdist reads {FORMAT!r}")
    n = int(meta["n"])
    all_keys = np.array(keys_text.split("\n") if n else [], dtype=str)
    if len(all_keys) != n:
        raise ValueError(f"{path}: {len(all_keys)} keys stored, the header says {n}")
    rows: dict[EvalKey, RowOutcome] = {}
    paper: dict[EvalKey, tuple[int, ...]] = {}
    for i, s in enumerate(meta["settings"]):
        key = EvalKey(s["protocol"], tuple(int(q) for q in s["scales"]))
        bits = {name: np.unpackbits(a[i], count=n).astype(bool) for name, a in arrays.items()}
        mask = bits["scored"]
        rows[key] = RowOutcome(all_keys[mask], bits["top1"][mask], bits["top5"][mask])
        paper[key] = tuple(int(q) for q in s.get("paper_scales") or s["scales"])
    return OutcomeFile({k: v for k, v in meta.items() if k != "settings"}, rows, paper)


def log_outcomes(tracker: Any, outcomes: Outcomes, meta: dict[str, Any], artifact_file: str) -> None:
    """Per-image outcomes as the artifact `artifact_file` (e.g. eval_outcomes.npz) of a `vggdist.tracking.Tracker`'s
    run (copied into its durable spool now); `meta` as `vggdist.ray_eval.evaluate` returns it (`test_scales` →
    `paper_test_scales` label the settings in paper units)."""
    with tempfile.TemporaryDirectory(prefix="vggdist-outcomes-") as tmp:
        path = Path(tmp) / os.path.basename(artifact_file)
        paper = dict(zip(meta["test_scales"], meta["paper_test_scales"], strict=True))
        write_outcomes(path, outcomes, paper_scales=paper, meta=meta)
        tracker.log_artifact(path, os.path.dirname(artifact_file) or None)
