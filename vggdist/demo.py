"""`vggdist demo`: the whole pipeline on real data (Fashion-MNIST) with embedded defaults, in minutes on a laptop.

1. Fashion-MNIST (70k 28×28 grey product photos, 10 classes, MIT; Debian package dataset-fashion-mnist) becomes an
   image-folder tree of RGB JPEGs, the layout a user brings (one folder per class);
2. `vggdist-preprocess shard` writes train and val WebDataset shards with their RGB statistics;
3. `vggdist sweep --plan mini` (`vggdist.plan`): A, and D from a random init; B and D from A (staged init,
   §3.1); D fine-tuned with scale jittering; every run scored densely at three scales on all 2,000 held-out
   images, multi-crop and combined on a stated fifth of them; fusion of two nets (Table 6);
4. `vggdist report`: the paper's tables with ours beside them (95 % intervals), paired tests between runs on the
   same images, the findings (one verdict per paper claim), the error-vs-depth plot and the training curves.
Everything runs on one private local Ray started once by this process (or the cluster that `--address` /
RAY_ADDRESS names: `vggdist.cluster`) and MLflow in `<workdir>/mlflow.db` (unless MLFLOW_TRACKING_URI is set).
The mini preset is the paper's protocol at crop 32 (`vggdist.paper.SCALES`): the numbers show learning,
not ImageNet.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
STORED_SIDE = 64  # 28 -> 64 pixels: the mini preset trains at S in [37, 73] and tests at Q up to 73
CHANCE_TOP1_ERR = 90.0
# the plans the demo runs, and their experiments; degradation-mini: He et al.'s plain vs residual nets
PLANS = {"mini": "vggdist-demo", "study": "vggdist-study", "degradation-mini": "vggdist-degradation"}
FULL_PLANS = ("study", "degradation-mini")  # all of Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file; use the original Fashion-MNIST *-ubyte.gz files"
        )
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_fashion_mnist(path: str | None) -> Path:
    d = Path(path or DEFAULT_FASHION_MNIST)
    need = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for n in need:
        if not ((d / n).exists() or (d / f"{n}.gz").exists()):
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {d} (missing {n}.gz): `sudo apt-get install dataset-fashion-mnist`, "
                "or pass --fashion-mnist DIR with the four *-ubyte.gz files"
            )
    return d


def _idx(d: Path, name: str) -> np.ndarray:
    p = d / f"{name}.gz"
    return read_idx(p if p.exists() else d / name)


def write_image_folder(
    src: Path, out: Path, split: str, per_class: int, seed: int = 0, classes: tuple[int, ...] | None = None
) -> int:
    """Write `per_class` images of each class (all, or the label indices `classes`) as RGB JPEGs under
    out/<class name>/<split>_<index>.jpg; returns the count."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = _idx(src, f"{prefix}-images-idx3-ubyte"), _idx(src, f"{prefix}-labels-idx1-ubyte")
    rng = np.random.default_rng(seed)
    written = 0
    for c, name in enumerate(CLASSES):
        if classes is not None and c not in classes:
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == c)
        for i in np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)):
            path = out / name / f"{split}_{i:05d}.jpg"
            if not path.exists():
                im = Image.fromarray(images[i], mode="L").resize(
                    (STORED_SIDE, STORED_SIDE), Image.Resampling.BICUBIC
                )
                im.convert("RGB").save(path, quality=92)
            written += 1
    return written


def run_demo(
    workdir: str = "demo-work",
    fashion_mnist: str | None = None,
    quick: bool = False,
    train_per_class: int | None = None,
    address: str | None = None,
    plan: str = "mini",
    sets: list[str] | None = None,
) -> int:
    """Run the demo end to end in `workdir`; returns a process exit code (1 if a network did not learn).

    `plan` "mini" is the 10-minute demo; "study" is the same pipeline on all of Fashion-MNIST (60,000 training
    and 10,000 test images) with `--plan study` (~90 minutes on 2 CPU cores), in the MLflow experiment
    `vggdist-study`; "degradation-mini" trains plain-/resnet-20 and -56 on all of it (He et al.'s degradation
    study, MLflow experiment `vggdist-degradation`). `sets` are --set overrides for every run (e.g.
    schedule.epochs=3)."""
    if plan not in PLANS:
        raise ValueError(f"--plan {plan!r}: the demo runs {' or '.join(PLANS)}")
    from vggdist import cluster

    t0 = time.perf_counter()
    target = cluster.resolve(address)  # a wrong address fails here, before anything is written
    cluster.check(target)
    src = find_fashion_mnist(fashion_mnist)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # one Ray for every step: preprocessing's shard tasks, the sweep's stages and their evaluation (one worker
    # each: Ray Train's local mode inside the stage's task, so no dashboard is needed for Ray Train)
    cluster.connect(target, num_cpus=2 if target.local else None, include_dashboard=False)
    # mini: 6,000 training images, enough for the nets to separate and few enough that every stage reaches its
    # plateau or its epoch cap in the 10-minute budget; 2,000 held-out test images (from Fashion-MNIST's test
    # set) keep one binomial SE of an error rate near 0.8 pt at 15 % error. study: all of both sets.
    full = plan in FULL_PLANS
    per_class = train_per_class or (100 if quick else 6000 if full else 600)
    val_per_class = 20 if quick else 1000 if full else 200
    experiment = PLANS[plan]

    _say(f"[1/4] Fashion-MNIST {src} -> RGB JPEG image folders under {work / 'images'}")
    images = work / "images"
    n_train = write_image_folder(src, images / "train", "train", per_class)
    n_val = write_image_folder(src, images / "val", "val", val_per_class)
    _say(f"      {n_train} training and {n_val} validation images, {len(CLASSES)} classes")

    _say("[2/4] vggdist-preprocess shard (train, val)")
    from preprocess.cli import main as preprocess_main

    shards = work / "shards"
    for split, n in (("train", n_train), ("val", n_val)):
        argv = [
            "shard",
            "--source",
            str(images / split),
            "--split",
            split,
            "--out",
            str(shards / split),
            "--samples-per-shard",
            str(max(100, n // 8)),
            "--workers",
            "2",
        ]
        if preprocess_main(argv + (["--address", address] if address else [])) != 0:
            return 1

    _say(
        f"[3/4] vggdist sweep --plan {plan} "
        + (
            "(plain and residual nets at two depths, concurrently; evaluation)"
            if plan == "degradation-mini"
            else "(A and D from random init; deeper nets from A; scale jittering; evaluation; fusion)"
        )
    )
    from vggdist.sweep import run_sweep

    sets = ["run.storage_path=" + str(work / "ray_results"), *(sets or [])]
    if quick:
        sets += ["schedule.epochs=1"]
    # an interrupted demo or study resumes: the sweep's name stays in the work directory until it finishes
    unfinished = work / "sweep-in-progress"
    if unfinished.exists():
        sweep_name = unfinished.read_text().strip()
        _say(f"      resuming the interrupted sweep {sweep_name} (its finished stages are kept)")
    else:
        sweep_name = f"{'demo' if plan == 'mini' else plan}-{time.strftime('%Y%m%d-%H%M%S')}"
        unfinished.write_text(sweep_name + "\n")
    summary = run_sweep(
        str(shards),
        plan=plan,
        workers=1,
        experiment=experiment,
        sweep_name=sweep_name,
        address=address,
        sets=sets,
    )

    unfinished.unlink()
    _say("[4/4] vggdist report")
    from vggdist.report import make_report

    report = make_report(
        experiment=experiment, out_dir=str(work / "report"), sweep_run_id=summary["parent_run_id"]
    )
    # the full tables stay in report.md (and on the sweep's MLflow run); the screen gets the summary and findings
    tables, plots = (
        ("He et al.'s Table 6", "degradation_curves.png and depth.png")
        if plan == "degradation-mini"
        else ("Tables 3-6", "error_vs_depth.png and training_curves.png")
    )
    _say(
        f"      {work / 'report' / 'report.md'}: {tables} beside the paper's, with 95% CIs and n, the paired "
        f"comparisons, {plots}"
    )
    ok = _check_learning(report)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    _say(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report in {work / 'report'}")
    from vggdist import tracking

    exp_id = tracking.get_run(summary["parent_run_id"], uri=uri)["experiment_id"]
    _say(
        f"compare the runs in the MLflow UI:\n    mlflow ui --backend-store-uri {uri} --port 5000\n"
        f"    then open {tracking.runs_page('http://127.0.0.1:5000', exp_id)}"
    )
    # the findings end the output: which of the paper's claims this run reproduces, with CIs and paired tests
    print("\n" + report["findings_markdown"], end="", flush=True)
    return (
        0 if ok or quick else 1
    )  # a --quick demo trains 1 epoch per stage: it shows the plumbing, not learning


def _check_learning(report: dict) -> bool:
    """Every depth's best test top-1 error must be well below chance (90% for 10 classes); printed with its 95 %
    Wilson interval and n."""
    best: dict[str, dict] = {}
    he = report.get("resnet", {}).get("tables", {})  # He et al.'s nets (plan degradation-mini)
    for rows in [report["tables"].get(n, []) for n in ("3", "4", "5")] + list(he.values()):
        for row in rows:
            err = row.get("ours_top1")
            if err is not None and err < best.get(row["config"], {}).get("ours_top1", 101.0):
                best[row["config"]] = row
    if not best:
        _say("WARNING: the report holds no results of ours")
        return False

    def shown(row: dict) -> str:
        lo, hi, n = row.get("ours_top1_lo"), row.get("ours_top1_hi"), row.get("ours_n")
        ci = f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
        return f"{row['ours_top1']:.1f}%{ci}" + (f" (n={n})" if n else "")

    _say(
        "best test top-1 error by configuration, 95% CI (chance = 90%): "
        + ", ".join(f"{c} {shown(r)}" for c, r in sorted(best.items()))
    )
    bad = [c for c, r in best.items() if r["ours_top1"] > CHANCE_TOP1_ERR - 30]
    if bad:
        _say(f"WARNING: {bad} did not learn (top-1 error not well below chance)")
    return not bad


def _say(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
