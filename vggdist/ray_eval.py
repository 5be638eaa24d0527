"""§4 evaluation on Ray: a run's (or a fusion's) validation images split over N Ray tasks, scored exactly once.

`evaluate` resolves runs to checkpoints, starts `workers` tasks that each score a contiguous slice of the
validation set (`vggdist.eval_run.evaluate_shard_slice`), concatenates their per-image outcomes, checks the
image count against manifest.json, and logs the error rates and the results table to the evaluated run.
`evaluate_fusion` is the same for several runs whose posteriors are averaged (Table 6).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
import torch

from vggdist import checkpoint_store, cluster, runmeta, tracking
from vggdist.data import check_eval_count, expected_eval_count
from vggdist.eval_run import evaluate_shard_slice
from vggdist.outcome_file import log_outcomes
from vggdist.outcomes import Outcomes, results_markdown, results_rows
from vggdist.progress import Progress
from vggdist.shardformat import split_dir

log = logging.getLogger(__name__)


@ray.remote
def _eval_slice(
    checkpoints: list[str],
    val_dir: str,
    rank: int,
    world: int,
    protocols: list[str],
    scales: list[int],
    fraction: float,
) -> Outcomes:
    """Slice `rank` of `world` of the validation images, scored in a Ray task (on a GPU when it was given one)."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return evaluate_shard_slice(
        checkpoints,
        val_dir,
        rank=rank,
        world_size=world,
        protocols=protocols,
        scales=scales,
        device=device,
        multicrop_fraction=fraction,
    )


def _distributed_outcomes(
    checkpoints: list[str],
    val_dir: Path,
    protocols: list[str],
    scales: list[int],
    workers: int,
    gpu: bool,
    fraction: float = 1.0,
    label: str = "",
) -> tuple[Outcomes, str]:
    """The outcomes of `workers` Ray tasks, in manifest order, and the count as a sentence; refuses unless every
    validation image was scored exactly once or skipped as undecodable (`vggdist.data.check_eval_count`)."""
    opts = {"num_gpus": 1} if gpu else {}
    refs = [
        _eval_slice.options(**opts).remote(checkpoints, str(val_dir), r, workers, protocols, scales, fraction)
        for r in range(workers)
    ]
    expected = expected_eval_count(val_dir)
    slices: dict[ray.ObjectRef, Outcomes] = {}
    what = f"{label + ' ' if label else ''}{'+'.join(protocols)} Q={','.join(map(str, scales))}"
    with Progress(f"evaluate {what}", expected) as bar:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            slices[ready[0]] = ray.get(ready[0])
            bar.update(len(slices[ready[0]].keys) + len(slices[ready[0]].skipped))
    outcomes = Outcomes.concat([slices[r] for r in refs])
    count = check_eval_count(len(outcomes.keys), expected, outcomes.skipped)
    if outcomes.skipped:
        log.warning("evaluation of %s: %s", val_dir, count)
    return outcomes, count


def _checkpoint_of(run_or_ckpt: str, uri: str, flag: str = "--run") -> tuple[str, str | None]:
    """(checkpoint path, MLflow run id or None) for a run id or a checkpoint path (`flag`: where it came from)."""
    path = tracking.resolve_checkpoint(run_or_ckpt, uri=uri, flag=flag)
    run_id = None if os.path.exists(run_or_ckpt) or "://" in run_or_ckpt else run_or_ckpt
    return path, run_id or checkpoint_store.read_meta(path).get("mlflow_run_id")


def evaluate(
    run_or_checkpoint: str,
    data_dir: str,
    *,
    protocols: tuple[str, ...] | None = None,
    scales: list[int] | None = None,
    paper_scales: list[int] | None = None,
    ensemble: list[str] | None = None,
    workers: int = 2,
    split: str = "val",
    address: str | None = None,
    log_to_run: bool = True,
    gpu: bool = False,
    multicrop_fraction: float | None = None,
) -> dict[str, Any]:
    """§4 evaluation of a run (fused with `ensemble` runs when given) on the validation shards, with `protocols`
    at `scales` (default: the run's `eval.protocols` and `eval.test_scales`); multi-crop and combined on the
    stated subset `multicrop_fraction` of the images (default: the run's eval config).

    Logs `eval/<protocol>/<scales>/top1_err|top5_err` with their 95 % Wilson bounds (`top1_lo|top1_hi|...`),
    the `eval_results` table and the per-image outcomes (`eval_outcomes.npz`, `vggdist.outcome_file`) to the
    evaluated run (for an ensemble: to the first run, with the members listed). Returns {"rows": [...],
    "markdown": str, "run_id": the evaluated run or None, "outcomes": each image's hits per (protocol, scales),
    in manifest order, "outcomes_meta": what `outcomes_file` records about them}.
    """
    uri = tracking.tracking_uri()
    val_dir = split_dir(data_dir, split)
    members = [_checkpoint_of(run_or_checkpoint, uri)] + [_checkpoint_of(r, uri, "--ensemble") for r in ensemble or []]
    cluster.connect(address, include_dashboard=False)  # plain tasks: no Ray Train, no dashboard needed
    run_dir = os.path.dirname(members[0][0].rstrip("/"))  # <storage>/<run name>/epoch_NNN
    run_spool = tracking.existing_spool(run_dir)  # None for a checkpoint outside any vggdist run storage
    if run_spool and tracking.replay_pending(os.path.dirname(run_dir)) and members[0][0] != run_or_checkpoint:
        members[0] = _checkpoint_of(run_or_checkpoint, uri)  # the replay may have moved its checkpoint tag
    cfg = checkpoint_store.load_config(members[0][0])
    scales = list(scales or cfg.eval.test_scales)
    fraction = cfg.eval.multicrop_fraction if multicrop_fraction is None else multicrop_fraction
    protocols = tuple(protocols or cfg.eval.protocols)
    # which run the progress line is about (a sweep evaluates several at once): its storage directory's name
    label = os.path.basename(run_dir) + (f" + {len(members) - 1} more" if ensemble else "")
    outcomes, count = _distributed_outcomes(
        [m[0] for m in members], val_dir, list(protocols), scales, max(1, workers), gpu, fraction, label
    )
    rows = results_rows(outcomes.counts(), scales, paper_scales)
    models = [m[1] or m[0] for m in members]
    if ensemble:
        for r in rows:
            r["models"] = models
    run_id = members[0][1]
    meta = {
        "models": models,
        "split": split,
        runmeta.TAG_MANIFEST: runmeta.manifest_hash(val_dir),
        "test_scales": list(scales),
        "paper_test_scales": list(paper_scales or scales),
        "multicrop_fraction": fraction,  # multi-crop and combined scored the images `outcomes.in_subset` picks
        "count": count,  # every listed image counted, or skipped as undecodable (their keys below)
        "skipped": list(outcomes.skipped),
    }
    if log_to_run and run_id:
        # through the run's spool: kept if MLflow is down; a temporary one (and a warning) for foreign checkpoints
        tracker = tracking.Tracker.attach(run_id, run_spool, uri=uri, wait_s=cfg.run.mlflow_wait_s)
        prefix = runmeta.EVAL_FUSION if ensemble else runmeta.EVAL
        metrics = {
            runmeta.eval_metric_name(r["protocol"], r["scales"], kind, prefix): r[kind]
            for r in rows
            for kind in runmeta.ERROR_KINDS + runmeta.CI_KINDS
        }
        tracker.log_metrics(metrics, step=0)
        tracker.set_tags({runmeta.TAG_EVAL_COUNT: count})
        artifact = runmeta.FUSION_EVAL_RESULTS if ensemble else runmeta.EVAL_RESULTS
        tracking.log_eval_table(tracker, rows, name=artifact)
        name = runmeta.FUSION_EVAL_OUTCOMES if ensemble else runmeta.EVAL_OUTCOMES
        log_outcomes(tracker, outcomes, meta, name)
        tracker.close()
    return {
        "rows": rows,
        "markdown": results_markdown(rows) + (f"\n\n{count}\n" if outcomes.skipped else ""),
        "run_id": run_id,
        "outcomes": outcomes,
        "outcomes_meta": meta,
        "count": count,
    }


def evaluate_fusion(
    run_ids: list[str],
    data_dir: str,
    *,
    labels: list[str],
    protocols: tuple[str, ...],
    scales: list[int],
    paper_scales: list[int] | None = None,
    workers: int = 2,
    gpu: bool = False,
) -> dict[str, Any]:
    """Table 6: the posteriors of several runs averaged over all `scales`. Returns {"rows": the multi-scale rows,
    carrying the member labels and run ids; "outcomes", "outcomes_meta": per image, as `evaluate` returns them}."""
    out = evaluate(
        run_ids[0],
        data_dir,
        protocols=protocols,
        scales=scales,
        paper_scales=paper_scales,
        ensemble=run_ids[1:],
        workers=workers,
        log_to_run=False,
        gpu=gpu,
    )
    rows = [r for r in out["rows"] if len(r["scales"]) == len(scales)]  # multi-scale rows only, as in Table 6
    for r in rows:
        r["models"] = labels
        r["run_ids"] = run_ids
    meta = {**out["outcomes_meta"], "models": labels, "run_ids": run_ids}
    return {"rows": rows, "outcomes": out["outcomes"], "outcomes_meta": meta}
