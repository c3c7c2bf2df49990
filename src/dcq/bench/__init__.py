"""`dcq bench`: how the heads' step time and memory grow with the number of identities.

`dcq bench heads --classes 1e4,1e5,1e6` times one *head step* for every number of classes N:

- ``fc``   FullFC over all N classes;
- ``pfc``  PartialFC sampling ``--sample-rate`` of the class centres (its step gathers/scatters
           rows of weights and momentum around the optimiser step);
- ``dcq``  DynamicClassQueue with a fixed queue (``--queue``, 8192) and with a queue of
           ``--queue-fraction`` of the classes (the paper's ~10%).

A head step is what the head adds to a training step, run by the training step itself
(`dcq.train.step.TrainStep`) with precomputed embeddings and keys: forward + backward (the gradient
w.r.t. a random embedding batch that requires grad, as the backbone's output would) + the
optimiser step on the head's own state (SGD, momentum 0.9, weight decay 5e-4, for FC and Partial FC; DCQ has no
parameters and its "step" is the enqueue inside its forward). DCQ keys are random unit vectors: the
weight generator's cost belongs to the backbone and is measured by `benchmarks/train_step.py`.

Timing: all heads of one N are built side by side and, after warm-up, each repeat runs one step of
every head in a rotating order (heads interleaved), so machine noise hits all heads alike; the
median of the repeats is reported. If the heads of one N do not fit in memory together, they run in
groups, and the DCQ fixed-queue head (the reference of every ratio) joins every group.

Memory (bytes of live tensors, the same quantity on every device):
- ``state_bytes``: the head's resident state after a step, counted exactly: parameters, their
  ``.grad``, the optimiser's state tensors and the module's buffers (the DCQ queue), each storage
  counted once.
- ``peak_bytes``: the resident state at the start of a step plus the largest amount of extra tensor
  memory alive at any moment during the step. CUDA: ``torch.cuda.max_memory_allocated`` delta.
  CPU: a dispatch-mode tracker sees every tensor an operator creates (forward, backward and
  optimiser step) and when its storage is freed. It counts tensor storages, not allocator
  overhead or scratch memory a kernel allocates internally.

A size whose estimated need exceeds the memory budget (available RAM on CPU, free device memory on
CUDA) is not allocated and is reported as out of memory, as is a CUDA OOM; one over ``--memory-budget``
is reported as ``over --memory-budget (needs X)``.

Modules: `cli` (the command), `heads` (cases, estimates, the runner, the benchmark), `memory`
(state counts, the live-tensor tracker, budgets, out-of-memory handling, timing), `report` (table,
summary, JSON, plot) and `units` (parsing and printing counts and sizes).
"""

from dcq.bench.cli import configure_bench, run_bench, run_heads
from dcq.bench.heads import (
    HeadCase,
    HeadRunner,
    HeadsConfig,
    PrecomputedEmbeddings,
    bench_heads,
    estimate_head_bytes,
    make_batches,
    make_head,
    pfc_num_sample,
    plan_groups,
)
from dcq.bench.memory import (
    BUDGET_SHARE,
    FLOAT_BYTES,
    OOM,
    LiveTensorTracker,
    attempt,
    available_memory,
    free_memory,
    is_oom,
    measure_peak,
    state_bytes,
    state_tensors,
    sync,
    time_interleaved,
    timed,
    unique_tensor_bytes,
)
from dcq.bench.report import check_output_path, format_table, row_label, save_plot, summary_lines, write_json
from dcq.bench.units import format_bytes, parse_bytes, parse_count, parse_counts

__all__ = [
    "BUDGET_SHARE", "FLOAT_BYTES", "OOM", "HeadCase", "HeadRunner", "HeadsConfig", "LiveTensorTracker",
    "PrecomputedEmbeddings", "attempt", "available_memory", "bench_heads", "check_output_path",
    "configure_bench", "estimate_head_bytes", "format_bytes", "format_table", "free_memory", "is_oom",
    "make_batches", "make_head", "measure_peak", "parse_bytes", "parse_count", "parse_counts",
    "pfc_num_sample", "plan_groups", "row_label", "run_bench", "run_heads", "save_plot", "state_bytes",
    "state_tensors", "summary_lines", "sync", "time_interleaved", "timed", "unique_tensor_bytes", "write_json",
]
