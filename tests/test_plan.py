"""The staged plan as data: built-in plans, plan YAML files, per-stage configs (no cluster needed)."""

import pytest

from vggdist.config import preset
from vggdist.paper import multi_test_scales
from vggdist.plan import Plan, Stage, builtin_plan, load_plan, plan_to_yaml, stage_config


def _configs(plan, **kw):
    kw = {"workers": None, "gpu": False, "experiment": "e", "sets": [], **kw}
    return {s.key: stage_config(plan, s, run_name=f"r-{s.key}", **kw) for s in plan.stages}


def test_paper_plan_is_the_studys_dag():
    p = builtin_plan("paper")
    keys = [s.key for s in p.stages]
    assert keys[0] == "1-A-S256" and p.stages[0].init == "normal"
    assert {k for k in keys if k.startswith("2-")} == {f"2-{c}-S256" for c in ("A-LRN", "B", "C", "D", "E")}
    assert all(
        s.init == "from-shallower" and s.init_from == "1-A-S256" for s in p.stages if s.key.startswith("2-")
    )
    s384 = {s.key: s for s in p.stages if s.key.startswith("3-")}
    assert set(s384) == {"3-C-S384", "3-D-S384", "3-E-S384"}
    assert all(s.lr == 1e-3 and s.init == "resume-weights" for s in s384.values())
    jit = {s.key: s for s in p.stages if s.key.startswith("4-")}
    assert jit["4-D-S256-512"].init_from == "3-D-S384" and jit["4-D-S256-512"].train_scale == (256, 512)
    assert set(jit["4-E-S256-512"].protocols) == {"dense", "multicrop", "combined"}
    assert p.fusion == (("4-D-S256-512", "4-E-S256-512"),)


def test_table4_scale_sets():
    assert multi_test_scales((256,)) == multi_test_scales("256") == (224, 256, 288)
    assert multi_test_scales((384,)) == (352, 384, 416)
    assert multi_test_scales((256, 512)) == multi_test_scales("256-512") == (256, 384, 512)
    jitter = next(s for s in builtin_plan("paper").stages if s.key == "4-D-S256-512")
    assert jitter.scale_label == "256-512" and jitter.paper_test_scales == (256, 384, 512)


def test_stage_config_maps_paper_scales_to_the_preset_crop():
    p = builtin_plan("mini")
    jitter = next(s for s in p.stages if s.key == "4-D-S256-512")
    cfg = stage_config(p, jitter, workers=2, gpu=False, experiment="e", run_name="n-4", sets=["run.seed=3"])
    assert cfg.model.name == "D" and cfg.data.crop_size == 32
    assert cfg.data.scale_jitter == (37, 73) and cfg.data.validation_scale == 55
    assert cfg.eval.test_scales == (37, 55, 73) and cfg.optim.lr == 1e-3
    assert cfg.run.init == "resume-weights" and cfg.run.init_from == "stage:2-D-S256"
    assert (cfg.run.workers, cfg.run.seed, cfg.run.run_name) == (2, 3, "n-4")
    paper = builtin_plan("paper")
    a = stage_config(paper, paper.stages[0], workers=None, gpu=True, experiment="e", run_name="x", sets=[])
    assert a.data.train_scale == 256 and a.eval.test_scales == (224, 256, 288) and a.run.use_bf16


def test_plan_yaml_round_trip_and_errors(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text(
        "name: d-only\npreset: mini\nstages:\n"
        "  - {key: a, config: A, train_scale: 256, init: glorot}\n"
        "  - {key: d, config: D, train_scale: [256, 512], init: from-shallower, init_from: a, epochs: 3,"
        " protocols: [dense, multicrop]}\n"
        "fusion: [[a, d]]\nsets: ['schedule.plateau_patience=3']\n"
    )
    p = load_plan(f)
    assert [s.key for s in p.stages] == ["a", "d"] and p.stages[1].train_scale == (256, 512)
    assert p.stages[1].protocols == ("dense", "multicrop") and p.fusion == (("a", "d"),)
    assert "d-only" in plan_to_yaml(p)
    with pytest.raises(ValueError, match="not an earlier stage"):
        Plan("bad", "mini", (Stage("d", "D", (256,), init="from-shallower", init_from="a"),))
    with pytest.raises(ValueError, match="duplicate"):
        Plan("bad", "mini", (Stage("a", "A", (256,)), Stage("a", "B", (256,))))
    with pytest.raises(ValueError, match="unknown stages"):
        Plan("bad", "mini", (Stage("a", "A", (256,)),), fusion=(("a", "z"),))
    with pytest.raises(ValueError, match="use paper, mini, study, degradation, degradation-mini, or a plan YAML"):
        builtin_plan("nonexistent.yaml")
    (tmp_path / "broken.yaml").write_text("stages:\n  - {config: A}\n")
    with pytest.raises(ValueError, match="each stage needs key, config, train_scale"):
        load_plan(tmp_path / "broken.yaml")


def test_demo_and_study_plans_measure_every_claim_with_controlled_pairs():
    """Each paper claim of the findings needs its pair of stages; the pairs differ in one thing only."""
    for name in ("mini", "study"):
        p = builtin_plan(name)
        by_key = {s.key: s for s in p.stages}
        assert p.preset == "mini"
        # depth: A, B and D at S=256, the deeper ones from A
        assert {"1-A-S256", "2-B-S256", "2-D-S256"} <= set(by_key)
        # staged init vs random init: the same net, scale and epochs, only the initialisation differs
        staged, scratch = by_key["2-D-S256"], by_key["1-D-S256-random"]
        assert (staged.init, staged.init_from) == ("from-shallower", "1-A-S256")
        assert (scratch.init, scratch.init_from) == ("glorot", None)
        assert (scratch.config, scratch.train_scale, scratch.epochs) == (
            staged.config,
            staged.train_scale,
            staged.epochs,
        )
        # jittered D and the Table-5 protocols (dense vs multi-crop vs combined on the same run)
        jitter = by_key["4-D-S256-512"]
        assert jitter.train_scale == (256, 512) and set(jitter.protocols) == {
            "dense",
            "multicrop",
            "combined",
        }
        assert p.fusion and all(k in by_key for g in p.fusion for k in g)
    study = builtin_plan("study")
    keys = {s.key for s in study.stages}
    assert {f"2-{c}-S256" for c in ("A-LRN", "B", "C", "D", "E")} <= keys
    for c in ("C", "D", "E"):  # fixed-S twin and jittered run: same init, lr, epochs; only S differs
        fixed = next(s for s in study.stages if s.key == f"3-{c}-S256-ft")
        jit = next(s for s in study.stages if s.key == f"4-{c}-S256-512")
        assert (
            (fixed.init_from, fixed.lr, fixed.epochs)
            == (jit.init_from, jit.lr, jit.epochs)
            == (
                f"2-{c}-S256",
                1e-3,
                jit.epochs,
            )
        )
        assert fixed.train_scale == (256,) and jit.train_scale == (256, 512)
    assert study.fusion == (("4-D-S256-512", "4-E-S256-512"),)


def test_a_stage_without_init_takes_the_presets_and_the_vgg_plans_keep_theirs():
    assert Stage("a", "A", (256,)).init is None
    for name in ("paper", "mini", "study"):  # the VGG plans name every stage's init
        plan = builtin_plan(name)
        assert all(s.init for s in plan.stages)
        assert [c.run.init for c in _configs(plan).values()] == [s.init for s in plan.stages]
    plain = Plan("p", "mini", (Stage("a", "A", (256,)),))
    assert _configs(plain)["a"].run.init == preset("mini").run.init == "glorot"
    he = Plan("h", "resnet-mini", (Stage("r", "resnet-20", (256, 480)),))
    assert _configs(he)["r"].run.init == "he"
    assert _configs(he)["r"].eval.test_scales == (32, 37, 55, 69, 91)  # He et al.'s Q set by default


def test_degradation_plans_are_four_independent_nets_on_the_resnet_presets():
    full, mini = builtin_plan("degradation"), builtin_plan("degradation-mini")
    assert [s.key for s in full.stages] == ["plain-18", "plain-34", "resnet-18", "resnet-34"]
    assert [s.config for s in mini.stages] == ["plain-20", "plain-56", "resnet-20", "resnet-56"]
    assert (full.preset, mini.preset, full.fusion, mini.fusion) == ("resnet-paper", "resnet-mini", (), ())
    for plan in (full, mini):
        assert all(s.init_from is None for s in plan.stages)  # no DAG edges: all four train at once
        assert {s.scale_label for s in plan.stages} == {"256-480"}
    cfgs = _configs(full, workers=8, gpu=True)
    for key, cfg in cfgs.items():
        assert cfg.model.name == key and cfg.model.shortcut == "A" and cfg.model.batch_norm
        assert (cfg.run.init, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.global_batch_size) == (
            "he",
            0.1,
            1e-4,
            256,
        )
        assert (cfg.data.scale_jitter, cfg.data.crop_size, cfg.data.validation_scale) == (
            (256, 480),
            224,
            256,
        )
        assert cfg.eval.test_scales == (224, 256, 384, 480, 640)
        assert cfg.eval.protocols == ("single", "tencrop", "dense") and cfg.run.workers == 8
    small = _configs(mini, sets=["schedule.epochs=3"])
    for key, cfg in small.items():
        assert cfg.model.name == key and cfg.model.widths == (16, 32, 64) and cfg.run.init == "he"
        assert (cfg.data.scale_jitter, cfg.data.crop_size, cfg.data.validation_scale) == ((37, 69), 32, 37)
        assert (cfg.optim.lr, cfg.optim.global_batch_size, cfg.schedule.epochs) == (0.1, 128, 3)
        assert cfg.eval.test_scales == (37,) and cfg.eval.protocols == ("single", "tencrop")
    assert "degradation-mini" in plan_to_yaml(mini)
    # a sweep scores with the stage config's protocols: --set can drop the 10-crop test on a large test set
    assert {c.eval.protocols for c in _configs(mini, sets=["eval.protocols=single"]).values()} == {("single",)}
