"""Training loop: every head learns, resume is exact across a real SIGKILL, failures are safe."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcq.errors import DcqError
from dcq.checkpoint import load_checkpoint, save_checkpoint
from dcq.train.config import build_config
from dcq.train.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data, out, **over):
    values = {
        "backbone": "cpunet", "embedding_size": 32, "image_size": 32, "batch_size": 32, "train_data": str(data),
        "output": str(out), "lr": 0.05, "max_steps": 30, "workers": 0, "log_every": 1, "progress": False,
        "checkpoint_every": 0, "queue_size": 16, "scale": 30.0, "margin": 0.2, "generator_momentum": 0.9,
        "threads": 1, "schedule": "cosine",
    }
    values.update(over)
    return build_config(values, "test")


def read_steps(out):
    rows = [json.loads(line) for line in (Path(out) / "steps.jsonl").read_text().splitlines()]
    last = {}
    for r in rows:  # a resumed run appends; the last record of a step is the one that counts
        last[r["step"]] = r
    return last


@pytest.mark.parametrize("head", ["dcq", "fc", "pfc"])
def test_each_head_trains_and_loss_falls(tiny_dataset, tmp_path, head):
    cfg = tiny_config(tiny_dataset, tmp_path / head, head=head, max_steps=40, preload=True, sample_rate=0.5,
                      lr=0.1, generator_momentum=0.5)
    summary = train(cfg)
    steps = read_steps(tmp_path / head)
    losses = [steps[s]["loss"] for s in sorted(steps)]
    assert len(losses) == 40 and all(map(lambda v: v == v, losses))
    early, late = sum(losses[2:10]) / 8, sum(losses[-8:]) / 8
    assert late < early * 0.9, f"{head}: loss did not fall ({early:.3f} -> {late:.3f})"
    ckpt = load_checkpoint(summary["final"])
    assert (ckpt["weight_generator"] is not None) == (head == "dcq")
    assert (tmp_path / head / "tb").is_dir() and (tmp_path / head / "train.log").is_file()


def _cli(args, env=None, nan_at_step=None, **kw):
    """`dcq ARGS` in a subprocess; `nan_at_step`: through tests/nan_injection.py, which poisons that step's loss."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    entry = ["-m", "dcq"] if nan_at_step is None else [str(ROOT / "tests" / "nan_injection.py"), str(nan_at_step)]
    return subprocess.Popen([sys.executable, *entry, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _write_yaml(path, cfg):
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_resume_after_sigkill_is_exact(tiny_dataset, tmp_path):
    n = 20
    common = dict(max_steps=n, deterministic=True, workers=2, checkpoint_every=n // 2, keep_last=5,
                  num_references=2, bn_splits=2, epochs=1.0)
    straight = tiny_config(tiny_dataset, tmp_path / "straight", **common)
    interrupted = tiny_config(tiny_dataset, tmp_path / "interrupted", **common)
    p = _cli(["train", str(_write_yaml(tmp_path / "a.yaml", straight))])
    assert p.wait(timeout=300) == 0, p.stderr.read()

    p = _cli(["train", str(_write_yaml(tmp_path / "b.yaml", interrupted))])
    half = tmp_path / "interrupted" / f"step_{n // 2:08d}.pt"
    deadline = time.time() + 300
    while not half.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert half.exists()
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    q = _cli(["train", str(tmp_path / "b.yaml"), "--resume", str(half)])
    assert q.wait(timeout=300) == 0, q.stderr.read()

    a, b = read_steps(tmp_path / "straight"), read_steps(tmp_path / "interrupted")
    assert sorted(a) == list(range(1, n + 1)) and sorted(b) == list(range(1, n + 1))
    for step in range(n // 2 + 1, n + 1):
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} != {b[step]['loss']}"
    fa = load_checkpoint(tmp_path / "straight" / "final.pt")
    fb = load_checkpoint(tmp_path / "interrupted" / "final.pt")
    for key in fa["weight_generator"]:
        assert torch.equal(fa["weight_generator"][key], fb["weight_generator"][key])


CRASH_WRITER = """
import os, signal, sys, torch
from dcq import checkpoint
path = sys.argv[1]
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save_checkpoint(path, {"model": {}, "step": 2, "big": torch.ones(1000)})
"""


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})
    p = subprocess.run([sys.executable, "-c", CRASH_WRITER, str(path)], cwd=ROOT, capture_output=True)
    assert p.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["weights"], torch.arange(5.0))


def test_nan_stops_with_step_and_overwrites_nothing(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "nan", max_steps=8, checkpoint_every=2)
    p = _cli(["train", str(_write_yaml(tmp_path / "n.yaml", cfg))], nan_at_step=5)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "step 5" in lines[0], err
    out = tmp_path / "nan"
    assert sorted(x.name for x in out.glob("*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert load_checkpoint(out / "step_00000004.pt")["step"] == 4


def test_config_errors_are_one_line(tmp_path):
    for bad, needle in ((["--set", "learning_rate=0.1"], "unknown key 'learning_rate'"),
                        (["--set", "batch_size=lots"], "batch_size='lots' is not a valid int")):
        p = _cli(["train", str(ROOT / "configs" / "paper_ms1mv2.yaml"), *bad])
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2
        assert err.strip().count("\n") == 0 and needle in err and "Traceback" not in err


def test_guards(tiny_dataset, tmp_path):
    with pytest.raises(DcqError, match="larger than the number of identities"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "g1", queue_size=10_000))
    with pytest.raises(DcqError, match="batch_size=100000 is larger"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "g2", batch_size=100_000))
    with pytest.raises(DcqError, match="train_data is empty"):
        Trainer(tiny_config("", tmp_path / "g3"))


def test_torchrun_two_processes_share_one_queue(tiny_dataset, tmp_path):
    """Under torchrun every rank enqueues the keys of all ranks: after one step of batch 16 on two
    processes the queue holds 32 entries, and only rank 0 writes checkpoints."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cfg = tiny_config(tiny_dataset, tmp_path / "ddp", batch_size=16, max_steps=1, queue_size=40, device="cpu")
    yaml_path = _write_yaml(tmp_path / "ddp.yaml", cfg)
    p = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "dcq", "train", str(yaml_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "step_00000001.pt")
    assert int(ckpt["head"]["queue.count"]) == 32
    assert p.stdout.count("trained 1 steps") == 1


def test_bf16_autocast_on_cpu(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "bf16", amp="bf16", max_steps=4, preload=True)
    summary = train(cfg)
    losses = [r["loss"] for r in read_steps(tmp_path / "bf16").values()]
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = load_checkpoint(summary["final"])
    assert all(v.dtype != torch.bfloat16 for v in ckpt["weight_generator"].values() if v.is_floating_point())


def test_the_trainer_is_freed_before_the_process_group(tiny_dataset, tmp_path, monkeypatch):
    """train() frees its Trainer (and so DDP's hold on the process group) before it destroys the group,
    with the cyclic GC off: nothing is left for the interpreter's teardown."""
    import gc

    from dcq import distributed

    alive_at_cleanup = []
    monkeypatch.setattr(distributed, "cleanup",
                        lambda: alive_at_cleanup.append(sum(isinstance(o, Trainer) for o in gc.get_objects())))
    gc.collect()
    gc.disable()
    try:
        train(tiny_config(tiny_dataset, tmp_path / "run", max_steps=2))
    finally:
        gc.enable()
    assert alive_at_cleanup == [0], "a Trainer was still alive when the process group was destroyed"
