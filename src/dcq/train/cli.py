"""`dcq train CONFIG.yaml [--set key=value ...] [--resume [PATH]] [--overwrite]` (also under torchrun)."""

from __future__ import annotations

import argparse
import sys


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see configs/); omitted = built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=0.05 --set head=pfc (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest step_*.pt in the output dir, or from PATH; "
                             "'auto': the newest if there is one, else start fresh (for torchrun --max-restarts)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier run in the output folder (without it, a used folder is refused)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_train(args: argparse.Namespace) -> int:
    from dcq.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from dcq.distributed import CollectiveFailure, exit_process, launched_world_size
    from dcq.train.loop import TrainingStopped, train

    try:
        summary = train(cfg, resume=args.resume, log_fn=None, overwrite=args.overwrite)
    except CollectiveFailure as exc:  # a lost rank: one line, and no teardown of the broken process group
        print(f"dcq {args.command}: error: {exc}", file=sys.stderr, flush=True)
        exit_process(2)
    except TrainingStopped as exc:  # pre-empted: saved; the scheduler sees the SIGTERM exit code
        print(f"dcq {args.command}: {exc}", file=sys.stderr, flush=True)
        if launched_world_size() > 1:
            exit_process(exc.exit_code)
        return exc.exit_code
    if summary["final"] is not None:  # rank 0 (or the only process) reports
        for name, m in (summary.get("metrics") or {}).items():
            print(f"{name}: accuracy {m['accuracy']:.4f} ± {m['accuracy_std']:.4f} ({m['pairs']} pairs)")
        print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f}s; model: {summary['final']}")
    if launched_world_size() > 1:  # all saved and the process group destroyed: leave before the teardown can abort
        exit_process(0)
    return 0
