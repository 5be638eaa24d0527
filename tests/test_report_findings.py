"""The report's paired comparisons and Findings, from a synthetic sweep with known per-image outcomes.

The sweep lives in a real MLflow SQLite store; every run's eval_outcomes.npz, per-epoch metrics and the fusion's
outcomes are logged through the tracking package (its durable spool), as `vggdist sweep` logs them. The outcomes
are chosen so that each McNemar p-value is checked by hand: with b and c the images only one side gets right,
p = min(1, 2·P[X ≤ min(b, c)]) for X ~ Binomial(b + c, 1/2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_report import empty_db, store  # noqa: F401 - fixtures: a real MLflow sqlite store
from vggdist import runmeta, tracking
from vggdist.outcome_file import RowOutcome, log_outcomes
from vggdist.outcomes import EvalKey, Outcomes
from vggdist.report import make_report
from vggdist.report_compare import Side, compare
from vggdist.report_findings import CLAIMS, NOT_MEASURED, findings
from vggdist.significance import NOT_REPRODUCED, REPRODUCED, WITHIN_NOISE

N = 40
KEYS = [f"val_{i:02d}" for i in range(N)]
MINI = {224: 32, 256: 37, 288: 41, 384: 55, 512: 73}  # paper Q -> Q at crop 32
Q256 = (224, 256, 288)
QJ = (256, 384, 512)
SUBSET = np.array(
    [i % 2 == 0 for i in range(N)]
)  # multi-crop and combined: the even images (a stated subset)


def wrong(*ranges) -> np.ndarray:
    """Hits (True = right) of a setting that gets exactly the images in `ranges` wrong."""
    hits = np.ones(N, dtype=bool)
    for r in ranges:
        hits[list(r)] = False
    return hits


def _log_run(client, uri, exp_id, parent_id, tmp: Path, stage, config, scale, init, settings, *,
             init_from=None, val_history=(), t=0):  # fmt: skip
    """A finished child run with its outcomes (settings: (protocol, paper Qs) -> hits) logged via the tracking
    package. Returns its run id."""
    tags = {"vggdist.sweep": parent_id, "mlflow.parentRunId": parent_id, "vggdist.config": config,
            "vggdist.stage": stage, "vggdist.train_scale": scale}  # fmt: skip
    if init_from:
        tags[runmeta.TAG_INIT_FROM] = init_from
    rid = client.create_run(exp_id, start_time=t, run_name=stage, tags=tags).info.run_id
    client.log_param(rid, "run.init", init)
    qs = sorted({q for _, paper_qs in settings for q in paper_qs})
    top1, scored = {}, {}
    for (protocol, paper_qs), hits in settings.items():
        key = EvalKey(protocol, tuple(MINI[q] for q in paper_qs))
        top1[key] = hits
        if protocol in ("multicrop", "combined"):
            scored[key] = SUBSET
    meta = {
        "split": "val",
        runmeta.TAG_MANIFEST: "m1",
        "test_scales": [MINI[q] for q in qs],
        "paper_test_scales": qs,
    }
    tracker = tracking.Tracker.attach(rid, tracking.spool_dir(tmp / f"spool-{stage}"), uri=uri)
    log_outcomes(tracker, Outcomes(KEYS, top1, dict(top1), scored), meta, runmeta.EVAL_OUTCOMES)
    for epoch, err in enumerate(val_history, start=1):
        tracker.log_metrics({runmeta.VAL_TOP1_ERR: err, runmeta.TRAIN_TOP1_ERR: err - 5}, step=epoch)
    assert tracker.close(wait_s=30)
    client.set_terminated(rid)
    return rid


def build(client, uri, exp_id, tmp: Path) -> dict[str, str]:
    parent = client.create_run(exp_id, start_time=1, run_name="sweep",
                               tags={"vggdist.sweep": "parent", "vggdist.plan": "mini"})  # fmt: skip
    pid = parent.info.run_id
    ids = {"parent": pid}
    run = lambda *a, **k: _log_run(client, uri, exp_id, pid, tmp, *a, **k)  # noqa: E731
    # A: wrong on 0..19 (50 %). D from A: wrong on 0..9: b = 0, c = 10 -> p = 2 / 2^10.
    ids["A"] = run("1-A-S256", "A", "256", "glorot", {("dense", (256,)): wrong(range(20)),
                   ("dense", Q256): wrong(range(20))}, val_history=(60, 50, 45, 44), t=2)  # fmt: skip
    # D from random init: wrong on 0..8 and 10..12; vs D from A: b = 1 (key 9), c = 3 -> p = 2·5/16 = 0.625
    ids["Drand"] = run("1-D-S256-random", "D", "256", "glorot",
                       {("dense", (256,)): wrong(range(9), range(10, 13))}, val_history=(60, 45, 40, 38), t=3)  # fmt: skip
    ids["B"] = run("2-B-S256", "B", "256", "from-shallower", {("dense", (256,)): wrong(range(15))},
                   init_from=ids["A"], t=4)  # fmt: skip
    ids["D"] = run("2-D-S256", "D", "256", "from-shallower", {("dense", (256,)): wrong(range(10))},
                   init_from=ids["A"], val_history=(50, 37), t=5)  # fmt: skip
    # jittered D: Q384 wrong on 0..9, 30..39: vs D/256 b = 10, c = 0 -> significantly worse, p = 2 / 2^10;
    # multi-scale wrong on 0..9, 30..38 (vs Q384: b = 0, c = 1 -> p = 1); on the even images multi-crop wrong on
    # {0,2,4,6,8,30,32}, combined on {0,2,4}: vs dense (wrong on 10 even images) c = 7 -> p = 2 / 2^7,
    # vs multi-crop c = 4 -> p = 2 / 2^4 = 0.125
    ids["DJ"] = run("4-D-S256-512", "D", "256-512", "resume-weights", {
        ("dense", (384,)): wrong(range(10), range(30, 40)),
        ("dense", QJ): wrong(range(10), range(30, 39)),
        ("multicrop", QJ): wrong([0, 2, 4, 6, 8, 30, 32]),
        ("combined", QJ): wrong([0, 2, 4]),
    }, init_from=ids["D"], t=6)  # fmt: skip
    # fusion of B and jittered D, dense over Q 256,384,512: wrong on 0..4; B has no such setting, so the best
    # member is jittered D (19 wrong): c = 14 -> p = 2 / 2^14
    fused = Outcomes(
        KEYS,
        {EvalKey("dense", (37, 55, 73)): wrong(range(5))},
        {EvalKey("dense", (37, 55, 73)): wrong(range(5))},
    )
    path = f"{runmeta.FUSION_OUTCOMES_DIR}/2-B-S256+4-D-S256-512.npz"
    tracker = tracking.Tracker.attach(pid, tracking.spool_dir(tmp / "spool-parent"), uri=uri)
    meta = {
        "split": "val",
        runmeta.TAG_MANIFEST: "m1",
        "test_scales": [37, 55, 73],
        "paper_test_scales": list(QJ),
    }
    log_outcomes(tracker, fused, meta, path)
    row = {"models": ["B/256", "D/256-512"], "run_ids": [ids["B"], ids["DJ"]], "protocol": "dense",
           "scales": [37, 55, 73], "paper_scales": list(QJ), "top1_err": 12.5, "top5_err": 12.5, "n": N,
           "outcomes": path}  # fmt: skip
    tracker.log_dict({"rows": [row]}, runmeta.FUSION_RESULTS)
    assert tracker.close(wait_s=30)
    return ids


def test_comparisons_and_findings_from_logged_outcomes(store, tmp_path):  # noqa: F811 - fixture
    uri, client, exp_id = store
    ids = build(client, uri, exp_id, tmp_path)
    out = make_report(out_dir=tmp_path / "rep", uri=uri)
    found = {f["claim"].split(" (")[0]: f for f in out["findings"]}
    assert [f["claim"].split(" (")[0] for f in out["findings"]] == list(CLAIMS)

    depth = found["depth helps"]
    assert depth["claim"] == "depth helps (A → D)"
    assert depth["p_value"] == pytest.approx(2 / 2**10) and depth["delta"] == pytest.approx(-25.0)
    assert depth["verdict"] == REPRODUCED and "A 29.6, B 28.7, D 27.0" in depth["paper"]
    assert "50.00 [" in depth["ours"] and "25.00 [" in depth["ours"] and depth["test_set"] == "val: 40 images"

    staged = found[CLAIMS[1]]
    assert staged["p_value"] == pytest.approx(0.625) and staged["verdict"] == WITHIN_NOISE
    assert "best validation error (38.00 %): staged 2 (+ 4 epochs of A), random 4" in staged["ours"]

    jitter = found[CLAIMS[2]]
    assert (jitter["delta"], jitter["verdict"]) == (pytest.approx(25.0), NOT_REPRODUCED)
    assert (
        jitter["p_value"] == pytest.approx(2 / 2**10) and "S=256 27.0 → S=[256;512] 25.6" in jitter["paper"]
    )

    multi = found[CLAIMS[3]]
    assert (multi["p_value"], multi["verdict"]) == (1.0, WITHIN_NOISE)

    combined = found[CLAIMS[4]]  # significant vs dense, within noise vs multi-crop: within noise overall
    assert combined["verdict"] == WITHIN_NOISE and combined["test_set"] == "val: 20 images (stated subset)"
    assert combined["p_value"] == pytest.approx(0.125)
    # Δ and p are those of the deciding comparison (vs multi-crop: 7 → 3 wrong of 20); vs dense in the text
    assert combined["delta"] == pytest.approx(-20.0) and "vs dense: 50.00" in combined["ours"]

    fusion = found[CLAIMS[5]]
    assert fusion["p_value"] == pytest.approx(2 / 2**14) and fusion["verdict"] == REPRODUCED
    assert "members without this setting: B/256" in fusion["note"]

    # the comparisons: every family, b against a, on the images both scored
    fam = {}
    for c in out["comparisons"]:
        fam.setdefault(c["family"].split(" (")[0], []).append(c)
    assert [(c["a"].split()[0], c["b"].split()[0]) for c in fam["depth"]] == [
        ("A/256", "B/256"),
        ("B/256", "D/256"),
    ]
    dense_vs_comb = fam["multi-crop & dense vs dense"][0]
    assert (dense_vs_comb["n"], dense_vs_comb["b_only_right"], dense_vs_comb["label"]) == (
        20,
        7,
        "significant",
    )
    assert dense_vs_comb["p_value"] == pytest.approx(2 / 2**7)
    assert fam["staged init vs random init"][0]["a"].startswith("D/256 (1-D-S256-random)")

    md = out["markdown"]
    assert md.rstrip().endswith(out["findings_markdown"].rstrip())  # the findings end the report
    assert "## Paired comparisons (McNemar, exact)" in md and "**not reproduced**" in md
    assert "| depth helps (A → D) |" in out["findings_markdown"]
    files = {Path(p).name: Path(p) for p in out["files"]}
    data = json.loads(files["tables.json"].read_text())
    assert data["findings"] == out["findings"] and len(data["comparisons"]) == len(out["comparisons"])
    for name in ("error_vs_depth.png", "training_curves.png"):
        with Image.open(files[name]) as im:
            im.verify()
            assert im.format == "PNG"
    logged = {Path(a.path).name for a in client.list_artifacts(ids["parent"], "report")}
    assert {"training_curves.png", "report.md", "tables.json"} <= logged


def _side(label, hits, keys=KEYS, manifest="m1"):
    return Side(label, RowOutcome(np.array(keys), hits, hits), manifest)


def test_unpaired_sides_are_refused_with_a_note():
    a = _side("a", wrong(range(5)))
    other = compare("x", a, _side("b", wrong(range(20)), manifest="m2"))
    assert (other["verdict"], other["p_value"], other["n"]) == ("not paired", None, None)
    assert "different test sets" in other["note"] and other["b_err"] == 50.0
    shifted = [f"other_{i}" for i in range(N)]
    c = compare("x", a, _side("b", wrong(range(5)), keys=shifted))
    assert (
        c["label"] == "not paired"
        and "not scored on the same images (40 only in a, 40 only in b)" in c["note"]
    )


def test_a_plan_without_the_runs_a_claim_needs_says_not_measured():
    """Only A was trained and evaluated: every claim is 'not measured in this plan'."""
    from vggdist.outcome_file import OutcomeFile

    f = OutcomeFile({"split": "val"}, {EvalKey("dense", (37,)): RowOutcome(np.array(KEYS), wrong(range(9)), wrong())},
                    {EvalKey("dense", (37,)): (256,)})  # fmt: skip
    run = {
        "run_id": "r1",
        "config": "A",
        "train_scale": "256",
        "label": "A/256",
        "outcomes": f,
        "init": "glorot",
    }
    rows = findings([run], [])
    assert [r["verdict"] for r in rows] == [NOT_MEASURED] * len(CLAIMS)
    assert all(r["p_value"] is None and r["paper"] for r in rows)


def test_a_claim_whose_sides_were_scored_on_different_test_sets_is_not_paired():
    """A random-init D evaluated on another test set (another data manifest) than the staged D: no verdict."""
    from vggdist.outcome_file import OutcomeFile

    def run(rid, init, manifest, hits, **extra):
        key = EvalKey("dense", (37,))
        f = OutcomeFile({"split": "val", runmeta.TAG_MANIFEST: manifest}, {key: RowOutcome(np.array(KEYS), hits, hits)},
                        {key: (256,)})  # fmt: skip
        return {"run_id": rid, "config": "D", "train_scale": "256", "label": f"D/256 {rid}", "outcomes": f,
                "init": init, **extra}  # fmt: skip

    rows = findings(
        [run("r", "glorot", "m1", wrong(range(20))), run("s", "from-shallower", "m2", wrong())], []
    )
    staged = rows[1]
    assert (staged["verdict"], staged["p_value"], staged["test_set"]) == ("not paired", None, None)
    assert "different test sets" in staged["note"]


def test_runs_without_outcomes_are_named_with_the_command_that_scores_them():
    old = {"label": "A/256", "run_id": "r0a", "config": "A", "train_scale": "256", "outcomes": None}
    rows = findings([old], [])
    assert {r["verdict"] for r in rows} == {NOT_MEASURED}
    assert all("A/256 (r0a): rerun `vggdist evaluate --run RUN_ID`" in r["note"] for r in rows)
    assert all("rerun" not in (r["note"] or "") for r in findings([], []))
