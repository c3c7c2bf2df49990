#!/usr/bin/env python
"""Full training steps with a real backbone: what DCQ adds to training the backbone.

Configurations, all built side by side and timed in interleaved repeats (median reported):

- ``backbone``  backbone forward + a tiny FC head (``--tiny-classes``, 100) + backward + SGD step:
                the cost of training the feature extractor alone;
- ``dcq@N kK``  DCQ: EMA update of the weight generator (`dcq.MomentumEncoder`) + key forward of
                the K reference images per item (no grad) + sample forward + DCQ head (queue
                ``--queue``, prefilled; ``+ib``: the batch's own generated weights as negatives too)
                + backward + gradient clipping + SGD step, for each recipe of ``--recipes``
                (``k1``: the official code's; ``k2+ib``: `dcq train`'s default);
- ``fc@N``      backbone + FullFC over N classes + backward + gradient clipping + SGD step;
- ``pfc@N``     backbone + PartialFC over N classes (``--sample-rate``, 0.1), sampled on the device.

Each DCQ row is timed for every queue of ``--queue``: a count (8192) or a share of the identities
(``10%``, the default recipe's queue_fraction). Batches are what the loader hands over: uint8 images
in the decoder's pixel order (NHWC memory), pinned on CUDA, copied and normalised by the step.

Every configuration runs `dcq.train.step.TrainStep`, the step `dcq train` runs (GradScaler and
gradient clipping at ``--grad-clip``, 5.0 as in the default config, included).

The printed ratio "vs backbone" is step time / backbone-only step time. The floor for DCQ is K
extra no-grad forward passes of the backbone (about 1.3x per reference on CPU with cpunet).

Defaults are the CPU setting (cpunet at 40 px, 128-d embedding, batch 128, FC at 1e5 classes);
the GPU setting is ``--device cuda --amp bf16 --backbone iresnet50 --image-size 112 --dim 512``.

Memory per configuration: ``resident_bytes`` = backbone (+ weight generator) + head parameters,
gradients, optimiser state and buffers after a step; ``peak_bytes`` = resident at the start of a
step + the most extra tensor memory alive during it (activations, logits, temporaries), measured
as in `dcq bench heads` (CUDA: max_memory_allocated delta; CPU: dispatch-mode live-tensor tracker).
A configuration that runs out of memory (CUDA OOM, or on CPU an estimated need above available RAM)
is reported as such and the others go on.

Examples:
    python benchmarks/train_step.py                                  # CPU, ~1 minute
    python benchmarks/train_step.py --device cuda --amp bf16 --backbone iresnet50 \\
        --image-size 112 --dim 512 --dcq-classes 1e5,1e6,1e7 --fc-classes 1e5,1e6 --json out.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import dcq
from dcq.bench import (
    BUDGET_SHARE,
    OOM,
    HeadCase,
    attempt,
    available_memory,
    check_output_path,
    estimate_head_bytes,
    format_bytes,
    free_memory,
    measure_peak,
    parse_counts,
    state_bytes,
    state_tensors,
    sync,
    time_interleaved,
    timed,
    write_json,
)
from dcq.errors import DcqError
from dcq.tables import text_table
from dcq.train.step import TrainStep


@dataclass
class Options:
    backbone: str
    image_size: int
    dim: int
    batch: int
    queue: int
    tiny_classes: int
    device: torch.device
    amp: str  # "none" | "bf16" | "fp16" (fp16 with a GradScaler, as dcq train runs it)
    channels_last: bool
    grad_clip: float
    seed: int
    sample_rate: float = 0.1


def parse_recipes(text: str) -> list[tuple[int, bool]]:
    """'k1,k2+ib' -> [(1, False), (2, True)]: references per class weight, in-batch negatives."""
    recipes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        body, _, extra = item.partition("+")
        if not body.startswith("k") or not body[1:].isdigit() or int(body[1:]) < 1 or extra not in ("", "ib"):
            raise DcqError(f"--recipes: {item!r} is not kK or kK+ib (e.g. k1,k2+ib)")
        recipes.append((int(body[1:]), extra == "ib"))
    if not recipes:
        raise DcqError("--recipes: give at least one recipe, e.g. k1,k2+ib")
    return recipes


def recipe_name(recipe: tuple) -> str:
    """(k, in-batch[, queue]) -> 'k2+ib' or 'k2+ib q8192'."""
    return f"k{recipe[0]}" + ("+ib" if recipe[1] else "") + (f" q{recipe[2]}" if len(recipe) > 2 else "")


def parse_queues(text: str) -> list[str]:
    """'8192,10%' -> ['8192', '10%']: queue lengths as counts or shares of the identities."""
    queues = [t.strip() for t in str(text).split(",") if t.strip()]
    for q in queues:
        body = q[:-1] if q.endswith("%") else q
        try:
            ok = float(body) > 0 and (q.endswith("%") or float(body).is_integer())
        except ValueError:
            ok = False
        if not ok or (q.endswith("%") and float(body) > 100):
            raise DcqError(f"--queue: {q!r} is not a count (8192) or a share of the identities (10%)")
    if not queues:
        raise DcqError("--queue: give at least one queue length, e.g. 8192,10%")
    return queues


def queue_length(spec: str, classes: int) -> int:
    return max(1, round(float(spec[:-1]) / 100 * classes)) if spec.endswith("%") else int(float(spec))


class StepRunner:
    """One configuration: backbone (+ weight generator) + head + SGD in a TrainStep, on random images."""

    def __init__(self, mode: str, classes: int, opt: Options, pool, recipe: tuple[int, bool] = (1, False)):
        self.mode, self.classes, self.opt, self.pool = mode, classes, opt, pool
        self.references, in_batch = recipe[:2]
        self.recipe = recipe
        self.times: list[float] = []
        self.index = 0
        dev = opt.device
        torch.manual_seed(opt.seed)
        backbone = dcq.models.get_backbone(opt.backbone, embedding_size=opt.dim, image_size=opt.image_size)
        backbone = backbone.to(dev)
        if opt.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        generator = None
        if mode == "dcq":
            queue = recipe[2] if len(recipe) > 2 else opt.queue
            generator = dcq.MomentumEncoder(backbone, momentum=0.999).to(dev)
            head = dcq.DynamicClassQueue(embedding_size=opt.dim, queue_size=queue,
                                         in_batch_negatives=in_batch).to(dev)
            gen = torch.Generator().manual_seed(opt.seed + 1)
            keys = nn.functional.normalize(torch.randn(queue, opt.dim, generator=gen), dim=1)
            head.queue.enqueue(keys.to(dev), torch.randint(0, classes, (queue,), generator=gen).to(dev))
        elif mode == "pfc":
            with torch.device(dev):
                head = dcq.PartialFC(opt.dim, classes, sample_rate=opt.sample_rate).to(dev)
        else:
            with torch.device(dev):
                head = dcq.FullFC(opt.dim, classes).to(dev)
        params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        head.bind_optimizer(optimizer)
        scaler = torch.amp.GradScaler("cuda", enabled=opt.amp == "fp16" and dev.type == "cuda")
        self.train_step = TrainStep(backbone, head, optimizer, generator, amp=opt.amp, grad_clip=opt.grad_clip,
                                    scaler=scaler)
        self.train_step.train()
        self.labels = [torch.randint(0, classes, (opt.batch,), generator=torch.Generator().manual_seed(i)).to(dev)
                       for i in range(len(pool))]

    @property
    def name(self) -> str:
        if self.mode == "backbone":
            return "backbone"
        return f"{self.mode}@{self.classes:g}" + (f" {recipe_name(self.recipe)}" if self.mode == "dcq" else "")

    def step(self) -> None:
        i = self.index % len(self.pool)
        self.index += 1
        samples, references = self.pool[i]
        refs = references[:, :self.references] if self.mode == "dcq" else None  # FC/PFC load none
        self.train_step(samples, refs, self.labels[i], device=self.opt.device)  # (B, K, 3, S, S) uint8

    def timed_step(self) -> float:
        return timed(self.step, self.opt.device)

    def _state(self):
        return self.train_step.modules(), [self.train_step.optimizer]

    def resident_bytes(self) -> int:
        return state_bytes(*self._state())

    def peak_bytes(self) -> int:
        return measure_peak(self.step, lambda: list(state_tensors(*self._state())), self.opt.device)

    def close(self) -> None:
        self.train_step = None


def _built_and_warm(mode: str, classes: int, opt: Options, pool, warmup: int, recipe=(1, False)) -> StepRunner:
    runner = StepRunner(mode, classes, opt, pool, recipe)
    for _ in range(warmup):
        runner.step()
    return runner


def estimated_need(mode: str, classes: int, opt: Options, param_bytes: int, queue: int | None = None) -> int:
    """Parameter-related bytes + the head's estimate (activations are not estimated)."""
    copies = 4 if mode == "dcq" else 3  # weights, grads, momentum (+ the weight generator's copy)
    if mode == "dcq":
        case = HeadCase("dcq", classes, queue_size=queue or opt.queue)
    elif mode == "pfc":
        case = HeadCase("pfc", classes, sample_rate=opt.sample_rate)
    else:
        case = HeadCase("fc", classes)
    s, t = estimate_head_bytes(case, opt.batch, opt.dim)
    return copies * param_bytes + s + t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="cpunet", help="cpunet | iresnet18/34/50/100 (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="default: 40 for cpunet, 112 for iresnet")
    p.add_argument("--dim", type=int, default=128, help="embedding size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="default: %(default)s")
    p.add_argument("--dcq-classes", default="1e5",
                   help="identities for the DCQ rows (only the label range changes; default: %(default)s)")
    p.add_argument("--fc-classes", default="1e5",
                   help="classes of the FC rows; 'none' for no FC (default: %(default)s)")
    p.add_argument("--queue", default="8192", help="DCQ queue lengths: counts and/or shares of the identities, "
                   "e.g. 8192,10%% (default: %(default)s)")
    p.add_argument("--pfc-classes", default="none", help="Partial FC class counts, e.g. 1e5,1e6 (default: none)")
    p.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC sample rate (default: %(default)s)")
    p.add_argument("--recipes", default="k1,k1+ib,k2+ib",
                   help="DCQ recipes: kK = K references per class weight, +ib = in-batch negatives "
                        "(default: %(default)s; k2+ib is dcq train's default)")
    p.add_argument("--tiny-classes", type=int, default=100, help="the backbone-only row's FC (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast dtype; fp16 with a GradScaler, CUDA only (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="backbone in channels_last memory format")
    p.add_argument("--grad-clip", type=float, default=5.0,
                   help="max gradient norm of the backbone, as the config's grad_clip; 0 disables "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile two steps per configuration and print the top operators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write rows + config as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except DcqError as exc:
        print(f"train_step: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DcqError(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.amp == "fp16" and args.device != "cuda":
        raise DcqError("--amp fp16 needs --device cuda (use bf16 on the CPU)")
    queues = parse_queues(args.queue)
    for name in ("batch", "dim", "repeats", "tiny_classes"):
        if getattr(args, name) < 1:
            raise DcqError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.json:
        check_output_path(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    image_size = args.image_size or (40 if args.backbone == "cpunet" else 112)
    try:
        dcq.models.get_backbone(args.backbone, embedding_size=args.dim, image_size=image_size)
    except ValueError as exc:
        raise DcqError(f"--backbone/--image-size: {exc}") from None
    opt = Options(args.backbone, image_size, args.dim, args.batch, queue_length(queues[0], 1), args.tiny_classes,
                  device, args.amp, args.channels_last, args.grad_clip, args.seed, args.sample_rate)
    dcq_classes = parse_counts(args.dcq_classes, "--dcq-classes")
    fc_classes = [] if str(args.fc_classes).lower() == "none" else parse_counts(args.fc_classes, "--fc-classes")
    pfc_classes = [] if str(args.pfc_classes).lower() == "none" else parse_counts(args.pfc_classes, "--pfc-classes")
    recipes = parse_recipes(args.recipes)
    plan = ([("backbone", args.tiny_classes, None)]
            + [("dcq", n, (*r, queue_length(q, n))) for n in dcq_classes for q in queues for r in recipes]
            + [("fc", n, None) for n in fc_classes] + [("pfc", n, None) for n in pfc_classes])
    k_max = max(k for k, _ in recipes)

    gen = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"

    def loader_batch(*shape: int) -> torch.Tensor:
        """uint8 (..., 3, S, S) over NHWC memory, as collate_pairs hands it over (pinned on CUDA)."""
        pixels = torch.randint(0, 256, (*shape, image_size, image_size, 3), dtype=torch.uint8, generator=gen)
        return (pixels.pin_memory() if pin else pixels).movedim(-1, -3)

    pool = [(loader_batch(args.batch), loader_batch(args.batch, k_max)) for _ in range(2)]
    param_bytes = sum(p.numel() * p.element_size() for p in dcq.models.get_backbone(
        args.backbone, embedding_size=args.dim, image_size=image_size).parameters())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[tuple, dict[str, Any]] = {}
    runners: dict[tuple, StepRunner] = {}
    for key in plan:
        mode, classes, recipe = key
        need = estimated_need(mode, classes, opt, param_bytes, recipe[2] if mode == "dcq" else None)
        budget = int(BUDGET_SHARE * available_memory(device))
        if device.type == "cpu" and need > budget:
            results[key] = {"error": OOM}
            log(f"{mode}@{classes:g}: needs ~{format_bytes(need)} > budget {format_bytes(budget)}: {OOM}")
            continue
        ok, runner = attempt(_built_and_warm, mode, classes, opt, pool, args.warmup, recipe or (1, False))
        if ok:
            runners[key] = runner
        else:
            _drop(runners, results, key, device, log)
        del runner
    log(f"timing {', '.join(r.name for r in runners.values())}: {args.repeats} interleaved repeats")
    time_interleaved(runners, args.repeats, lambda key: _drop(runners, results, key, device, log))

    for key, runner in list(runners.items()):
        res = {"step_ms": 1000.0 * statistics.median(runner.times), "resident_bytes": runner.resident_bytes(),
               "peak_bytes": None}
        if not args.no_memory:
            ok, peak = attempt(runner.peak_bytes)
            res["peak_bytes"] = peak if ok else OOM
        results[key] = res

    if args.profile:
        profile(runners)
    for runner in runners.values():
        runner.close()
    runners.clear()
    free_memory(device)

    rows = []
    base = results.get(("backbone", args.tiny_classes, None), {}).get("step_ms")
    for mode, classes, recipe in plan:
        res = results[(mode, classes, recipe)]
        row = {"mode": mode, "classes": classes, "queue_size": recipe[2] if mode == "dcq" else None,
               "references": recipe[0] if recipe else None, "in_batch_negatives": recipe[1] if recipe else None}
        if "error" in res:
            row.update(step_ms=None, samples_per_s=None, vs_backbone=None, resident_bytes=None,
                       peak_bytes=None, error=res["error"])
        else:
            row.update(step_ms=round(res["step_ms"], 3),
                       samples_per_s=round(args.batch * 1000.0 / res["step_ms"], 1),
                       vs_backbone=round(res["step_ms"] / base, 4) if base else None,
                       resident_bytes=res["resident_bytes"], peak_bytes=res["peak_bytes"])
        rows.append(row)
    print(format_rows(rows, args.batch))
    for row in rows:
        if row["mode"] == "dcq" and row.get("vs_backbone"):
            print(f"DCQ {recipe_name((row['references'], row['in_batch_negatives'], row['queue_size']))} step / "
                  "backbone-only step "
                  f"({row['classes']:g} identities): {row['vs_backbone']:.3f}")
    config = {
        "benchmark": "train_step", "backbone": args.backbone, "image_size": image_size, "dim": args.dim,
        "batch": args.batch, "queue": queues, "sample_rate": args.sample_rate, "tiny_classes": args.tiny_classes,
        "repeats": args.repeats,
        "warmup": args.warmup, "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
        "grad_clip": args.grad_clip, "threads": torch.get_num_threads(), "seed": args.seed,
        "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=5e-4) over backbone + head parameters",
        "step": "dcq.train.step.TrainStep, as dcq train runs it",
        "step_ms": "median over repeats, configurations interleaved in rotating order",
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "processor": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
    }
    if args.json:
        write_json(args.json, {"rows": rows, "config": config})
        print(f"wrote {args.json}")
    return 0


def _drop(runners, results, key, device, log) -> None:
    runner = runners.pop(key, None)
    if runner is not None:
        runner.close()
    results[key] = {"error": OOM}
    free_memory(device)
    log(f"{key[0]}@{key[1]:g}{' ' + recipe_name(key[2]) if key[2] else ''}: {OOM}")


def format_rows(rows: list[dict[str, Any]], batch: int) -> str:
    header = ["config", "step ms", "vs backbone", "samples/s", "resident", "peak"]
    lines = []
    for r in rows:
        name = "backbone" if r["mode"] == "backbone" else f"{r['mode']}@{r['classes']:g}"
        if r["mode"] == "dcq":
            name += " " + recipe_name((r["references"], r["in_batch_negatives"], r["queue_size"]))
        if r.get("error"):
            lines.append([name, r["error"], "", "", "", ""])
            continue
        peak = r["peak_bytes"] if isinstance(r["peak_bytes"], str) else format_bytes(r["peak_bytes"])
        lines.append([name, f"{r['step_ms']:.1f}", f"{r['vs_backbone']:.3f}" if r["vs_backbone"] else "-",
                      f"{r['samples_per_s']:.0f}", format_bytes(r["resident_bytes"]), peak])
    return text_table(header, lines, left=1)


def profile(runners: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for runner in runners.values():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.opt.device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                runner.step()
            sync(runner.opt.device)
        sort = "self_cuda_time_total" if runner.opt.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== profile: {runner.name} (2 steps) ==")
        print(prof.key_averages().table(sort_by=sort, row_limit=18))


if __name__ == "__main__":
    sys.exit(main())
