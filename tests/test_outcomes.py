"""vggdist.outcomes: evaluation settings, per-image outcomes concatenated over slots, counts, the results table."""

import numpy as np
import pytest

from vggdist.outcomes import Counts, EvalKey, Outcomes, eval_keys, results_rows


def _outcomes(keys, hits1, hits5, settings):
    return Outcomes(
        list(keys),
        {k: np.array(hits1, dtype=bool) for k in settings},
        {k: np.array(hits5, dtype=bool) for k in settings},
    )


def test_eval_keys_order_and_validation():
    assert eval_keys(["dense", "multicrop"], [37, 55]) == [
        EvalKey("dense", (37,)),
        EvalKey("dense", (55,)),
        EvalKey("dense", (37, 55)),
        EvalKey("multicrop", (37,)),
        EvalKey("multicrop", (55,)),
        EvalKey("multicrop", (37, 55)),
    ]
    assert eval_keys(["single"], [37]) == [EvalKey("single", (37,))]
    assert eval_keys(["tencrop"], [37]) == [EvalKey("tencrop", (37,))]  # He et al.'s 10-crop test
    with pytest.raises(ValueError, match="single, tencrop, dense, multicrop, combined"):
        EvalKey("fivecrop", (37,))
    with pytest.raises(ValueError, match="positive"):
        EvalKey("dense", ())
    with pytest.raises(ValueError, match="at least one test scale"):
        eval_keys(["dense"], [])


def test_slots_concatenate_in_order_and_count_exactly():
    settings = eval_keys(["dense"], [37, 55])
    empty = Outcomes.empty(settings)  # a slot with no images (more slots than images)
    a = _outcomes(["a", "b"], [1, 0], [1, 1], settings)
    b = _outcomes(["c"], [1], [1], settings)
    merged = Outcomes.concat([a, empty, b])
    assert merged.keys == ["a", "b", "c"]
    assert merged.top1[settings[0]].tolist() == [True, False, True]
    assert merged.counts() == dict.fromkeys(settings, Counts(3, 2, 3))
    assert dict(zip(merged.keys, merged.top1[settings[2]].tolist(), strict=True)) == {
        "a": True,
        "b": False,
        "c": True,
    }
    with pytest.raises(ValueError, match="same settings"):
        Outcomes.concat([a, Outcomes.empty(eval_keys(["single"], [37]))])
    with pytest.raises(RuntimeError, match="outcomes for 1 of 2 images"):
        Outcomes(["a", "b"], {settings[0]: np.ones(1, bool)}, {settings[0]: np.ones(1, bool)})


def test_results_rows_order_rounding_and_paper_scales():
    counts = {
        EvalKey("combined", (37, 55)): Counts(3, 2, 3),
        EvalKey("dense", (55,)): Counts(3, 1, 2),
        EvalKey("dense", (37, 55)): Counts(3, 2, 2),
        EvalKey("dense", (37,)): Counts(3, 3, 3),
    }
    rows = results_rows(counts, [37, 55], paper_scales=[256, 384])
    assert [(r["protocol"], r["scales"]) for r in rows] == [
        ("dense", [37]),
        ("dense", [55]),
        ("dense", [37, 55]),
        ("combined", [37, 55]),
    ]
    assert rows[1] == {
        "protocol": "dense",
        "scales": [55],
        "paper_scales": [384],
        "top1_err": 66.6667,
        "top1_lo": 20.766,
        "top1_hi": 93.8508,
        "top5_err": 33.3333,
        "top5_lo": 6.1492,
        "top5_hi": 79.234,
        "n": 3,
    }
    assert results_rows(counts, [37, 55])[3]["paper_scales"] == [37, 55]  # no paper scales: the scales
