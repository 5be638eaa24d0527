"""Presets: functions that return a `Config` — the paper's protocol, its mini scale, and He et al. 2016's recipes."""

from __future__ import annotations

from vggdist import paper, resnet_paper
from vggdist.config.root import Config
from vggdist.config.sections import (
    CONFIG_NAMES,
    PRESETS,
    RESNET_CONFIG_NAMES,
    RESNET_PROTOCOLS,
    VGG_CONFIG_NAMES,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    _check,
    default_preset,
)

__all__ = ["PRESETS", "default_preset", "preset"]


def _presets_of(model: str) -> tuple[str, ...]:
    return ("paper", "mini") if model not in RESNET_CONFIG_NAMES else (default_preset(model),)


def preset(name: str, model: str | None = None) -> Config:
    """`paper`: the protocol exactly as §3.1–§4 (224 crops, S=256, widths 64…512, FC 4096, 74 epochs).

    `mini`: the same protocol at `paper.SCALES["mini"]` (crop 32) so it trains on 2 CPU cores in minutes: S and Q
    scaled by 32/224, widths divided by 4, FC 256, global batch 64 at the paper's lr 0.01. It is meant for a net
    trained from scratch on a small dataset, so it departs from the paper where that would stall:
    - Glorot initialisation (`run.init`, and `run.fill_init` for the layers the staged init leaves random), the
      paper's footnote: the paper's N(0, 1e-2) start fades through 11+ layers (the signal shrinks ~4x per layer,
      vggdist.init) and a net trained for minutes never leaves ln(K);
    - up to 30 epochs, stopping at the first plateau after the last lr drop (`schedule.early_stop`), with the
      paper's patience of 2 epochs, so a run ends when its validation error stops improving.

    `resnet-paper`: He et al. 2016 §3.4 for the ImageNet nets (plain-18/34, resnet-18/34): SGD with momentum 0.9,
    weight decay 1e-4, global batch 256, lr 0.1 ÷10 on a plateau, no dropout, He init, BN after every conv;
    S ∈ [256, 480] (scale jitter), 224 crops, colour shift; validation on the 224 centre crop at Q=256 (the
    scale of the paper's 10-crop test); the test protocols `RESNET_PROTOCOLS` (single, 10-crop, dense) at
    Q ∈ {224, 256, 384, 480, 640}, the fully-convolutional multi-scale test's scales (Table 2 reads 10-crop at
    Q=256; every protocol is scored at every Q, so 10-crop costs 50 crops per image); 120 epochs ("up to
    60×10^4 iterations" of 256 images over 1.28M). Shortcut option A.

    `resnet-mini`: the same at crop 32 for the CIFAR nets (plain-/resnet-20, -56; §4.2): S and Q scaled by
    32/224 (S ∈ [37, 69], Q ∈ {32, 37, 55, 69, 91}, validation at 37) like `mini`, and §4.2's CIFAR recipe:
    global batch 128, lr 0.1, weight decay 1e-4, momentum 0.9, option A; `mini`'s schedule (up to 30 epochs,
    early stop). On 2 CPU cores resnet-20 costs ~41M MACs per image (forward), resnet-56 ~125M (VGG mini A
    ~10M): an epoch of a few thousand images takes a minute or so.

    ``model`` defaults to the preset's usual net (A, resnet-34, resnet-20); a net the preset does not train
    is refused with the preset that does (`default_preset`).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    model = model or {"paper": "A", "mini": "A", "resnet-paper": "resnet-34", "resnet-mini": "resnet-20"}[name]
    _check(
        model in CONFIG_NAMES,
        f"unknown network {model!r}; use a VGG configuration ({', '.join(VGG_CONFIG_NAMES)}) or a He et al. "
        f"2016 network ({', '.join(RESNET_CONFIG_NAMES)})",
    )
    _check(
        name in _presets_of(model),
        f"--preset {name} does not train {model}; use --preset {' or '.join(_presets_of(model))}",
    )
    if name == "paper":
        return Config(model=ModelConfig(name=model))
    if name == "mini":
        scale = paper.SCALES["mini"]
        crop = scale["crop_size"]
        return Config(
            model=ModelConfig(name=model, widths=scale["widths"], fc_width=scale["fc_width"]),
            data=DataConfig(
                crop_size=crop, train_scale=paper.to_crop(256, crop), loader_workers=1, shuffle_buffer=500
            ),
            optim=OptimConfig(lr=0.01, global_batch_size=64),
            schedule=ScheduleConfig(epochs=30, plateau_patience=2, early_stop=True),
            eval=EvalConfig(
                test_scales=tuple(paper.to_crop(q, crop) for q in paper.MULTISCALE_Q), batch_size=64
            ),
            run=RunConfig(log_every_steps=20, init="glorot", fill_init="glorot"),
        )
    return _resnet_preset(name, model)


def _resnet_preset(name: str, model: str) -> Config:
    """`resnet-paper` / `resnet-mini` (see `preset`): one recipe, two crops."""
    mini = name == "resnet-mini"
    crop = resnet_paper.layout_of(model).crop_size
    lo, hi = (paper.to_crop(s, crop) for s in resnet_paper.TRAIN_SCALE_JITTER)
    q = paper.to_crop(256, crop)  # the single-crop / 10-crop test scale
    return Config(
        model=ModelConfig(
            name=model,
            widths=resnet_paper.layout_of(model).widths,
            fc_width=0,  # unused: one FC layer on the pooled features
            batch_norm=True,
            dropout=0.0,
        ),
        data=DataConfig(
            crop_size=crop,
            train_scale=lo,
            scale_jitter=(lo, hi),
            val_scale=q,
            **(dict(loader_workers=1, shuffle_buffer=500) if mini else {}),
        ),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, global_batch_size=128 if mini else 256),
        # mini: the mini preset's schedule (up to 30 epochs, early stop on the last plateau)
        schedule=ScheduleConfig(epochs=30, plateau_patience=2, early_stop=True)
        if mini
        else ScheduleConfig(epochs=120),
        eval=EvalConfig(
            protocols=RESNET_PROTOCOLS,
            test_scales=tuple(paper.to_crop(t, crop) for t in resnet_paper.TEST_SCALES),
            batch_size=64 if mini else 32,
        ),
        run=RunConfig(init="he", log_every_steps=20) if mini else RunConfig(init="he"),
    )
