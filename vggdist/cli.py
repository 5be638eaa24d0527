"""The `vggdist` console script: models, train, evaluate, sweep, report, sync, demo.

Each sub-command parses flags and calls one library function; a bad value is a one-line error naming the fix,
with exit code 2 (usage), and heavy imports (torch, ray, mlflow) happen only in the command that needs them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from vggdist import console
from vggdist.config import (
    CONFIG_NAMES,
    INIT_CHOICES,
    PRESETS,
    Config,
    ConfigError,
    default_preset,
    preset,
)
from vggdist.failures import CommandFailed
from vggdist.runmeta import DEFAULT_EXPERIMENT, PROTOCOLS

USAGE_ERROR = 2


class UsageError(Exception):
    """Raised for a command line that cannot work; printed as one line, exit code 2."""


def _config_from_args(args: argparse.Namespace) -> Config:
    cfg = (
        Config.load(args.config_file)
        if getattr(args, "config_file", None)
        else preset(args.preset or default_preset(args.config), model=args.config)
    )
    if getattr(args, "config_file", None):
        cfg = cfg.override([f"model.name={args.config}"])
    sets = list(args.set or [])
    for flag, key in (
        ("epochs", "schedule.epochs"),
        ("workers", "run.workers"),
        ("init", "run.init"),
        ("init_from", "run.init_from"),
        ("experiment", "run.experiment"),
        ("run_name", "run.run_name"),
        ("storage_path", "run.storage_path"),
        ("max_failures", "run.max_failures"),
        ("grad_compression", "run.grad_compression"),
        ("seed", "run.seed"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            sets.append(f"{key}={v}")
    if getattr(args, "gpu", False):
        sets.append("run.gpu=true")
    return cfg.override(sets)


def cmd_models(args: argparse.Namespace) -> int:
    from vggdist import resnet
    from vggdist.models import describe_all, format_table
    from vggdist.paper import SCALES

    entries = describe_all(num_classes=args.num_classes, **SCALES[args.scale])
    entries += resnet.describe_all(args.num_classes, scale=args.scale, shortcut=args.shortcut)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print(format_table(entries))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vggdist.ray_train import train

    cfg = _config_from_args(args)
    result = train(cfg, args.data, stage=args.stage, address=args.address, callbacks=args.callbacks)
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "run_name": result.run_name,
                "checkpoint": result.checkpoint,
                "best_checkpoint": result.best_checkpoint,
                **({"warning": result.warning} if result.warning else {}),
                **(
                    {"mlflow_spooled": result.spooled, "deliver_with": f"vggdist sync {result.run_dir}"}
                    if result.spooled
                    else {}
                ),
                **{k: round(v, 4) for k, v in result.metrics.items()},
            },
            indent=2,
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vggdist.ray_eval import evaluate

    if not args.run and not args.checkpoint:
        raise UsageError(
            "evaluate needs --run RUN_ID (from the MLflow UI or `vggdist train`) or --checkpoint PATH"
        )
    protocols = tuple(p.strip() for p in (args.protocols or "").split(",") if p.strip()) or None
    bad = [p for p in protocols or () if p not in PROTOCOLS]
    if bad:
        raise UsageError(f"--protocols has unknown {bad}; choose from {','.join(PROTOCOLS)}")
    scales = _int_list(args.scales, "--scales") if args.scales else None
    table = evaluate(
        args.run or args.checkpoint,
        args.data,
        protocols=protocols,
        scales=scales,
        ensemble=args.ensemble or [],
        workers=args.workers,
        split=args.split,
        address=args.address,
        log_to_run=not args.no_log,
        gpu=args.gpu,
    )
    print(table["markdown"])
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vggdist.sweep import run_sweep

    summary = run_sweep(
        args.data,
        plan=args.plan,
        workers=args.workers,
        experiment=args.experiment,
        sweep_name=args.name,
        address=args.address,
        sets=args.set or [],
        gpu=args.gpu,
        max_concurrent=args.max_concurrent,
        callbacks=args.callbacks,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vggdist.report import make_report

    out = make_report(experiment=args.experiment, out_dir=args.out, sweep_run_id=args.sweep)
    print(out["markdown"])
    print(f"\nwritten: {', '.join(out['files'])}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from vggdist import tracking

    results = tracking.sync(args.path, uri=args.tracking_uri)
    for r in results:
        print(r.line())
    left = [r for r in results if r.left.calls]
    if not results:
        print(f"{args.path}: nothing spooled (every MLflow logging call there is delivered)")
    elif not left:
        print(f"done: {len(results)} spool(s) delivered")
    return 1 if left else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vggdist.demo import run_demo

    return run_demo(
        workdir=args.workdir,
        fashion_mnist=args.fashion_mnist,
        quick=args.quick,
        train_per_class=args.train_per_class,
        address=args.address,
        plan=args.plan,
    )


def _int_list(s: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, e.g. {flag} 256,384,512") from None


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


def build_parser() -> argparse.ArgumentParser:
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
    m.set_defaults(func=cmd_models)

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
    t.set_defaults(func=cmd_train)

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
    e.set_defaults(func=cmd_evaluate)

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
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="paper-style Tables 3-6 and an error-vs-depth plot from MLflow")
    r.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    r.add_argument(
        "--sweep",
        action="append",
        help="parent run id of the sweep to report (default: the latest sweep); repeat it to report several "
        "sweeps together, e.g. a VGG and a degradation sweep on one error-against-depth picture (depth.png)",
    )
    r.add_argument("--out", default="report", help="output directory for Markdown/CSV/JSON/PNG")
    r.set_defaults(func=cmd_report)

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
    y.set_defaults(func=cmd_sync)

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
        choices=("mini", "study"),
        default="mini",
        help="mini: the 10-minute demo; study: all of Fashion-MNIST with the study plan (~90 min on 2 cores)",
    )
    _add_address(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[object] = ()) -> int:
    """Run one `vggdist` command; returns its exit code. `callbacks` (`vggdist.callbacks`) reach the training
    workers of `train` and `sweep`: the extension point for a program that wraps the CLI."""
    args = build_parser().parse_args(argv)
    args.callbacks = tuple(callbacks)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    console.set_verbose(bool(args.verbose))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"vggdist {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, FileNotFoundError) as e:
        # boundary errors (data dirs, checkpoints, manifests) carry the fix in their message
        print(f"vggdist {args.command}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except ConnectionError as e:  # MLflow unreachable when a run must be created: nothing ran, nothing lost
        print(f"vggdist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except CommandFailed as e:  # it ran and stopped (e.g. a full storage): one line saying how to go on
        if args.verbose:
            traceback.print_exc()
        print(f"vggdist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The console script: `main`, then a quick exit. Every file a command writes is closed and synced by then;
    the interpreter's teardown of torch, Ray and MLflow modules would only add seconds. Exit handlers (Ray's
    shutdown, logging's flush) still run."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
