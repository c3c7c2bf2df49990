"""The CUDA path's rules, held on a CPU: tensors on the training device, checkpoints through the
host, few host synchronisations per step, fp16/bf16 numerics of the heads and backbones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dcq import distributed
from dcq.heads import DynamicClassQueue, FullFC, PartialFC

SRC = Path(__file__).resolve().parents[1] / "src" / "dcq"
HOT_PATH = sorted([*SRC.joinpath("train").glob("*.py"), *SRC.joinpath("heads").glob("*.py"),
                   SRC / "distributed.py", SRC / "momentum.py"])
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye"}
OFF_DEVICE = "# off-device:"  # a justified host tensor: the comment says why it may live there


def _calls(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_every_tensor_the_hot_path_creates_names_its_device():
    """A tensor made without `device=` lands on the host; under NCCL a collective rejects it (every
    multi-GPU run used to die at step 1 all-reducing `torch.tensor(accuracy)`). Host tensors are
    allowed only with a comment saying why."""
    offenders = []
    for path in HOT_PATH:
        lines = path.read_text().splitlines()
        for call in _calls(path):
            func = call.func
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
                    and func.attr in FACTORIES):
                continue
            if any(k.arg == "device" for k in call.keywords):
                continue
            text = " ".join(lines[call.lineno - 1 : call.end_lineno])
            if OFF_DEVICE not in text:
                offenders.append(f"{path.relative_to(SRC)}:{call.lineno}: {lines[call.lineno - 1].strip()}")
    assert not offenders, "tensors created without device= (add it, or justify with '# off-device: why'):\n" + \
        "\n".join(offenders)


def test_the_guard_catches_the_step_one_crash(tmp_path):
    """The rule above fails on the line that crashed every multi-GPU run."""
    bad = tmp_path / "loop.py"
    bad.write_text("import torch\nx = distributed.all_reduce_mean(torch.tensor(result.head.accuracy)).item()\n")
    found = [c for c in _calls(bad) if isinstance(c.func, ast.Attribute) and c.func.attr == "tensor"
             and not any(k.arg == "device" for k in c.keywords)]
    assert len(found) == 1


def test_checkpoints_and_rng_states_go_through_the_host():
    """`--resume` on a GPU crashed: the checkpoint was loaded to the GPU and the CPU RNG state with it."""
    for path in HOT_PATH:
        for call in _calls(path):
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if name == "load_checkpoint":
                where = [k.value for k in call.keywords if k.arg == "map_location"]
                assert not where or (isinstance(where[0], ast.Constant) and where[0].value == "cpu"), \
                    f"{path.name}:{call.lineno}: load_checkpoint must map to the host (map_location='cpu')"
            if name in ("set_rng_state", "set_rng_state_all"):
                arg = call.args[0]
                assert (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "cpu"), \
                    f"{path.name}:{call.lineno}: {name} must be handed a host tensor (.cpu())"


def _tiny_config(data, out, **over):
    from dcq.train.config import build_config

    values = {"backbone": "cpunet", "embedding_size": 16, "image_size": 32, "batch_size": 8, "train_data": str(data),
              "max_steps": 4, "workers": 0, "checkpoint_every": 2, "threads": 1, "progress": False,
              "eval_bins": [], "output": str(out), "log_every": 1000}
    values.update(over)
    return build_config(values, source="test")


def test_resume_loads_the_checkpoint_to_the_host(tiny_dataset, tmp_path, monkeypatch):
    from dcq.train import state
    from dcq.train.loop import Trainer, train

    train(_tiny_config(tiny_dataset, tmp_path / "run", max_steps=2))
    seen = []
    real = state.load_checkpoint
    monkeypatch.setattr(state, "load_checkpoint", lambda path, map_location="cpu": seen.append(map_location) or
                        real(path, map_location=map_location))
    trainer = Trainer(_tiny_config(tiny_dataset, tmp_path / "run"), resume="latest")
    trainer.close()
    assert seen == ["cpu"] and trainer.step == 2


def test_rng_states_from_a_machine_with_more_gpus_restore_what_exists(monkeypatch):
    from dcq.train import state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append(device))
    saved = state.capture_rng()
    saved["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]  # written on an 8-GPU machine
    state.restore_rng(saved)
    assert restored == [0, 1]


def test_one_process_on_another_gpu_selects_it(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("cuda:3")
    assert str(ctx.device) == "cuda:3" and chosen == ["cuda:3"]


class HostSyncs(TorchFunctionMode):
    """Counts what makes a GPU step wait for the host: reading a value back (item, float, int, bool,
    tolist, format, numpy, cpu) and ops whose output size depends on values (nonzero, unique,
    masked_select, boolean indexing). Tensors sharing storage with `host` (the loader's batch, which
    is host memory on a GPU machine too) are not counted."""

    READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "__format__", "numpy", "cpu",
             "nonzero", "unique", "masked_select", "argwhere"}

    def __init__(self, host=()):
        super().__init__()
        self.host = {t.untyped_storage().data_ptr() for t in host if t is not None}
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        on_host = isinstance(first, torch.Tensor) and first.untyped_storage().data_ptr() in self.host
        if name in self.READS and not on_host:
            self.events.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.events.append(f"{name}[bool]")
        return func(*args, **(kwargs or {}))


def test_the_default_dcq_step_synchronises_at_most_twice(tiny_dataset, tmp_path):
    """arcface_torch's step reads the loss back once; dcq's used to read about eight values (queue
    pointer and count, label range, accuracy, loss before the backward, per-parameter norms)."""
    from dcq.train.loop import Trainer

    trainer = Trainer(_tiny_config(tiny_dataset, tmp_path / "sync", max_steps=6, queue_size=12))
    batches = iter(trainer._loader())
    counts = []
    try:
        for _ in range(4):
            samples, references, labels = next(batches)
            with HostSyncs(host=(samples, references, labels)) as syncs:
                trainer.train_step(samples, references, labels)
            counts.append(syncs.events)
    finally:
        trainer.close()
    assert trainer.head.queue.filled == 12
    assert all(len(events) <= 2 for events in counts), counts
    assert counts[-1] == ["tolist"]  # the statistics, read once


def test_the_sync_counter_sees_what_it_claims():
    with HostSyncs() as syncs:
        t = torch.tensor([1.0, 2.0])
        float(t[0]), t.tolist(), t[t > 1], torch.unique(t)
    assert syncs.events == ["__float__", "tolist", "__getitem__[bool]", "unique"]


def test_queue_is_written_in_place_after_the_backward():
    """No copy of the queue per step (2 GB at 1M entries), and the gradient still uses the queue as it
    was when the logits were computed (an independent computation with a copy of it)."""
    torch.manual_seed(0)
    head = DynamicClassQueue(embedding_size=8, queue_size=6, scale=10.0, margin=0.2)
    head.queue.enqueue(torch.nn.functional.normalize(torch.randn(6, 8), dim=1), torch.arange(10, 16))
    storage = head.queue.weights.untyped_storage().data_ptr()
    before = head.queue.weights.clone()
    emb = torch.randn(4, 8, requires_grad=True)
    key = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    out = head(emb, labels, key=key)
    assert torch.equal(head.queue.weights, before)  # not yet: the backward still needs it
    out.loss.backward()
    assert head.queue.weights.untyped_storage().data_ptr() == storage
    assert torch.equal(head.queue.labels[:4], labels)  # enqueued after the backward, in place

    ref = emb.detach().clone().requires_grad_(True)
    q = torch.nn.functional.normalize(ref, dim=1)
    w = torch.nn.functional.normalize(key, dim=1)
    logits = torch.cat([(10.0 * ((q * w).sum(1) - 0.2)).unsqueeze(1), 10.0 * q @ before.t()], dim=1)
    torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    torch.testing.assert_close(emb.grad, ref.grad)


def test_queue_without_gradients_enqueues_at_once_and_a_skipped_backward_is_flushed():
    head = DynamicClassQueue(embedding_size=4, queue_size=8)
    with torch.no_grad():
        head(torch.randn(2, 4), torch.tensor([1, 2]), key=torch.randn(2, 4))
    assert head.queue.filled == 2
    head(torch.randn(2, 4, requires_grad=True), torch.tensor([3, 4]), key=torch.randn(2, 4))  # no backward
    head(torch.randn(2, 4, requires_grad=True), torch.tensor([5, 6]), key=torch.randn(2, 4))
    assert head.queue.labels[:4].tolist() == [1, 2, 3, 4]


def test_partial_fc_enlarged_rows_are_unscaled_by_the_gradscaler():
    """A batch with more classes than num_sample makes a new parameter; it must be in the optimiser
    before the backward, or GradScaler steps it with a gradient still multiplied by the scale."""
    def run(scaled: bool) -> torch.Tensor:
        torch.manual_seed(0)
        pfc = PartialFC(4, 40, sample_rate=0.05, scale=8.0, margin=0.1, seed=0)  # num_sample 2
        opt = torch.optim.SGD(pfc.parameters(), lr=0.5)
        pfc.bind_optimizer(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=scaled)
        emb = torch.randn(6, 4)
        opt.zero_grad()
        out = pfc(emb, torch.tensor([0, 5, 9, 17, 23, 31]))  # 6 positives > 2
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)  # as the step does before clipping
        scaler.step(opt)
        scaler.update()
        return pfc.weight.clone()

    torch.testing.assert_close(run(scaled=True), run(scaled=False))


def test_partial_fc_samples_on_its_device_without_host_reads():
    pfc = PartialFC(4, 1000, sample_rate=0.05, seed=3)
    labels = torch.tensor([5, 999, 5, 321, 0])
    with HostSyncs() as syncs:
        index, targets = pfc.sample(labels)
    assert "cpu" not in syncs.events and "numpy" not in syncs.events
    assert pfc.sampling_rng.device == labels.device
    assert torch.equal(index[targets], labels)


def test_partial_fc_sharded_sampling_keeps_the_rank_positives_within_its_rows():
    from dcq.heads.sharding import ClassShard

    pfc = PartialFC(4, 100, sample_rate=0.1, seed=1)
    pfc.shard = ClassShard(100, rank=1, world_size=2)  # rows 50:100
    pfc.num_sample = 5
    labels = torch.tensor([3, 51, 77, 77, 20])
    index, targets = pfc.sample(labels)
    assert index.numel() == 5 and torch.all(index[1:] > index[:-1]) and index.max() < 50
    assert targets.tolist()[0] == -1 and targets.tolist()[4] == -1
    assert (index[targets[1:4]] + 50).tolist() == [51, 77, 77]


@pytest.mark.parametrize("head_cls", [FullFC, PartialFC])
def test_fc_logits_under_autocast_stay_close_to_float32(head_cls):
    """The (B, N) matmul in bf16 as arcface_torch runs it; margin and softmax in float32. bf16 keeps
    8 bits of mantissa: cosines within 1e-2, and the loss within 1% of float32."""
    torch.manual_seed(0)
    head = head_cls(64, 500, scale=64.0, margin=0.5)
    emb, labels = torch.randn(32, 64), torch.randint(0, 500, (32,))
    reseed = getattr(head, "sampling_rng", torch.Generator()).manual_seed  # Partial FC: the same classes twice
    reseed(0)
    exact = head(emb, labels)
    reseed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = head(emb, labels)
    assert fast.logits.dtype == torch.float32
    torch.testing.assert_close(fast.logits / 64.0, exact.logits / 64.0, atol=1e-2, rtol=0)
    assert abs(fast.loss.item() - exact.loss.item()) <= 0.01 * exact.loss.item()
    assert (fast.logits / 64.0).abs().max() <= 1.0 + 1e-6


def test_iresnet_embedding_layers_stay_float32_under_autocast():
    from dcq.models import get_backbone

    net = get_backbone("iresnet18", embedding_size=32, image_size=32).eval()
    dtypes = {}
    for name in ("fc", "features", "bn2"):
        getattr(net.head, name).register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.float32 and dtypes["fc"] == torch.float32 and dtypes["features"] == torch.float32


def test_memory_check_counts_one_rank_share_of_sharded_centres():
    from dcq.train.config import build_config
    from dcq.train.memory_check import training_state_bytes

    for head in ("fc", "pfc"):
        cfg = build_config({"head": head, "embedding_size": 512}, "test")
        one, eight = (training_state_bytes(cfg, 10_000_000, 0, world_size=w) for w in (1, 8))
        assert eight * 8 == one
    cfg = build_config({"head": "dcq", "embedding_size": 512, "queue_size": 8192}, "test")
    assert training_state_bytes(cfg, 10_000_000, 0, world_size=8) == training_state_bytes(cfg, 10_000_000, 0)


def test_fc_and_partial_fc_decode_no_reference_images(tiny_dataset, tmp_path, monkeypatch):
    """Twice the JPEG work for images the head never uses: the reference is drawn (the sample stream
    stays the same) but not decoded."""
    from dcq.data.pairs import PairDataset
    from dcq.train.loop import Trainer

    decoded = []
    real = PairDataset._image
    monkeypatch.setattr(PairDataset, "_image", lambda self, i: decoded.append(i) or real(self, i))
    for head, per_item in (("fc", 1), ("dcq", 3)):
        decoded.clear()
        trainer = Trainer(_tiny_config(tiny_dataset, tmp_path / head, head=head, num_references=2))
        samples, references, labels = next(iter(trainer._loader()))
        trainer.close()
        assert len(decoded) == per_item * labels.shape[0], head
        assert (references is None) == (head == "fc")


def test_step_output_reports_the_statistics_it_checked():
    """`loss_check` gets [loss, accuracy, gradient norm] as one tensor (read back by the trainer once)."""
    from dcq.train.step import TrainStep

    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    head = FullFC(4, 5)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1)
    seen = []
    step = TrainStep(net, head, opt, grad_clip=0.0)
    out = step(torch.randn(8, 6), None, torch.randint(0, 5, (8,)), loss_check=lambda s: seen.append(s.clone()) or 7)
    assert out.checked == 7 and seen[0].shape == (3,)
    assert seen[0][0].item() == pytest.approx(out.loss.item())
    assert seen[0][1].item() == pytest.approx(out.head.accuracy)
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert seen[0][2].item() == pytest.approx(grads.norm().item(), rel=1e-5)

