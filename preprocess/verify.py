"""`vggdist-preprocess verify DIR`: every shard checked against manifest.json, stats.json and rejects.jsonl.

Bytes, sha256, sample counts, members, decodability and class indices per shard (optionally in parallel
processes); keys unique across shards; the exact RGB moments recomputed from the stored JPEGs must equal the ones
stats.json recorded. Returns the problems found; an empty list means the directory is intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from preprocess import stats as stats_mod
from preprocess.images import decode_rgb
from vggdist.shardformat import (
    MANIFEST,
    REJECTS,
    SAMPLE_MEMBERS,
    SHARD_NAME_RE,
    STATS,
    load_manifest,
    read_stats,
)


@dataclass
class _ShardCheck:
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    moments: dict | None = None


def _check_shard(out_dir: str, entry: dict, num_classes: int, wnid_index: dict[str, int]) -> _ShardCheck:
    res = _ShardCheck()
    name = entry["name"]
    path = Path(out_dir) / name
    if not path.is_file():
        res.problems.append(f"{name}: missing")
        return res
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        res.problems.append(f"{name}: {len(data)} bytes, manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        res.problems.append(f"{name}: sha256 differs from the manifest")
    moments = stats_mod.RGBMoments()
    try:
        samples = _read_samples(data)
    except (tarfile.TarError, ValueError) as e:
        res.problems.append(f"{name}: not a readable tar ({e})")
        return res
    for key, members in samples.items():
        where = f"{name}:{key}"
        if tuple(sorted(members)) != SAMPLE_MEMBERS:
            res.problems.append(f"{where}: members {sorted(members)}, expected cls, jpg, json")
            continue
        try:
            meta = json.loads(members["json"])
            cls = int(members["cls"].decode("ascii"))
            pixels = decode_rgb(members["jpg"])
        except Exception as e:
            res.problems.append(f"{where}: does not decode ({type(e).__name__}: {e})")
            continue
        if not 0 <= cls < num_classes or wnid_index.get(meta.get("wnid")) != cls:
            res.problems.append(
                f"{where}: cls {cls} does not match wnid {meta.get('wnid')!r} in the class list"
            )
        if (meta.get("width"), meta.get("height")) != (pixels.shape[1], pixels.shape[0]):
            res.problems.append(
                f"{where}: json says {meta.get('width')}x{meta.get('height')}, jpg is "
                f"{pixels.shape[1]}x{pixels.shape[0]}"
            )
        moments.add_image(pixels)
        res.keys.append(key)
    if len(samples) != entry["samples"]:
        res.problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    res.moments = moments.to_json()
    return res


def _read_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                raise ValueError(f"member {m.name} is not a regular file")
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def verify(out_dir: str | Path, workers: int = 1) -> list[str]:
    """Check every shard against manifest.json (bytes, sha256, sample counts, members, decodability, class
    indices, sizes), keys unique, rejects.jsonl and stats.json consistent. Returns the problems found (none = ok)."""
    out = Path(out_dir)
    manifest = load_manifest(out)
    problems = []
    classes = manifest["classes"]
    wnid_index = {c["wnid"]: c["index"] for c in classes}
    listed = {s["name"] for s in manifest["shards"]}
    for p in sorted(out.iterdir()):
        if SHARD_NAME_RE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: a shard file not listed in {MANIFEST}")
    args = [(str(out), e, len(classes), wnid_index) for e in manifest["shards"]]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            checks = list(pool.map(_check_shard, *zip(*args, strict=True)))
    else:
        checks = [_check_shard(*a) for a in args]
    moments, seen = stats_mod.RGBMoments(), Counter()
    for c in checks:
        problems.extend(c.problems)
        seen.update(c.keys)
        if c.moments is not None:
            moments.merge(stats_mod.RGBMoments.from_json(c.moments))
    dupes = [k for k, n in seen.items() if n > 1]
    if dupes:
        problems.append(f"{len(dupes)} keys occur more than once, e.g. {dupes[0]}")
    total = sum(s["samples"] for s in manifest["shards"])
    if total != manifest["num_samples"]:
        problems.append(f"shards hold {total} samples, num_samples says {manifest['num_samples']}")
    if manifest["num_samples"] + manifest["num_rejected"] != manifest.get(
        "num_inputs", total + manifest["num_rejected"]
    ):
        problems.append("num_samples + num_rejected != num_inputs")
    rejects_path = out / REJECTS
    n_rejects = len(rejects_path.read_text().splitlines()) if rejects_path.is_file() else 0
    if n_rejects != manifest["num_rejected"]:
        problems.append(f"{REJECTS} has {n_rejects} lines, num_rejected says {manifest['num_rejected']}")
    try:
        recorded = read_stats(out).get("exact")
    except FileNotFoundError:
        recorded = None
        problems.append(f"{STATS} is missing")
    if recorded is not None and not problems and recorded != moments.to_json():
        problems.append(f"{STATS} does not match the pixels in the shards")
    return problems
