"""§3.1 training loop without Ray: batch plan, plateau schedule, learning, NaN stop, exact checkpoint resume."""

import math

import pytest
import torch

from vggdist import checkpoint as ckpt
from vggdist.augment import DeviceAugment
from vggdist.config import OptimConfig, ScheduleConfig, preset
from vggdist.schedule import LrSchedule
from vggdist.train import (
    BatchPlan,
    NonFiniteLossError,
    TrainLoop,
    apply_init,
    batch_plan,
    build_model,
    sync_batch_norm,
)

CLASSES = 4


def _augment(shift: float = 0.0) -> DeviceAugment:
    return DeviceAugment(
        [127.0, 127.0, 127.0], [300.0, 20.0, 5.0], torch.eye(3).tolist(), color_shift_std=shift
    )


def _batches(epoch: int, steps: int, batch: int = 16):
    """Deterministic per epoch: class c is an image whose quadrant c is bright (learnable at crop 32)."""
    g = torch.Generator().manual_seed(1000 + epoch)
    torch.manual_seed(7 + epoch)  # dropout / colour shift draws: exact on resume, as ray_train does per epoch
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        x = torch.randint(0, 60, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            r, k = divmod(c, 2)
            x[i, :, r * 16 : r * 16 + 16, k * 16 : k * 16 + 16] += 180
        yield x, labels


def _loop(cfg, steps=8):
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES)
    apply_init(model, cfg)
    plan = batch_plan(cfg.optim, 1)
    return TrainLoop(
        model, cfg, plan=plan, steps_per_epoch=steps, augment=_augment(), device=torch.device("cpu")
    )


def _mini(**sets):
    cfg = preset("mini", model="A").override(
        ["optim.global_batch_size=16", "run.log_every_steps=4", "schedule.epochs=3"]
    )
    return cfg.override([f"{k}={v}" for k, v in sets.items()]) if sets else cfg


def test_batch_plan_keeps_the_global_batch():
    assert batch_plan(OptimConfig(), 8) == BatchPlan(8, 32, 1)
    assert batch_plan(OptimConfig(), 1) == BatchPlan(1, 256, 1)
    assert batch_plan(OptimConfig(max_batch_size_per_worker=64), 2) == BatchPlan(2, 64, 2)
    assert batch_plan(OptimConfig(max_batch_size_per_worker=48), 2) == BatchPlan(2, 32, 4)  # 128 = 4 x 32
    assert batch_plan(OptimConfig(batch_size_per_worker=16), 4) == BatchPlan(4, 16, 4)
    for p in (batch_plan(OptimConfig(), w) for w in (1, 2, 4, 16, 64)):
        assert p.global_batch_size == 256
    with pytest.raises(ValueError, match="cannot be split evenly over 3 workers"):
        batch_plan(OptimConfig(), 3)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_plan(OptimConfig(batch_size_per_worker=48), 2)


def test_lr_divided_by_ten_on_plateau_at_most_three_times():
    s = LrSchedule(
        OptimConfig(lr=0.01), ScheduleConfig(plateau_patience=1, max_lr_drops=3), steps_per_epoch=10
    )
    errs = [50, 40, 40, 40, 39.999, 40, 40, 40, 40, 40, 40, 40, 40]
    drops = [s.observe(e, epoch=i + 1) is not None for i, e in enumerate(errs)]
    assert sum(drops) == 3 and s.drops == 3
    assert s.lr(1000) == pytest.approx(1e-5)
    assert drops[:4] == [False, False, False, True]  # patience 1: the second epoch without progress drops


def test_warmup_and_linear_scaling():
    s = LrSchedule(
        OptimConfig(lr=0.01, global_batch_size=1024, lr_scaling="linear", warmup_epochs=1),
        ScheduleConfig(),
        steps_per_epoch=10,
    )
    assert (
        s.lr(0) == pytest.approx(0.004)
        and s.lr(5) == pytest.approx(0.04 * 0.55)
        and s.lr(10) == pytest.approx(0.04)
    )


def test_fit_learns_and_reports_every_epoch():
    cfg = _mini(**{"optim.lr": 0.01, "run.init": "glorot", "schedule.epochs": 4})
    loop = _loop(cfg, steps=10)
    reports, step_logs = [], []
    loop.fit(
        lambda e: _batches(e, 10),
        lambda: _batches(99, 4),
        lambda m, lp: reports.append(dict(m)),
        log_fn=lambda m, s: step_logs.append(s),
    )
    assert [r["epoch"] for r in reports] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["train/samples"] == 10 * 16 and r["val/samples"] == 64 for r in reports)
    assert reports[-1]["val/top1_err"] < 30.0, reports  # 4 classes: chance is 75 %
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]
    assert step_logs == [4, 8, 10, 14, 18, 20, 24, 28, 30, 34, 38, 40]


def test_non_finite_loss_stops_with_a_clear_message():
    loop = _loop(_mini(**{"optim.lr": 1e6}))
    with pytest.raises(NonFiniteLossError, match="lower optim.lr"):
        loop.fit(lambda e: _batches(e, 8), None, lambda m, lp: None)


def test_gradient_accumulation_matches_one_big_batch():
    cfg = _mini(**{"model.dropout": 0.0})
    a, b = _loop(cfg), _loop(cfg)
    b.plan = BatchPlan(1, 8, 2)
    batch = next(_batches(0, 1))
    a.train_step([batch])
    b.train_step([(batch[0][:8], batch[1][:8]), (batch[0][8:], batch[1][8:])])
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_is_exact(tmp_path):
    cfg = _mini()
    full = _loop(cfg, steps=6)
    full.fit(lambda e: _batches(e, 6), None, lambda m, lp: None)

    first = _loop(cfg, steps=6)
    saved = {}

    def stop_after_one(metrics, lp):
        if lp.epoch == 1:
            ckpt.save(
                tmp_path / "c",
                model=lp.model,
                config=cfg,
                optimizer=lp.optimizer,
                train_state=lp.state_dict(),
            )
            saved["done"] = True
            raise KeyboardInterrupt  # the "crash"

    with pytest.raises(KeyboardInterrupt):
        first.fit(lambda e: _batches(e, 6), None, stop_after_one)
    state = ckpt.load(tmp_path / "c")
    resumed = _loop(cfg, steps=6)
    resumed.model.load_state_dict(state["model"])
    resumed.load_state_dict(state["train_state"], state["optimizer"])
    assert resumed.epoch == 1 and resumed.step == 6
    resumed.fit(lambda e: _batches(e, 6), None, lambda m, lp: None)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert ckpt.load_config(tmp_path / "c") == cfg


def test_apply_init_resume_weights_and_errors():
    cfg = _mini()
    src = build_model(cfg, CLASSES)
    dst_cfg = cfg.override(["run.init=resume-weights", "run.init_from=x"])
    dst = build_model(dst_cfg, CLASSES)
    assert apply_init(dst, dst_cfg, src.state_dict()) == {"*": "*"}
    assert all(
        torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True)
    )
    other = build_model(cfg.override(["model.name=B"]), CLASSES)
    with pytest.raises(ValueError, match="from-shallower"):
        apply_init(
            build_model(dst_cfg.override(["model.name=B"]), CLASSES),
            dst_cfg.override(["model.name=B"]),
            src.state_dict() | {"extra": torch.zeros(1)},
        )
    deep_cfg = cfg.override(["model.name=D", "run.init=from-shallower", "run.init_from=x"])
    mapping = apply_init(build_model(deep_cfg, CLASSES), deep_cfg, src.state_dict())
    assert len(mapping) == 7 and math.isfinite(float(other.classifier[0].weight.detach().sum()))


# --- He et al.'s networks through the same loop ---------------------------------------------------------------


def _resnet_mini(**sets):
    cfg = preset("resnet-mini", model="resnet-20").override(
        ["optim.global_batch_size=16", "run.log_every_steps=4", "schedule.epochs=1"]
    )
    return cfg.override([f"{k}={v}" for k, v in sets.items()]) if sets else cfg


def _loss(model, batch):
    images, labels = batch
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(_augment()(images, train=False)), labels))


def test_resnet_20_trains_one_epoch_and_lowers_the_loss():
    cfg = _resnet_mini(**{"optim.lr": 0.05})  # the preset's 0.1 is for batch 128; this runs batch 16
    loop = _loop(cfg, steps=10)  # build_model + apply_init (He init): the unchanged training loop
    assert type(loop.model).__name__ == "ResNet" and loop.model.config == "resnet-20"
    held_out = next(_batches(99, 1, batch=64))
    # training-mode loss (batch statistics): after 10 steps the running statistics have not settled yet
    loop.model.train()
    before = _loss(loop.model, held_out)
    reports = []
    loop.fit(lambda e: _batches(e, 10), None, lambda m, lp: reports.append(dict(m)))
    loop.model.train()
    after = _loss(loop.model, held_out)
    assert [r["epoch"] for r in reports] == [1.0] and reports[0]["train/samples"] == 10 * 16
    assert before == pytest.approx(math.log(CLASSES), abs=0.05)  # He init + small FC: a uniform start
    assert after < 0.75 * before, (before, after)
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_resnet_checkpoint_keeps_batch_norm_statistics(tmp_path):
    cfg = _resnet_mini()
    loop = _loop(cfg, steps=3)
    loop.fit(lambda e: _batches(e, 3), None, lambda m, lp: None)
    ckpt.save(tmp_path / "c", model=loop.model, config=cfg, train_state=loop.state_dict())
    state = ckpt.load(tmp_path / "c")
    bn = loop.model.layer2[0].bn1
    assert int(state["model"]["layer2.0.bn1.num_batches_tracked"]) == 3
    assert torch.equal(state["model"]["layer2.0.bn1.running_var"], bn.running_var)
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # the stats did move
    restored = build_model(ckpt.load_config(tmp_path / "c"), CLASSES)
    restored.load_state_dict(state["model"])
    x = _augment()(next(_batches(5, 1))[0], train=False)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), loop.model.eval()(x))


def test_sync_batch_norm_keeps_the_state_dict_and_the_single_process_math():
    torch.manual_seed(0)
    plain = build_model(_resnet_mini(), CLASSES)
    assert sync_batch_norm(plain, False) is plain
    synced = sync_batch_norm(build_model(_resnet_mini(), CLASSES), True)
    synced.load_state_dict(plain.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    x = _augment()(next(_batches(0, 1))[0], train=False)
    with torch.no_grad():  # no process group: SyncBatchNorm is BatchNorm2d, in training and in eval mode
        torch.testing.assert_close(synced.train()(x), plain.train()(x))
        torch.testing.assert_close(synced.eval()(x), plain.eval()(x))
    for a, b in zip(synced.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the same running statistics after the same step


def test_resnet_resume_weights_and_the_message_of_a_mismatch():
    cfg = _resnet_mini()
    src = build_model(cfg, CLASSES)
    dst_cfg = cfg.override(["run.init=resume-weights", "run.init_from=x"])
    dst = build_model(dst_cfg, CLASSES)
    assert apply_init(dst, dst_cfg, src.state_dict()) == {"*": "*"}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    deeper = dst_cfg.override(["model.name=resnet-56"])
    with pytest.raises(ValueError, match="same configuration and scale as resnet-56.*--init he"):
        apply_init(build_model(deeper, CLASSES), deeper, src.state_dict())
