"""The paper's staged plan (§3.1 training, §4 evaluation) as data: stages of training runs, a DAG by initialisation.

Plan `paper` (what the study did, Tables 3–6):
  1. A at S=256 from a random init;
  2. A-LRN, B, C, D, E at S=256, initialised from A (the staged init of §3.1);
  3. C, D, E at S=384, initialised from their S=256 runs, lr 1e-3 (§3.1 "to speed-up training of the S = 384 network");
  4. C, D, E with scale jittering S∈[256, 512], fine-tuned from their S=384 runs (§3.1 multi-scale training);
  5. every run evaluated (dense at its Table-4 scale set, which includes its Table-3 scale; multi-crop and combined
     for the jittered runs, Table 5), and the fusion of D and E jittered (Table 6).
Plan `mini`: the same code on the mini preset — A; B and D from A; D jittered from D — small enough for the demo.
Plan `degradation` (He et al. 2016, Table 2 / Fig. 4): plain-18, plain-34, resnet-18 and resnet-34 on the
`resnet-paper` preset, each from scratch (He init), independent, so they train concurrently on the same shards;
evaluated with the 10-crop test at Q=256 and the fully-convolutional test at Q in {224, 256, 384, 480, 640}.
Plan `degradation-mini`: the same comparison at CIFAR size (§4.2, Table 6 / Fig. 6) on the `resnet-mini` preset:
plain-20, plain-56, resnet-20, resnet-56, evaluated with the centre crop and the 10-crop test at Q=256 (paper
units; 37 at crop 32), which a 2-core machine can afford.
A user plan is a YAML file with the same fields as `Plan` (see README). Scales are in paper units (224-pixel
crops); `stage_config` maps them to the preset's crop. `vggdist.sweep` runs a plan. No ray or mlflow here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from vggdist import paper, resnet_paper
from vggdist.config import RESNET_PROTOCOLS, Config, preset
from vggdist.runmeta import COMBINED, DENSE, MULTICROP, SINGLE, TENCROP

TABLE5_PROTOCOLS = (DENSE, MULTICROP, COMBINED)  # what the jittered runs and the fusion are scored with
BUILTIN_PLANS = ("paper", "mini", "study", "degradation", "degradation-mini")
FINETUNE_LR = 1e-3  # §3.1: the S=384 net "was trained with a smaller initial learning rate of 10^-3"


@dataclass(frozen=True)
class Stage:
    """One training run of the plan. Scales are in paper units (224-pixel crops) and mapped to the preset's crop."""

    key: str  # unique, e.g. "2-D-S256"
    config: str  # Table 1 column
    train_scale: tuple[int, ...]  # (256,) fixed S or (256, 512) jittered
    init: str | None = None  # None -> the preset's run.init | normal | glorot | he | from-shallower | resume-weights
    init_from: str | None = None  # key of the stage whose checkpoint initialises this one
    lr: float | None = None  # None -> the preset's lr
    epochs: int | None = None  # None -> the preset's epochs
    test_scales: tuple[int, ...] | None = None  # None -> Table 4's set (VGG), He et al.'s §3.4 set (plain/resnet)
    protocols: tuple[str, ...] = (DENSE,)

    @property
    def scale_label(self) -> str:
        """ "256", "384", "256-512": the paper-equivalent S of the `vggdist.train_scale` tag."""
        return paper.scale_label(self.train_scale)

    @property
    def paper_test_scales(self) -> tuple[int, ...]:
        """Its test scales Q in paper units: `test_scales`, else Table 4's set for the training scale (VGG) or
        He et al.'s multi-scale test set (their plain and residual nets)."""
        if self.test_scales:
            return self.test_scales
        if self.config in resnet_paper.CONFIGS:
            return resnet_paper.TEST_SCALES
        return paper.multi_test_scales(self.train_scale)


@dataclass(frozen=True)
class Plan:
    """Stages (a DAG by `init_from`), fusion groups and --set overrides; checked when built."""

    name: str
    preset: str  # "paper" | "mini"
    stages: tuple[Stage, ...]
    fusion: tuple[tuple[str, ...], ...] = ()  # groups of stage keys whose posteriors are averaged (Table 6)
    fusion_protocols: tuple[str, ...] = TABLE5_PROTOCOLS
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
                protocols=TABLE5_PROTOCOLS,
            )
        )
    return tuple(out)


def _degradation(name: str, preset_name: str, configs: tuple[str, ...], **stage: object) -> Plan:
    """He et al.'s plain / residual comparison: one independent stage per network, from scratch (the preset's He
    init), at the paper's scale augmentation S in [256, 480]; `stage` holds the evaluation fields."""
    return Plan(
        name,
        preset_name,
        tuple(Stage(c, c, resnet_paper.TRAIN_SCALE_JITTER, **stage) for c in configs),  # type: ignore[arg-type]
        fusion=(),
    )


def builtin_plan(name: str) -> Plan:
    """One of `BUILTIN_PLANS`, or the path of a plan YAML file."""
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
        return _mini_plan()
    if name == "study":
        return _study_plan()
    if name == "degradation":
        return _degradation(
            "degradation",
            "resnet-paper",
            resnet_paper.names_of_layout("imagenet"),
            test_scales=resnet_paper.TEST_SCALES,
            protocols=RESNET_PROTOCOLS,
        )
    if name == "degradation-mini":
        # Table 2's 10-crop test (and the centre crop) at Q=256 only: the fully-convolutional test at five scales
        # would cost ~4x the 10-crop on a CPU; add it with a plan file (test_scales, protocols) where that is cheap.
        return _degradation(
            "degradation-mini",
            "resnet-mini",
            resnet_paper.names_of_layout("cifar"),
            test_scales=(256,),
            protocols=(SINGLE, TENCROP),
        )
    path = Path(name)
    if not path.is_file():
        raise ValueError(
            f"--plan {name!r}: use {', '.join(BUILTIN_PLANS)}, or a plan YAML file (see README 'Sweeps')"
        )
    return load_plan(path)


def load_plan(path: str | Path) -> Plan:
    """A plan YAML file: the fields of `Plan` and `Stage` (see README); scales in paper units."""
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
    """The plan as YAML, as `load_plan` reads it (logged as the sweep's plan.yaml)."""
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
    """The Config of one stage: the plan's preset with the stage's model, scales, init and lr (the preset's own
    init, epochs and lr where the stage leaves them None)."""
    cfg = preset(plan.preset, model=stage.config)
    crop = cfg.data.crop_size
    scale = tuple(paper.to_crop(s, crop) for s in stage.train_scale)
    # the preset's validation scale stays: None (VGG: Q = S, or 384 when jittered), He et al.'s Q = 256
    data = replace(cfg.data, train_scale=scale[0], scale_jitter=scale if len(scale) == 2 else None)
    test_scales = tuple(paper.to_crop(q, crop) for q in stage.paper_test_scales)
    cfg = replace(
        cfg,
        data=data,
        eval=replace(cfg.eval, test_scales=test_scales, protocols=stage.protocols),
        optim=replace(cfg.optim, lr=stage.lr or cfg.optim.lr),
        schedule=replace(cfg.schedule, epochs=stage.epochs or cfg.schedule.epochs),
        run=replace(
            cfg.run,
            init=stage.init or cfg.run.init,
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


def _mini_plan() -> Plan:
    """The demo's plan: every paper claim measured once, sized for ~10 minutes on 2 CPU cores.

    Stage 1 trains A and, on the otherwise idle second core, D from a random (Glorot) init: the staged-init
    ablation. Stage 2 trains B and D from A (§3.1) for the same number of epochs as the random-init D. Stage 4
    fine-tunes D with scale jittering at the fine-tuning lr (the S=384 step is skipped for time), scored with
    dense, multi-crop and combined (Table 5); the fusion averages B and jittered D (Table 6). Every stage stops
    at its first plateau after an lr drop (`schedule.early_stop`) or at its epoch cap, whichever comes first;
    the caps are what fits the budget (see README "The demo").
    """
    a_epochs, deep_epochs, tune_epochs = 8, 6, 2
    return Plan(
        "mini",
        "mini",
        (
            Stage("1-A-S256", "A", (256,), init="glorot", epochs=a_epochs),
            Stage("1-D-S256-random", "D", (256,), init="glorot", epochs=deep_epochs),
            Stage("2-B-S256", "B", (256,), init="from-shallower", init_from="1-A-S256", epochs=deep_epochs),
            Stage("2-D-S256", "D", (256,), init="from-shallower", init_from="1-A-S256", epochs=deep_epochs),
            Stage(
                "4-D-S256-512",
                "D",
                (256, 512),
                init="resume-weights",
                init_from="2-D-S256",
                lr=FINETUNE_LR,
                epochs=tune_epochs,
                protocols=TABLE5_PROTOCOLS,
            ),
        ),
        fusion=(("2-B-S256", "4-D-S256-512"),),
        fusion_protocols=(DENSE,),
        sets=("eval.multicrop_fraction=0.2",),  # multi-crop and combined on a stated fifth of the images
    )


def _study_plan() -> Plan:
    """The fuller reduced-scale reproduction (`--plan study`, mini preset, meant for full Fashion-MNIST).

    1. A, and D from a random (Glorot) init (the staged-init ablation, same epochs as D from A);
    2. A-LRN, B, C, D, E at S=256, initialised from A (§3.1);
    3./4. C, D and E fine-tuned from their S=256 runs at the fine-tuning lr for the same number of epochs, once
       at fixed S=256 and once with scale jittering S∈[256, 512]: the only difference between the pair is the
       jitter, so "jittering beats a fixed S" is a controlled comparison (the paper's S=384 step is replaced by
       this fixed-S twin);
    5. dense evaluation of every run at its Table-4 scales, dense + multi-crop + combined for the pairs of
       step 3/4, and the fusion of jittered D and E (Table 6).
    Epoch caps fit ~60-90 minutes on 2 CPU cores with 60k training images; early stopping ends a stage sooner.
    """
    a_epochs, deep_epochs, tune_epochs = 4, 2, 1
    stages = [
        Stage("1-A-S256", "A", (256,), init="glorot", epochs=a_epochs),
        Stage("1-D-S256-random", "D", (256,), init="glorot", epochs=deep_epochs),
    ]
    stages += [
        Stage(f"2-{c}-S256", c, (256,), init="from-shallower", init_from="1-A-S256", epochs=deep_epochs)
        for c in ("A-LRN", "B", "C", "D", "E")
    ]
    for c in ("C", "D", "E"):
        for key, scale in ((f"3-{c}-S256-ft", (256,)), (f"4-{c}-S256-512", (256, 512))):
            stages.append(
                Stage(
                    key,
                    c,
                    scale,
                    init="resume-weights",
                    init_from=f"2-{c}-S256",
                    lr=FINETUNE_LR,
                    epochs=tune_epochs,
                    protocols=TABLE5_PROTOCOLS,
                )
            )
    return Plan(
        "study",
        "mini",
        tuple(stages),
        fusion=(("4-D-S256-512", "4-E-S256-512"),),
        sets=("eval.multicrop_fraction=0.1",),  # multi-crop and combined on a stated tenth of the images
    )
