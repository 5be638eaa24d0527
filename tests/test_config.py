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
        ("model.name=F", "not a VGG configuration"),
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
