"""The end of a shard job: rejects.jsonl, stats.json and manifest.json assembled from the shards' done-markers.

Written last, each atomically (temp file, fsync, rename), manifest.json after the others: a directory with a
manifest is complete. The schema of these files is `vggdist.shardformat`'s; the summary printed at the end of
`vggdist-preprocess shard` is `JobSummary`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from preprocess import stats as stats_mod
from vggdist.shardformat import FORMAT_VERSION, MANIFEST, REJECTS, STATS, TOOL

if TYPE_CHECKING:
    from preprocess.shards import ShardJob
    from preprocess.sources import Listing


def tool_version() -> str:
    """The installed vggdist version, recorded in manifest.json."""
    try:
        from importlib.metadata import version

        return version("vggdist")
    except Exception:
        return "0+unknown"


def write_json_atomic(path: Path, obj, *, lines: bool = False) -> None:
    """Write `obj` as JSON (or one JSON document per line) to a temp file, fsync it and rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=1) + "\n"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class JobSummary:
    """What a shard job did: counts, sizes, time; `format()` is the command's closing report."""

    out: str
    split: str
    inputs: int
    written: int
    rejected: Counter
    shards: int
    bytes: int
    reencoded: int
    elapsed_s: float
    processed: int  # inputs decoded by this run (fewer than `inputs` when resuming)
    resumed_shards: int

    def format(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items())) or "none"
        rate = self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"{TOOL} shard: {self.split} → {self.out}",
            f"  inputs    {self.inputs:>10,}",
            f"  written   {self.written:>10,}  in {self.shards} shards, {self.bytes / 1e6:,.1f} MB"
            f" ({self.reencoded:,} re-encoded, {self.written - self.reencoded:,} original bytes kept)",
            f"  rejected  {rejected:>10,}  ({reasons}; see {REJECTS})",
            f"  elapsed   {self.elapsed_s:>10.1f} s  ({rate:,.1f} images/s over {self.processed:,} decoded now"
            + (
                f", {self.resumed_shards} shards resumed from an earlier run)" if self.resumed_shards else ")"
            ),
        ]
        return "\n".join(lines)


def finalize(
    out: Path, job: ShardJob, identity: dict, listing: Listing, tasks: list, markers: dict
) -> JobSummary:
    """Merge the markers of every planned shard into rejects.jsonl, stats.json and manifest.json; the summary."""
    rejects = list(listing.rejects)
    moments = stats_mod.RGBMoments()
    shards = []
    for t in tasks:
        m = markers[t.name]
        rejects.extend(m["rejects"])
        moments.merge(stats_mod.RGBMoments.from_json(m["moments"]))
        shards.append({"name": t.name, "samples": m["samples"], "bytes": m["bytes"], "sha256": m["sha256"]})
    written = sum(s["samples"] for s in shards)
    if written + len(rejects) != listing.num_inputs:  # internal invariant: every input accounted for
        raise RuntimeError(
            f"accounting error: {written} written + {len(rejects)} rejected != {listing.num_inputs}"
        )
    by_reason = Counter(r["reason"] for r in rejects)
    write_json_atomic(out / REJECTS, rejects, lines=True)
    write_json_atomic(out / STATS, stats_mod.stats_dict(moments, job.split))
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": tool_version(),
        "split": job.split,
        "source": identity["source"],
        "source_kind": listing.kind,
        "labels": identity["labels"],
        "max_side": job.limits.max_side,
        "quality": job.limits.quality,
        "max_pixels": job.limits.max_pixels,
        "max_aspect": job.limits.max_aspect,
        "max_file_bytes": job.limits.max_file_bytes,
        "samples_per_shard": job.samples_per_shard,
        "seed": job.seed,
        "classes": [{"index": i, "wnid": c.wnid, "name": c.name} for i, c in enumerate(listing.classes)],
        "num_inputs": listing.num_inputs,
        "num_samples": written,
        "num_rejected": len(rejects),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "shards": shards,
        "plan": identity["plan"],
    }
    write_json_atomic(out / MANIFEST, manifest)
    return JobSummary(
        out=str(out),
        split=job.split,
        inputs=listing.num_inputs,
        written=written,
        rejected=by_reason,
        shards=len(shards),
        bytes=sum(s["bytes"] for s in shards),
        reencoded=sum(markers[t.name].get("reencoded", 0) for t in tasks),
        elapsed_s=0.0,
        processed=0,
        resumed_shards=0,
    )
