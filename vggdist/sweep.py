"""The paper's staged plan (§3.1 training, §4 evaluation) as a small DAG of training runs under one MLflow parent.

Plan `paper` (what the study did, Tables 3–6):
  1. A at S=256 from a random init;
  2. A-LRN, B, C, D, E at S=256, initialised from A (the staged init of §3.1);
  3. C, D, E at S=384, initialised from their S=256 runs, lr 1e-3 (§3.1 "to speed-up training of the S = 384 network");
  4. C, D, E with scale jittering S∈[256, 512], fine-tuned from their S=384 runs (§3.1 multi-scale training);
  5. every run evaluated (dense at its Table-4 scale set, which includes its Table-3 scale; multi-crop and combined
     for the jittered runs, Table 5), and the fusion of D and E jittered (Table 6).
Plan `mini`: the same code on the mini preset — A; B and D from A; D jittered from D — small enough for the demo.
A user plan is a YAML file with the same fields as `Plan` (see README).

Stages whose dependencies are done run concurrently, as many at a time as the cluster has room for (each stage is a
Ray task that starts its own TorchTrainer). Rerunning the sweep with the same name skips stages whose MLflow child
run is FINISHED and evaluated, and resumes an interrupted one (same Ray run name → latest checkpoint, same MLflow run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import yaml

from vggdist import tracking
from vggdist.config import Config, preset, scaled_scale

log = logging.getLogger(__name__)

TAG_SWEEP = "vggdist.sweep"  # "parent" on the sweep's run; the parent run id on its children
TAG_SWEEP_NAME = "vggdist.sweep_name"
TAG_PLAN = "vggdist.plan"
TAG_TRAIN_SCALE = "vggdist.train_scale"  # paper-equivalent S label: "256", "384", "256-512"
TAG_EVALUATED = "vggdist.evaluated"
TAG_FUSION_DONE = "vggdist.fusion_done"


@dataclass(frozen=True)
class Stage:
    """One training run of the plan. Scales are in paper units (224-pixel crops) and mapped to the preset's crop."""

    key: str  # unique, e.g. "2-D-S256"
    config: str  # Table 1 column
    train_scale: tuple[int, ...]  # (256,) fixed S or (256, 512) jittered
    init: str = "normal"  # normal | glorot | from-shallower | resume-weights
    init_from: str | None = None  # key of the stage whose checkpoint initialises this one
    lr: float | None = None  # None -> the preset's lr
    epochs: int | None = None  # None -> the preset's epochs
    test_scales: tuple[int, ...] | None = None  # None -> Table 4's set for the training scale
    protocols: tuple[str, ...] = ("dense",)

    @property
    def scale_label(self) -> str:
        return "-".join(str(s) for s in self.train_scale)


@dataclass(frozen=True)
class Plan:
    name: str
    preset: str  # "paper" | "mini"
    stages: tuple[Stage, ...]
    fusion: tuple[tuple[str, ...], ...] = ()  # groups of stage keys whose posteriors are averaged (Table 6)
    fusion_protocols: tuple[str, ...] = ("dense", "multicrop", "combined")
    sets: tuple[str, ...] = field(default=())  # --set overrides for every run

    def __post_init__(self) -> None:
        keys = [s.key for s in self.stages]
        if len(set(keys)) != len(keys):
            raise ValueError(f"plan {self.name}: duplicate stage keys in {keys}")
        for s in self.stages:
            if s.init_from is not None and s.init_from not in keys[: keys.index(s.key)]:
                raise ValueError(
                    f"plan {self.name}: stage {s.key} initialises from {s.init_from!r}, which is not an earlier stage"
                )
            if s.init in ("from-shallower", "resume-weights") and s.init_from is None:
                raise ValueError(f"plan {self.name}: stage {s.key} uses init {s.init} without init_from")
        for group in self.fusion:
            missing = [k for k in group if k not in keys]
            if missing:
                raise ValueError(f"plan {self.name}: fusion group {group} names unknown stages {missing}")


def table4_scales(train_scale: tuple[int, ...]) -> tuple[int, ...]:
    """§4.2: Q = {S-32, S, S+32} for fixed S, {S_min, (S_min+S_max)/2, S_max} for jittered S."""
    if len(train_scale) == 1:
        s = train_scale[0]
        return (s - 32, s, s + 32)
    lo, hi = train_scale
    return (lo, (lo + hi) // 2, hi)


def _stages(
    configs: tuple[str, ...],
    *,
    first_init: str = "normal",
    s384: tuple[str, ...],
    jitter: tuple[str, ...],
    jitter_from_384: bool,
    lr_finetune: float,
    epochs: tuple[int | None, int | None, int | None] = (None, None, None),
) -> tuple[Stage, ...]:
    """Stages 1-4 of the plan; `epochs` per step (A, from-A, fine-tunes), None for the preset's."""
    e_a, e_deep, e_tune = epochs
    out = [Stage("1-A-S256", "A", (256,), init=first_init, epochs=e_a)]
    out += [
        Stage(f"2-{c}-S256", c, (256,), init="from-shallower", init_from="1-A-S256", epochs=e_deep)
        for c in configs
        if c != "A"
    ]
    out += [
        Stage(
            f"3-{c}-S384",
            c,
            (384,),
            init="resume-weights",
            init_from=f"{'1' if c == 'A' else '2'}-{c}-S256",
            lr=lr_finetune,
            epochs=e_tune,
        )
        for c in s384
    ]
    jitter_protocols = ("dense", "multicrop", "combined")
    for c in jitter:
        src = f"3-{c}-S384" if jitter_from_384 else f"{'1' if c == 'A' else '2'}-{c}-S256"
        out.append(
            Stage(
                f"4-{c}-S256-512",
                c,
                (256, 512),
                init="resume-weights",
                init_from=src,
                lr=lr_finetune,
                epochs=e_tune,
                protocols=jitter_protocols,
            )
        )
    return tuple(out)


def builtin_plan(name: str) -> Plan:
    if name == "paper":
        return Plan(
            "paper",
            "paper",
            _stages(
                ("A", "A-LRN", "B", "C", "D", "E"),
                s384=("C", "D", "E"),
                jitter=("C", "D", "E"),
                jitter_from_384=True,
                lr_finetune=1e-3,
            ),
            fusion=(("4-D-S256-512", "4-E-S256-512"),),
        )
    if name == "mini":
        # A (Glorot init: a few epochs are too short for N(0, 1e-2), see vggdist.config.preset); B and D from A;
        # D jittered, fine-tuned straight from D/256 (the S=384 step is skipped to fit the demo's 10-minute budget);
        # fusion of B and jittered D to exercise Table 6's code path.
        return Plan(
            "mini",
            "mini",
            _stages(
                ("A", "B", "D"),
                first_init="glorot",
                s384=(),
                jitter=("D",),
                jitter_from_384=False,
                lr_finetune=1e-3,  # the paper's fine-tuning lr (initial lr / 10), as for S=384 from S=256
                epochs=(3, 2, 2),  # A, then B/D from A, then the jittered fine-tune: the demo's time budget
            ),
            fusion=(("2-B-S256", "4-D-S256-512"),),
        )
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--plan {name!r}: use paper, mini, or a plan YAML file (see README 'Sweeps')")
    return load_plan(path)


def load_plan(path: str | Path) -> Plan:
    d = yaml.safe_load(Path(path).read_text()) or {}
    try:
        stages = tuple(
            Stage(
                **{
                    **s,
                    "train_scale": tuple(s["train_scale"])
                    if isinstance(s["train_scale"], list)
                    else (s["train_scale"],),
                    **({"test_scales": tuple(s["test_scales"])} if s.get("test_scales") else {}),
                    **({"protocols": tuple(s["protocols"])} if s.get("protocols") else {}),
                }
            )
            for s in d["stages"]
        )
        return Plan(
            name=d.get("name", Path(path).stem),
            preset=d.get("preset", "paper"),
            stages=stages,
            fusion=tuple(tuple(g) for g in d.get("fusion", [])),
            sets=tuple(d.get("sets", [])),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"plan file {path}: {e}; each stage needs key, config, train_scale (see README 'Sweeps')"
        ) from None


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(json.loads(json.dumps(asdict(plan))), sort_keys=False)


def stage_config(
    plan: Plan,
    stage: Stage,
    *,
    workers: int | None,
    gpu: bool,
    experiment: str,
    run_name: str,
    sets: list[str],
) -> Config:
    """The Config of one stage: the plan's preset with the stage's model, scales, init and lr."""
    cfg = preset(plan.preset, model=stage.config)
    crop = cfg.data.crop_size
    scale = tuple(scaled_scale(s, crop) for s in stage.train_scale)
    data = replace(
        cfg.data, train_scale=scale[0], scale_jitter=scale if len(scale) == 2 else None, val_scale=None
    )
    test_scales = tuple(
        scaled_scale(q, crop) for q in (stage.test_scales or table4_scales(stage.train_scale))
    )
    cfg = replace(
        cfg,
        data=data,
        eval=replace(cfg.eval, test_scales=test_scales, protocols=stage.protocols),
        optim=replace(cfg.optim, lr=stage.lr or cfg.optim.lr),
        schedule=replace(cfg.schedule, epochs=stage.epochs or cfg.schedule.epochs),
        run=replace(
            cfg.run,
            init=stage.init,
            init_from=f"stage:{stage.init_from}"
            if stage.init_from
            else None,  # resolved when the stage starts
            experiment=experiment,
            run_name=run_name,
            gpu=gpu,
            workers=workers or cfg.run.workers,
        ),
    )
    return cfg.override(list(plan.sets) + list(sets)) if (plan.sets or sets) else cfg


@ray.remote(num_cpus=0)
def _run_stage(
    cfg_dict: dict,
    data_dir: str,
    stage: dict,
    init_from: str | None,
    parent_run_id: str,
    paper_scales: list[int],
    uri: str,
) -> dict[str, Any]:
    """A stage as a Ray task: train (or resume), then evaluate; returns the child run id and checkpoint."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    from vggdist.ray_train import evaluate, train

    cfg = Config.from_dict(cfg_dict)
    if init_from:
        cfg = replace(cfg, run=replace(cfg.run, init_from=init_from))
    tags = {TAG_SWEEP: parent_run_id, TAG_TRAIN_SCALE: stage["scale_label"]}
    result = train(cfg, data_dir, stage=stage["key"], parent_run_id=parent_run_id, extra_tags=tags)
    evaluate(
        result.run_id,
        data_dir,
        protocols=tuple(stage["protocols"]),
        scales=list(cfg.eval.test_scales),
        paper_scales=paper_scales,
        workers=cfg.run.workers,
        log_to_run=True,
        gpu=cfg.run.gpu,
    )
    done = tracking.Tracker.start(run_id=result.run_id, uri=uri)
    done.set_tags({TAG_EVALUATED: "true"})
    done.end("FINISHED")
    return {"run_id": result.run_id, "checkpoint": result.checkpoint, "metrics": result.metrics}


def _finished_children(parent_run_id: str, experiment: str, uri: str) -> dict[str, dict]:
    runs = tracking.find_runs(experiment, filter_string=f"tags.`{TAG_SWEEP}` = '{parent_run_id}'", uri=uri)
    return {
        r["tags"][tracking.TAG_STAGE]: r
        for r in runs
        if r["status"] == "FINISHED" and r["tags"].get(TAG_EVALUATED) == "true"
    }


def _fusion_done(parent_run_id: str, uri: str) -> bool:
    return tracking.get_run(parent_run_id, uri=uri)["tags"].get(TAG_FUSION_DONE) == "true"


def _parent_run(experiment: str, sweep_name: str, plan: Plan, uri: str) -> tracking.Tracker:
    existing = tracking.find_runs(
        experiment,
        filter_string=f"tags.`{TAG_SWEEP_NAME}` = '{sweep_name}' and tags.`{TAG_SWEEP}` = 'parent'",
        uri=uri,
    )
    if existing:
        log.info("resuming sweep %s (MLflow run %s)", sweep_name, existing[-1]["run_id"])
        return tracking.Tracker.start(experiment, run_id=existing[-1]["run_id"], uri=uri)
    t = tracking.Tracker.start(
        experiment,
        run_name=f"sweep-{sweep_name}",
        tags={TAG_SWEEP: "parent", TAG_SWEEP_NAME: sweep_name, TAG_PLAN: plan.name},
        uri=uri,
    )
    t.log_text(plan_to_yaml(plan), "plan.yaml")
    return t


def concurrency(workers_per_run: int, gpu: bool, max_concurrent: int | None = None) -> int:
    """How many stages to run at once: `max_concurrent` when given (e.g. what an autoscaling cluster may grow to),
    else what the cluster holds now, its CPUs (or GPUs) over one run's workers; re-read as stages finish."""
    if max_concurrent:
        return max(1, max_concurrent)
    res = ray.cluster_resources()
    have = res.get("GPU", 0) if gpu else res.get("CPU", 1)
    return max(1, math.floor(have / max(1, workers_per_run)))


def run_sweep(
    data_dir: str,
    *,
    plan: str = "paper",
    workers: int | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    sweep_name: str | None = None,
    address: str | None = None,
    sets: list[str] | None = None,
    gpu: bool = False,
    max_concurrent: int | None = None,
    progress=None,
) -> dict[str, Any]:
    """Run (or resume) the staged plan; returns {stage key: child run id, ...} and the fusion results."""
    from vggdist.ray_train import data_dirs, ensure_ray, evaluate_fusion

    p = builtin_plan(plan)
    data_dirs(data_dir)  # fail early with the preprocessing hint
    sweep_name = sweep_name or f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_ray(address)
    uri = tracking.tracking_uri()
    parent = _parent_run(experiment, sweep_name, p, uri)
    done = _finished_children(parent.run_id, experiment, uri)
    results: dict[str, dict] = {
        k: {"run_id": r["run_id"], "checkpoint": r["tags"].get(tracking.TAG_CHECKPOINT)}
        for k, r in done.items()
    }
    if done:
        log.info("sweep %s: skipping finished stages %s", sweep_name, sorted(done))

    configs = {
        s.key: stage_config(
            p,
            s,
            workers=workers,
            gpu=gpu,
            experiment=experiment,
            run_name=f"{sweep_name}-{s.key}",
            sets=sets or [],
        )
        for s in p.stages
    }
    first = next(iter(configs.values())).run
    workers_per_run = first.workers * (1 if gpu else first.cpus_per_worker)  # slots one run takes
    pending = [s for s in p.stages if s.key not in results]
    running: dict[ray.ObjectRef, Stage] = {}
    while pending or running:
        ready = [s for s in pending if s.init_from is None or s.init_from in results]
        limit = concurrency(workers_per_run, gpu, max_concurrent)
        for s in ready[: max(0, limit - len(running))]:
            pending.remove(s)
            init_ckpt = results[s.init_from]["checkpoint"] if s.init_from else None
            paper_q = list(s.test_scales or table4_scales(s.train_scale))
            ref = _run_stage.remote(
                configs[s.key].to_dict(),
                str(Path(data_dir).resolve()),
                {**asdict(s), "scale_label": s.scale_label},
                init_ckpt,
                parent.run_id,
                paper_q,
                uri,
            )
            running[ref] = s
            log.info("sweep %s: started stage %s", sweep_name, s.key)
        if not running:
            raise RuntimeError(
                f"sweep {sweep_name}: stages {[s.key for s in pending]} wait for stages that did not finish"
            )
        finished, _ = ray.wait(list(running), num_returns=1)
        stage = running.pop(finished[0])
        results[stage.key] = ray.get(
            finished[0]
        )  # raises (and stops the sweep) if the stage failed; rerun resumes
        log.info("sweep %s: stage %s done (run %s)", sweep_name, stage.key, results[stage.key]["run_id"])
        if progress is not None:
            progress(stage.key, results[stage.key])

    summary = {
        "sweep": sweep_name,
        "parent_run_id": parent.run_id,
        "experiment": experiment,
        "stages": {k: v["run_id"] for k, v in results.items()},
    }
    if len(done) == len(p.stages) and _fusion_done(parent.run_id, uri):
        log.info("sweep %s: every stage and the fusion are done already", sweep_name)
        parent.end("FINISHED")
        return {**summary, "fusion": "done (see fusion_results.json on the parent run)"}
    fusion_rows = []
    stage_of = {s.key: s for s in p.stages}
    for group in p.fusion:
        last = stage_of[
            group[-1]
        ]  # Table 6 fuses at the test scales of the (jittered) members: the last one's
        fusion_rows += evaluate_fusion(
            [results[k]["run_id"] for k in group],
            data_dir,
            labels=[f"{stage_of[k].config}/{stage_of[k].scale_label}" for k in group],
            protocols=p.fusion_protocols,
            scales=list(configs[last.key].eval.test_scales),
            paper_scales=list(last.test_scales or table4_scales(last.train_scale)),
            workers=configs[group[0]].run.workers,
            gpu=gpu,
        )
    if p.fusion:
        parent.log_dict({"rows": fusion_rows}, "fusion_results.json")
    parent.set_tags({TAG_FUSION_DONE: "true"})
    parent.end("FINISHED")
    return {**summary, "fusion": fusion_rows}
