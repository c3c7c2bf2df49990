"""`dcq bench heads ...`: the command line of the head benchmark."""

from __future__ import annotations

import argparse
import sys

from dcq.bench.heads import HeadsConfig, bench_heads
from dcq.bench.report import format_table, plot_title, save_plot, summary_lines, write_json
from dcq.errors import DcqError


def configure_bench(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    heads = sub.add_parser(
        "heads",
        help="head step time and memory against the number of identities (FC, Partial FC, DCQ)",
        description="Time one head step (forward + backward + optimiser step) and count its memory "
        "for FC, Partial FC and DCQ at each number of classes; ratios are to DCQ with the fixed queue.",
    )
    heads.add_argument("--classes", default="1e4,1e5,1e6",
                       help="comma-separated numbers of classes, e.g. 1e4,1e5,1e6 (default: %(default)s)")
    heads.add_argument("--batch", type=int, default=128, help="embeddings per step (default: %(default)s)")
    heads.add_argument("--dim", type=int, default=512, help="embedding size (default: %(default)s)")
    heads.add_argument("--queue", type=int, default=8192, help="fixed DCQ queue size (default: %(default)s)")
    heads.add_argument("--queue-fraction", type=float, default=0.1,
                       help="second DCQ row: queue of this fraction of the classes (default: %(default)s)")
    heads.add_argument("--sample-rate", type=float, default=0.1,
                       help="Partial FC sample rate (default: %(default)s)")
    heads.add_argument("--repeats", type=int, default=5, help="timed steps per head (default: %(default)s)")
    heads.add_argument("--warmup", type=int, default=2, help="untimed steps per head first (default: %(default)s)")
    heads.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: %(default)s")
    heads.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                       help="embeddings' dtype; bf16 also runs the step under bf16 autocast, as mixed "
                       "precision training does (the heads compute logits in fp32 either way)")
    heads.add_argument("--memory-budget", default=None, metavar="BYTES",
                       help="report sizes whose estimated need exceeds this (e.g. 8G, 512M) as out of "
                       "memory (default: available RAM on CPU, free device memory on CUDA)")
    heads.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    heads.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    heads.add_argument("--json", default=None, metavar="OUT", help="write rows + config as JSON")
    heads.add_argument("--plot", default=None, metavar="OUT.png",
                       help="log-log plot of step time and state memory against classes")


def run_bench(args: argparse.Namespace) -> int:
    command = getattr(args, "bench_command", None)
    if command == "heads":
        return run_heads(args)
    raise DcqError("`dcq bench` needs a benchmark name: run `dcq bench heads --classes 1e4,1e5,1e6` "
                   "(see `dcq bench heads --help`)")


def run_heads(args: argparse.Namespace) -> int:
    config = HeadsConfig.from_args(args)
    result = bench_heads(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result["rows"]))
    for line in summary_lines(result["rows"]):
        print(line)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        save_plot(result["rows"], args.plot, title=plot_title(result["config"]))
        print(f"wrote {args.plot}")
    return 0
