#!/usr/bin/env python
"""The backbones side by side: parameters, multiply-adds per image, and a CPU training step.

- ``params``: parameters of the backbone at ``--dim`` (BatchNorm statistics excluded);
- ``GMACs``: multiply-adds of one image's forward pass (`dcq.models.complexity`: FLOPs counted by
  `torch.utils.flop_counter` on the meta device, halved; the convention of arcface_torch's table);
- ``step``: one training step as `dcq train` runs it (`dcq.train.step.TrainStep`): forward of a
  batch of random images, a 100-class FC head (so the step is the backbone's), backward, gradient
  clipping at 5, SGD (momentum 0.9, weight decay 5e-4). No weight generator: a DCQ step adds one
  no-grad forward of the references (`benchmarks/train_step.py` measures that).

Every backbone is built first, then each of ``--repeats`` rounds steps every backbone once in a
rotating order (interleaved), after ``--warmup`` untimed steps; the median is reported, so noise
from other jobs on the machine hits all backbones alike. The CPU default is one thread.

    python benchmarks/backbones.py --json benchmarks/results/backbones-cpu.json
    python benchmarks/backbones.py --backbones mbf,vit_t --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch

import dcq
from dcq.bench import check_output_path, time_interleaved, timed, write_json
from dcq.errors import DcqError
from dcq.models.complexity import multiply_adds, parameter_count
from dcq.tables import text_table
from dcq.train.step import TrainStep

DEFAULT = "r18,r34,r50,r100,r200,mbf,vit_t,vit_s,vit_b,cpunet"
CLASSES = 100


def default_size(name: str) -> int:
    return 40 if name == "cpunet" else 112


class Runner:
    """One backbone in a TrainStep with a small FC head, fed a fixed random batch."""

    def __init__(self, name: str, size: int, dim: int, batch: int, seed: int):
        torch.manual_seed(seed)
        backbone = dcq.models.get_backbone(name, embedding_size=dim, image_size=size)
        head = dcq.FullFC(dim, CLASSES)
        params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.step_fn = TrainStep(backbone, head, optimizer, None, grad_clip=5.0)
        self.step_fn.train()
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
        self.labels = torch.randint(0, CLASSES, (batch,), generator=gen)
        self.times: list[float] = []

    def step(self) -> None:
        self.step_fn(self.images, self.images.unsqueeze(1), self.labels)

    def timed_step(self) -> float:
        return timed(self.step, torch.device("cpu"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=DEFAULT, help="comma-separated names (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="default: 112 (cpunet: 40)")
    p.add_argument("--dim", type=int, default=512, help="embedding size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per backbone first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--no-step", action="store_true", help="only parameters and multiply-adds (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write rows + config as JSON")
    return p.parse_args(argv)


def run(args) -> int:
    names = [n for n in args.backbones.split(",") if n]
    unknown = [n for n in names if n not in dcq.models.BACKBONES]
    if unknown:
        raise DcqError(f"--backbones: unknown {', '.join(unknown)}; choose from {', '.join(dcq.models.BACKBONES)}")
    for key in ("batch", "repeats", "dim", "threads"):
        if getattr(args, key) < 1:
            raise DcqError(f"--{key} must be >= 1")
    if args.json:
        check_output_path(args.json, "--json")
    torch.set_num_threads(args.threads)
    sizes = {n: args.image_size or default_size(n) for n in names}
    for n in names:
        problem = dcq.models.image_size_problem(n, sizes[n])
        if problem:
            raise DcqError(f"--image-size {sizes[n]}: {problem}")
    rows = {n: {"backbone": n, "image_size": sizes[n], "params": parameter_count(n, args.dim, sizes[n]),
                "macs": multiply_adds(n, args.dim, sizes[n]), "step_ms": None} for n in names}
    if not args.no_step:
        runners = {}
        for n in names:
            print(f"building {n} and {args.warmup} warm-up step(s)", file=sys.stderr, flush=True)
            runners[n] = Runner(n, sizes[n], args.dim, args.batch, args.seed)
            for _ in range(args.warmup):
                runners[n].step()
        print(f"timing {args.repeats} interleaved rounds", file=sys.stderr, flush=True)
        time_interleaved(runners, args.repeats, lambda key: runners.pop(key))
        for n, runner in runners.items():
            rows[n]["step_ms"] = round(1000 * statistics.median(runner.times), 1)
    table = [[r["backbone"], f"{r['image_size']}", f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}",
              "-" if r["step_ms"] is None else f"{r['step_ms']:.0f}",
              "-" if r["step_ms"] is None else f"{args.batch * 1000 / r['step_ms']:.1f}"] for r in rows.values()]
    print(text_table(["backbone", "px", "params", "GMACs", f"step ms (batch {args.batch})", "images/s"], table))
    config = {"benchmark": "backbones", "dim": args.dim, "batch": args.batch, "repeats": args.repeats,
              "warmup": args.warmup, "threads": torch.get_num_threads(), "seed": args.seed,
              "macs": "multiply-adds of one eval-mode forward pass (flop_counter FLOPs / 2)",
              "step": f"TrainStep: forward, FullFC({CLASSES}) head, backward, grad clip 5, SGD; median of repeats",
              "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
              "processor": platform.processor()}
    if args.json:
        write_json(args.json, {"rows": list(rows.values()), "config": config})
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except DcqError as exc:
        print(f"backbones: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
