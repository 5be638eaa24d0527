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

from vggdist import cli_parser, console
from vggdist.config import (
    Config,
    ConfigError,
    default_preset,
    preset,
)
from vggdist.failures import CommandFailed
from vggdist.runmeta import PROTOCOLS

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
        sets=args.sets,
    )


def _int_list(s: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, e.g. {flag} 256,384,512") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command (`vggdist.cli_parser`), each bound to its `cmd_*` function here."""
    return cli_parser.build_parser(
        {
            "models": cmd_models,
            "train": cmd_train,
            "evaluate": cmd_evaluate,
            "sweep": cmd_sweep,
            "report": cmd_report,
            "sync": cmd_sync,
            "demo": cmd_demo,
        }
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _raised_by_vggdist(e: BaseException) -> bool:
    """True when `e` comes from a `raise` statement of vggdist itself: a check of the input whose message names
    the fix (a usage error). A ValueError raised inside torch, numpy, MLflow or Ray, or by a builtin such as
    int() on a value vggdist computed, is an internal error, not the user's."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not path.startswith(_PACKAGE_DIR + os.sep):
        return False
    import linecache

    return linecache.getline(path, tb.tb_lineno).strip().startswith("raise ")


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
        if not _raised_by_vggdist(e):  # a bug, here or in a library: the traceback is what helps
            traceback.print_exc()
            return 1
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
