"""Start-up cost of a short run: a plain PyTorch loop vs `vggdist train`, same images, same mini VGG-A.

Both train the mini preset's network (`preset("mini", "A")`: crop 32, global batch 64, SGD lr 0.01, momentum
0.9, weight decay 5e-4) on the same Fashion-MNIST images (the demo's RGB JPEGs; generated JPEGs when the
dataset is not installed), validate on the same validation images after every epoch, and each runs as a fresh
process, as a user runs them:

- baseline ``plain``: torchvision ``ImageFolder`` + ``DataLoader`` (one loader worker, like the preset) + SGD,
  crops ``Resize(37)`` → ``RandomCrop(32)`` + flip, centre crops for validation; no tracking, no checkpoints;
- ours ``vggdist``: ``vggdist train --config A --preset mini`` on the shards of those images, with its MLflow
  run (SQLite in a temporary directory), a checkpoint per epoch and a private local Ray, for 1 and 2 workers.

Per run: **wall** = process start to exit; **epoch** = the training part of the epochs (from the first batch
request to the last optimiser step, as ``train/samples / train/img_per_s`` reports it for vggdist and measured
the same way in the plain loop); **fixed start-up** = wall − epoch: imports, Ray, workers, MLflow, validation,
checkpoints and teardown. Ratios are baseline / ours (> 1: ours is cheaper). Sizes: ``--quick`` 900 training
images (90 per class), 1 epoch; full 8,000 (800 per class, the demo's), 2 epochs; 200 validation images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, parser, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_images(out: Path, train_per_class: int, val_per_class: int) -> str:
    """out/images/{train,val}/<class>/*.jpg; returns where the images came from."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        from vggdist.demo import write_image_folder

        write_image_folder(FASHION, out / "images" / "train", "train", train_per_class)
        write_image_folder(FASHION, out / "images" / "val", "val", val_per_class)
        return "Fashion-MNIST"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_data import write_image_folder as tiny

    tiny(out / "images" / "train", train_per_class * 10 // 4, seed=1)
    tiny(out / "images" / "val", val_per_class * 10 // 4, seed=2)
    return "generated JPEGs (Fashion-MNIST not installed)"


def make_shards(out: Path) -> Path:
    from preprocess.cli import main as preprocess_main

    for split in ("train", "val"):
        argv = ["shard", "--source", str(out / "images" / split), "--split", split, "--out",
                str(out / "shards" / split), "--samples-per-shard", "150", "--workers", "1", "--no-progress"]  # fmt: skip
        if preprocess_main(argv) != 0:
            raise SystemExit(f"preprocessing {split} failed")
    return out / "shards"


def _timed(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])} … failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    return wall, p.stdout


def run_plain(images: Path, epochs: int) -> dict[str, float]:
    wall, out = _timed(
        [sys.executable, __file__, "--plain", str(images), str(epochs)], dict(os.environ), 1800
    )
    return {"wall": wall, "epoch": json.loads(out.strip().splitlines()[-1])["epoch_s"]}


def run_vggdist(shards: Path, work: Path, epochs: int, workers: int) -> dict[str, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "vggdist.cli", "train", "--config", "A", "--preset", "mini", "--data", str(shards),
           "--epochs", str(epochs), "--workers", str(workers), "--experiment", "bench-startup",
           "--run-name", f"startup-w{workers}-{time.time_ns()}", "--storage-path", str(work / "ray_results")]  # fmt: skip
    wall, out = _timed(cmd, env, 1800)
    result = json.loads(out[out.index("{") :])
    # the summed training part of all epochs; every epoch trains the same number of images
    return {"wall": wall, "epoch": epochs * result["train/samples"] / result["train/img_per_s"]}


def plain_loop(images: str, epochs: int) -> None:
    """The baseline, in its own process: prints {"epoch_s": ...} (the summed training part of the epochs)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from vggdist.config import preset
    from vggdist.train import build_model

    cfg = preset("mini", model="A")
    crop, scale = cfg.data.crop_size, cfg.data.train_scale
    norm = transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    train_tf = transforms.Compose([transforms.Resize(scale), transforms.RandomCrop(crop),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])  # fmt: skip
    val_tf = transforms.Compose(
        [transforms.Resize(scale), transforms.CenterCrop(crop), transforms.ToTensor(), norm]
    )
    train = datasets.ImageFolder(f"{images}/train", train_tf)
    val = datasets.ImageFolder(f"{images}/val", val_tf)
    batch = cfg.optim.global_batch_size
    loader = DataLoader(
        train, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.data.loader_workers
    )
    val_loader = DataLoader(val, batch_size=cfg.eval.batch_size, num_workers=cfg.data.loader_workers)
    torch.manual_seed(0)
    model = build_model(cfg, len(train.classes))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)  # fmt: skip
    epoch_s = 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        epoch_s += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val_loader)
        print(f"val top-1 error {100 * (1 - correct / len(val)):.1f}%", file=sys.stderr)
    print(json.dumps({"epoch_s": epoch_s}))


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the --quick sizes with 1 worker only (tests)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="vggdist workers to measure")
    args = p.parse_args(argv)
    quick = args.quick or args.smoke
    per_class, epochs = (90, 1) if quick else (800, 2)
    workers = [1] if args.smoke else args.workers
    with tempfile.TemporaryDirectory(prefix="vggdist-bench-startup-") as tmp:
        work = Path(tmp)
        source = make_images(work, per_class, 20)
        shards = make_shards(work)
        plain = run_plain(work / "images", epochs)
        print(f"plain loop: wall {plain['wall']:.1f} s, epochs {plain['epoch']:.1f} s", flush=True)
        rows = []
        for w in workers:
            ours = run_vggdist(shards, work, epochs, w)
            print(
                f"vggdist train, {w} worker(s): wall {ours['wall']:.1f} s, epochs {ours['epoch']:.1f} s",
                flush=True,
            )
            label = f"{w} worker{'s' if w > 1 else ''}"
            rows += [
                Row(f"{label}: wall", "s", plain["wall"], ours["wall"], higher_is_better=False),
                Row(f"{label}: epoch", "s", plain["epoch"], ours["epoch"], higher_is_better=False),
                Row(
                    f"{label}: fixed start-up",
                    "s",
                    plain["wall"] - plain["epoch"],
                    ours["wall"] - ours["epoch"],
                    higher_is_better=False,
                ),  # fmt: skip
            ]
    n = per_class * 10
    report(
        f"Start-up: plain PyTorch loop vs vggdist train, mini VGG-A, {n} {source} images, {epochs} epoch(s)",
        rows,
        args.json,
        notes=[
            "baseline = plain loop (one process, no tracking/checkpoints); ours = vggdist train (MLflow, "
            "checkpoints, private local Ray); ratio = baseline / ours",
            "fixed start-up = wall - epoch (training part of the epochs)",
        ],
    )
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_loop(sys.argv[2], int(sys.argv[3]))
    else:
        main()
