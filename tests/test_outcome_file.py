"""vggdist.outcome_file: per-image outcomes written and read back exactly, compact at ImageNet scale, no pickles."""

import json
import os

import numpy as np
import pytest

from vggdist.outcome_file import FORMAT, RowOutcome, read_outcomes, write_outcomes, write_rows
from vggdist.outcomes import EvalKey, Outcomes, eval_keys


def test_round_trip_keeps_every_hit_key_and_paper_scale(tmp_path):
    settings = eval_keys(["dense", "combined"], [37, 55])
    rng = np.random.default_rng(0)
    keys = [f"val_{i:05d}" for i in range(13)]  # not a multiple of 8: the packed bits' padding is dropped
    top1 = {k: rng.random(13) < 0.6 for k in settings}
    top5 = {k: top1[k] | (rng.random(13) < 0.5) for k in settings}
    path = tmp_path / "eval_outcomes.npz"
    write_outcomes(path, Outcomes(keys, top1, top5), paper_scales={37: 256, 55: 384}, meta={"split": "val"})

    back = read_outcomes(path)
    assert back.meta["split"] == "val" and back.meta["format"] == FORMAT and back.meta["n"] == 13
    assert list(back.rows) == settings
    for k in settings:
        assert back.rows[k].keys.tolist() == keys
        assert back.rows[k].top1.tolist() == top1[k].tolist()
        assert back.rows[k].top5.tolist() == top5[k].tolist()
    assert back.paper_scales[EvalKey("dense", (37, 55))] == (256, 384)
    row = back.find("combined", [384, 256])  # paper units, any order
    assert row is back.rows[EvalKey("combined", (37, 55))]
    assert back.find("dense", [256]) is back.rows[EvalKey("dense", (37,))]
    assert back.find("multicrop", [256]) is None
    err = row.error_rate("top1")
    assert (err.errors, err.n) == (int((~top1[settings[-1]]).sum()), 13)
    with np.load(path, allow_pickle=False) as z:  # a plain .npz, readable without vggdist and without pickles
        assert json.loads(z["meta"].tobytes())["settings"][0] == {
            "protocol": "dense",
            "scales": [37],
            "paper_scales": [256],
        }


def test_rows_over_different_images_store_the_keys_once(tmp_path):
    """A protocol scored on a stated subset (e.g. multi-crop on the first images) keeps its own keys."""
    all_keys = np.array(["a", "b", "c", "d"])
    rows = {
        EvalKey("dense", (37,)): RowOutcome(all_keys, np.array([1, 0, 1, 1], bool), np.ones(4, bool)),
        EvalKey("multicrop", (37,)): RowOutcome(
            all_keys[[3, 1]], np.array([0, 1], bool), np.array([1, 1], bool)
        ),
    }
    path = tmp_path / "o.npz"
    write_rows(path, rows)
    back = read_outcomes(path)
    assert back.meta["n"] == 4
    sub = back.rows[EvalKey("multicrop", (37,))]
    # in the order of the stored keys, with each key's own hit
    assert dict(zip(sub.keys.tolist(), sub.top1.tolist(), strict=True)) == {"b": True, "d": False}
    assert back.rows[EvalKey("dense", (37,))].top1.tolist() == [True, False, True, True]


def test_imagenet_scale_file_is_small(tmp_path):
    """50,000 validation images x 15 settings: bits packed, keys once."""
    n = 50_000
    settings = eval_keys(["dense", "multicrop", "combined"], [256, 384, 512])[:9] + eval_keys(
        ["single", "dense"], [224, 256]
    )
    rng = np.random.default_rng(1)
    hits = {k: rng.random(n) < 0.7 for k in settings}
    keys = [f"ILSVRC2012_val_{i:08d}" for i in range(1, n + 1)]
    path = tmp_path / "big.npz"
    write_outcomes(path, Outcomes(keys, hits, hits))
    assert len(settings) == 15
    assert os.path.getsize(path) < 1_000_000, os.path.getsize(path)
    back = read_outcomes(path)
    assert back.rows[settings[7]].top1.tolist() == hits[settings[7]].tolist()


def test_bad_input_is_refused(tmp_path):
    keys = np.array(["a", "a"])
    with pytest.raises(ValueError, match="unique"):
        write_rows(
            tmp_path / "x.npz",
            {EvalKey("dense", (37,)): RowOutcome(keys, np.ones(2, bool), np.ones(2, bool))},
        )
    with pytest.raises(ValueError, match="newline"):
        write_rows(
            tmp_path / "x.npz",
            {EvalKey("dense", (37,)): RowOutcome(np.array(["a\nb"]), np.ones(1, bool), np.ones(1, bool))},
        )
    with pytest.raises(ValueError, match="one hit per key"):
        RowOutcome(np.array(["a"]), np.ones(2, bool), np.ones(1, bool))
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a vggdist outcomes file"):
        read_outcomes(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", meta=np.frombuffer(b'{"format": "x/9"}', np.uint8), keys=np.zeros(0, np.uint8),
             top1=np.zeros(0), top5=np.zeros(0), scored=np.zeros(0))  # fmt: skip
    with pytest.raises(ValueError, match="format 'x/9'"):
        read_outcomes(tmp_path / "other.npz")


def test_a_setting_scored_on_a_subset_keeps_only_its_images(tmp_path):
    """`Outcomes.scored` (multi-crop on a stated subset): the file holds that setting's scored images only."""
    keys = ["a", "b", "c", "d"]
    dense, multi = EvalKey("dense", (37,)), EvalKey("multicrop", (37,))
    top1 = {dense: np.array([1, 0, 1, 1], bool), multi: np.array([0, 1, 0, 0], bool)}
    scored = {multi: np.array([False, True, False, True])}
    outcomes = Outcomes(keys, top1, {k: v.copy() for k, v in top1.items()}, scored)
    write_outcomes(tmp_path / "o.npz", outcomes)
    back = read_outcomes(tmp_path / "o.npz")
    assert back.rows[dense].keys.tolist() == keys
    sub = back.rows[multi]
    assert (sub.keys.tolist(), sub.top1.tolist()) == (["b", "d"], [True, False])
    assert (sub.error_rate("top1").errors, sub.n) == (1, 2)  # as `Outcomes.counts` counts it
    assert outcomes.counts()[multi].n == 2
