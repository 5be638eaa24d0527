"""The `vggdist` command line: every sub-command's flags, their defaults and help (`vggdist.cli` runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from vggdist.config import CONFIG_NAMES, INIT_CHOICES, PRESETS
from vggdist.runmeta import DEFAULT_EXPERIMENT, PROTOCOLS

_ADDRESS_HELP = (
    "Ray cluster (GCS) address HOST:PORT, or auto for the cluster `ray start --head` started on this machine "
    "(default: $RAY_ADDRESS, else a private local Ray that this command starts and stops)"
)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=_ADDRESS_HELP)
    # -v after the sub-command as well as before it; SUPPRESS keeps `vggdist -v train` working
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, tracebacks, and Ray's, Ray Train's and MLflow's internal logs",
    )


def build_parser(handlers: Mapping[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The `vggdist` argument parser; `handlers` maps each sub-command to the function that runs it."""
    p = argparse.ArgumentParser(
        prog="vggdist", description="The VGG study (Simonyan & Zisserman, 2015) on Ray Train + MLflow."
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and the libraries' internal logs"
    )
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "models",
        help="Table 1/2: layers, parameters and MACs of every configuration, and He et al.'s plain/residual nets",
    )
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument(
        "--scale",
        choices=("paper", "mini"),
        default="paper",
        help="paper (224 crops; He et al.'s ImageNet nets) or mini (32 crops; their CIFAR nets)",
    )
    m.add_argument(
        "--shortcut",
        choices=("A", "B"),
        default="A",
        help="He et al.'s shortcut option: A zero-padding (default), B projection (torchvision's counts)",
    )
    m.add_argument("--num-classes", type=int, default=1000)
    m.set_defaults(func=handlers["models"])

    t = sub.add_parser("train", help="train one configuration with Ray Train (DDP) and log it to MLflow")
    t.add_argument(
        "--config",
        choices=CONFIG_NAMES,
        required=True,
        help="Table 1 column, or He et al.'s plain-18/34, resnet-18/34 (ImageNet) and plain-20/56, resnet-20/56",
    )
    t.add_argument(
        "--data", required=True, help="directory with train/ and val/ shards from vggdist-preprocess"
    )
    t.add_argument(
        "--preset",
        choices=PRESETS,
        help="default: the network's paper protocol (paper for VGG, resnet-paper for the ImageNet "
        "plain/resnet nets, resnet-mini for the CIFAR ones)",
    )
    t.add_argument("--config-file", help="a YAML config (as saved with checkpoints) instead of --preset")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=0.005",
    )
    t.add_argument("--init", choices=INIT_CHOICES)
    t.add_argument("--init-from", metavar="RUN_ID|CHECKPOINT", help="MLflow run id or checkpoint directory")
    t.add_argument("--epochs", type=int)
    t.add_argument("--workers", type=int, help="Ray Train workers (one per GPU with --gpu)")
    t.add_argument(
        "--gpu", action="store_true", help="one GPU per worker; turns on bf16 autocast and channels_last"
    )
    t.add_argument("--experiment", help="MLflow experiment (default vggdist)")
    t.add_argument("--run-name", help="Ray/MLflow run name; rerunning with the same name resumes it")
    t.add_argument(
        "--storage-path", help="Ray storage for checkpoints: local dir, shared filesystem or s3://"
    )
    t.add_argument(
        "--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 3)"
    )
    t.add_argument("--grad-compression", choices=("none", "bf16", "powersgd"))
    t.add_argument("--seed", type=int)
    t.add_argument("--stage", help=argparse.SUPPRESS)
    _add_address(t)
    t.set_defaults(func=handlers["train"])

    e = sub.add_parser("evaluate", help="dense / multi-crop / combined evaluation at several scales, fusion")
    e.add_argument("--run", help="MLflow run id of a training run")
    e.add_argument("--checkpoint", help="checkpoint directory instead of --run")
    e.add_argument("--data", required=True, help="directory with val/ shards (or a split directory)")
    e.add_argument("--split", default="val")
    e.add_argument(
        "--protocols",
        help=f"comma-separated, from {','.join(PROTOCOLS)} (default: the run's eval.protocols; VGG presets: "
        "single,dense,multicrop,combined, He et al.'s: single,tencrop,dense)",
    )
    e.add_argument("--scales", help="test scales Q, e.g. 256,384,512 (default: the run's eval.test_scales)")
    e.add_argument(
        "--ensemble", nargs="+", metavar="RUN_ID", help="fuse these runs' posteriors with --run's (Table 6)"
    )
    e.add_argument("--workers", type=int, default=2, help="Ray evaluation tasks")
    e.add_argument("--no-log", action="store_true", help="do not log the results to the evaluated MLflow run")
    e.add_argument("--gpu", action="store_true", help="one GPU per evaluation task")
    _add_address(e)
    e.set_defaults(func=handlers["evaluate"])

    s = sub.add_parser(
        "sweep", help="the paper's staged plan (§3.1, §4) as one job under an MLflow parent run"
    )
    s.add_argument("--data", required=True)
    s.add_argument(
        "--plan",
        default="paper",
        help="paper, mini (the demo's), study (the reduced-scale reproduction) — VGG; degradation, "
        "degradation-mini — He et al.'s plain vs residual; or a plan YAML file",
    )
    s.add_argument("--workers", type=int, help="Ray Train workers per training run")
    s.add_argument("--gpu", action="store_true")
    s.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    s.add_argument(
        "--name", default=None, help="sweep name; rerunning with the same name skips finished stages"
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field in every run")
    s.add_argument("--max-concurrent", type=int, help="stages at once (default: what the cluster holds now)")
    _add_address(s)
    s.set_defaults(func=handlers["sweep"])

    r = sub.add_parser("report", help="paper-style Tables 3-6 and an error-vs-depth plot from MLflow")
    r.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    r.add_argument(
        "--sweep",
        action="append",
        help="parent run id of the sweep to report (default: the latest sweep); repeat it to report several "
        "sweeps together, e.g. a VGG and a degradation sweep on one error-against-depth picture (depth.png)",
    )
    r.add_argument("--out", default="report", help="output directory for Markdown/CSV/JSON/PNG")
    r.set_defaults(func=handlers["report"])

    y = sub.add_parser(
        "sync",
        help="deliver the MLflow logging calls an outage left spooled in a storage, run or spool directory",
    )
    y.add_argument(
        "path",
        metavar="STORAGE_DIR_OR_RUN_DIR",
        help="--storage-path (all its runs), one run's dir, or a spool",
    )
    y.add_argument(
        "--tracking-uri",
        help="send to this MLflow instead of the one recorded in the spool (e.g. a new address)",
    )
    y.set_defaults(func=handlers["sync"])

    d = sub.add_parser(
        "demo", help="everything on Fashion-MNIST with embedded defaults (local Ray, SQLite MLflow)"
    )
    d.add_argument("--workdir", default="demo-work")
    d.add_argument("--fashion-mnist", help="directory with the Fashion-MNIST *-ubyte.gz files")
    d.add_argument("--quick", action="store_true", help="a shortened demo (tests)")
    d.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="training images per class (default 600, 6000 with --plan study; 100 with --quick)",
    )
    d.add_argument(
        "--plan",
        choices=("mini", "study", "degradation-mini"),
        default="mini",
        help="mini: the 10-minute demo; study: all of Fashion-MNIST with the study plan (~90 min on 2 cores); "
        "degradation-mini: all of Fashion-MNIST, plain vs residual nets (He et al. 2016; cap the epochs with --set)",
    )
    d.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run of the sweep, e.g. schedule.epochs=3 (repeatable)",
    )
    _add_address(d)
    d.set_defaults(func=handlers["demo"])
    return p
