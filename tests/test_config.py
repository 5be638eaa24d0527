"""Config: presets, YAML round trip, type-checked --set overrides, actionable validation messages."""

import pytest

from vggdist.config import Config, ConfigError, preset
from vggdist.paper import to_crop


def test_paper_preset_is_the_papers_protocol():
    cfg = preset("paper", model="D")
    assert (cfg.model.name, cfg.model.fc_width, cfg.model.dropout) == ("D", 4096, 0.5)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.global_batch_size) == (
        1e-2,
        0.9,
        5e-4,
        256,
    )
    assert (cfg.data.crop_size, cfg.data.train_scale, cfg.data.normalize) == (224, 256, "mean")
    assert (cfg.schedule.epochs, cfg.schedule.max_lr_drops, cfg.schedule.lr_drop_factor) == (74, 3, 0.1)
    assert cfg.eval.test_scales == (256, 384, 512)


def test_mini_preset_scales_s_and_q_by_crop_ratio():
    cfg = preset("mini", model="B")
    assert cfg.data.crop_size == 32 and cfg.data.train_scale == to_crop(256, 32) == 37
    assert cfg.eval.test_scales == (37, 55, 73)


def test_yaml_round_trip(tmp_path):
    cfg = preset("mini", model="E").override(["data.scale_jitter=37,73", "optim.lr=0.003"])
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == cfg


def test_override_types_and_unknown_keys():
    cfg = preset("paper")
    assert cfg.override(["optim.lr=0.005"]).optim.lr == 0.005
    assert cfg.override(["optim.lr=1"]).optim.lr == 1.0  # int accepted for a float field
    assert cfg.override(["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 would read "1e-3" as a string
    assert cfg.override(["data.scale_jitter=256,512"]).data.scale_jitter == (256, 512)
    assert cfg.override(["run.bf16=true"]).run.use_bf16 is True
    assert (
        cfg.override(["run.grad_compression=none"]).run.grad_compression == "none"
    )  # a str field keeps "none"
    assert (
        cfg.override(["run.init=resume-weights", "run.init_from=0123"]).run.init_from == "0123"
    )  # run ids stay text
    assert cfg.override(["run.run_name=none"]).run.run_name is None  # an optional field: none means unset
    with pytest.raises(ConfigError, match="optim.lrr"):
        cfg.override(["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="must be a number"):
        cfg.override(["optim.lr=fast"])
    with pytest.raises(ConfigError, match="section.key=value"):
        cfg.override(["lr=0.1"])
    with pytest.raises(ConfigError, match="must be an integer"):
        cfg.override(["optim.global_batch_size=1.5"])


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.name=F", "not a VGG configuration .A, A-LRN, B, C, D, E. nor a He et al. 2016 network .plain-18"),
        ("model.name=resnet-18", "--preset resnet-paper sets them"),
        ("model.shortcut=C", "use A .zero-padding"),
        ("run.sync_bn=true", "needs --gpu"),
        ("data.crop_size=100", "multiple of 32"),
        ("data.scale_jitter=512,256", "S_min <= S_max"),
        ("run.init=from-shallower", "needs --init-from"),
        ("run.grad_compression=fp8", "none, bf16 or powersgd"),
    ],
)
def test_validation_messages_name_the_fix(assignment, message):
    with pytest.raises(ConfigError, match=message):
        preset("paper").override([assignment])


def test_validation_scale_for_jittered_s_is_384():
    assert preset("paper").override(["data.scale_jitter=256,512"]).data.validation_scale == 384
    assert preset("paper").data.validation_scale == 256
    assert preset("mini").override(["data.scale_jitter=37,73"]).data.validation_scale == 55


def test_flat_params_use_dotted_names():
    flat = preset("paper").flat()
    assert flat["optim.lr"] == 0.01 and flat["data.train_scale"] == 256 and "run.workers" in flat


def test_data_decoder_choice_is_checked():
    from vggdist.config import DataConfig

    assert DataConfig().decoder == "auto"
    assert DataConfig(decoder="pil").decoder == "pil"
    with pytest.raises(ValueError, match="data.decoder='nvjpeg': use one of auto, window, simplejpeg, pil"):
        DataConfig(decoder="nvjpeg")


def test_resnet_paper_preset_is_he_et_al_protocol():
    cfg = preset("resnet-paper", model="resnet-34")
    m = cfg.model
    assert (m.name, m.widths, m.batch_norm, m.dropout, m.shortcut, m.family) == (
        "resnet-34",
        (64, 128, 256, 512),
        True,
        0.0,
        "A",
        "resnet",
    )
    o = cfg.optim
    assert (o.lr, o.momentum, o.weight_decay, o.global_batch_size) == (0.1, 0.9, 1e-4, 256)
    assert (cfg.schedule.lr_drop_factor, cfg.run.init, cfg.run.sync_bn) == (0.1, "he", False)
    assert (cfg.data.crop_size, cfg.data.scale_jitter, cfg.data.validation_scale) == (224, (256, 480), 256)
    assert cfg.eval.test_scales == (224, 256, 384, 480, 640)
    assert preset("resnet-paper").model.name == "resnet-34"


def test_resnet_mini_preset_scales_s_and_q_and_takes_the_cifar_nets():
    cfg = preset("resnet-mini", model="plain-56")
    assert (cfg.model.name, cfg.model.widths, cfg.model.family) == ("plain-56", (16, 32, 64), "plain")
    assert cfg.data.crop_size == 32 and cfg.data.scale_jitter == (37, 69) and cfg.data.validation_scale == 37
    assert cfg.eval.test_scales == tuple(to_crop(q, 32) for q in (224, 256, 384, 480, 640))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.global_batch_size) == (0.1, 1e-4, 128)
    assert cfg.run.init == "he" and cfg.model.dropout == 0.0
    assert preset("resnet-mini").model.name == "resnet-20"


@pytest.mark.parametrize(
    "name, model, message",
    [
        ("paper", "resnet-18", "--preset paper does not train resnet-18; use --preset resnet-paper"),
        ("mini", "plain-20", "use --preset resnet-mini"),
        ("resnet-mini", "resnet-34", "use --preset resnet-paper"),
        ("resnet-paper", "D", "use --preset paper or mini"),
        ("resnet-paper", "resnet-50", "plain-18, plain-34, resnet-18, resnet-34, plain-20"),
        ("cifar", None, "paper, mini, resnet-paper, resnet-mini"),
    ],
)
def test_preset_refuses_a_network_it_does_not_train(name, model, message):
    with pytest.raises(ConfigError, match=message):
        preset(name, model=model)


def test_default_preset_follows_the_network():
    from vggdist.config import default_preset

    assert [default_preset(n) for n in ("D", "plain-34", "resnet-18", "plain-20", "resnet-56")] == [
        "paper",
        "resnet-paper",
        "resnet-paper",
        "resnet-mini",
        "resnet-mini",
    ]


def test_resnet_yaml_round_trip_and_overrides(tmp_path):
    cfg = preset("resnet-mini", model="resnet-56").override(
        ["model.shortcut=B", "optim.lr=0.05", "model.widths=16,32,128", "run.gpu=true", "run.sync_bn=true"]
    )
    assert (cfg.model.shortcut, cfg.model.widths, cfg.optim.lr, cfg.run.sync_bn) == ("B", (16, 32, 128), 0.05, True)
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == cfg
    # switching network family needs the other family's settings in the same override
    vgg = preset("resnet-mini").override(
        ["model.name=B", "model.widths=16,32,64,128,128", "model.dropout=0.5", "model.fc_width=256"]
    )
    assert vgg.model.family == "vgg"
    with pytest.raises(ConfigError, match="3 non-decreasing stage widths"):
        cfg.override(["model.widths=16,32"])
    with pytest.raises(ConfigError, match="non-decreasing"):
        preset("resnet-mini").override(["model.widths=32,16,64"])  # option A pads, it cannot drop channels


def test_staged_init_is_refused_for_he_et_al_nets():
    with pytest.raises(ConfigError, match="from-shallower is VGG's staged start .*--init he"):
        preset("resnet-mini").override(["run.init=from-shallower", "run.init_from=x"])
    # the cross-section check sees the final values of one override, whatever the order
    cfg = preset("mini", model="A").override(["run.init=from-shallower", "run.init_from=x"])
    switched = cfg.override(
        ["run.init=he", "model.name=resnet-20", "model.widths=16,32,64", "model.dropout=0"]
        + ["model.batch_norm=true"]
    )
    assert switched.model.name == "resnet-20" and switched.run.init == "he"
