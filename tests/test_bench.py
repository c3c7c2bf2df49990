"""`dcq bench heads`, benchmarks/train_step.py and benchmarks/gpu.sh at tiny sizes (a few seconds)."""

import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcq import bench
from dcq.cli import main as cli_main
from dcq.errors import DcqError

ROOT = Path(__file__).resolve().parents[1]
DESIGN_KEYS = {"head", "classes", "queue_size", "sample_rate", "step_ms", "state_bytes", "peak_bytes"}
TINY = ["--batch", "8", "--dim", "16", "--repeats", "1", "--warmup", "1"]


def run_heads(tmp_path, *extra):
    out = tmp_path / "heads.json"
    rc = cli_main(["bench", "heads", *TINY, "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def by_label(rows):
    return {(r["classes"], bench.row_label(r)): r for r in rows}


def test_json_has_exactly_the_design_keys(tmp_path):
    doc = run_heads(tmp_path, "--classes", "100,1000")
    assert set(doc) == {"rows", "config"}
    assert isinstance(doc["config"], dict) and doc["config"]["batch"] == 8
    rows = doc["rows"]
    assert len(rows) == 8  # fc, pfc, two dcq rows per N
    for row in rows:
        assert set(row) == DESIGN_KEYS
        assert row["head"] in ("fc", "pfc", "dcq")
        assert row["step_ms"] > 0 and row["peak_bytes"] >= row["state_bytes"] > 0
        assert (row["queue_size"] is not None) == (row["head"] == "dcq")
        assert (row["sample_rate"] is not None) == (row["head"] == "pfc")
    for n in (100, 1000):
        queues = sorted(r["queue_size"] for r in rows if r["head"] == "dcq" and r["classes"] == n)
        assert queues == sorted([8192, n // 10])


def test_state_bytes_scale_fc_linear_dcq_constant(tmp_path):
    rows = by_label(run_heads(tmp_path, "--classes", "100,1000,4000")["rows"])
    d = 16
    for n in (100, 1000, 4000):  # weight + grad + momentum, counted exactly
        assert rows[(n, "fc")]["state_bytes"] == 3 * n * d * 4
    assert rows[(4000, "fc")]["state_bytes"] / rows[(100, "fc")]["state_bytes"] == pytest.approx(40)
    fixed = {rows[(n, "dcq q=8192")]["state_bytes"] for n in (100, 1000, 4000)}
    assert fixed == {8192 * d * 4 + 8192 * 8 + 16}  # queue weights + labels + ptr + count
    assert rows[(4000, "dcq q=400")]["state_bytes"] == 400 * d * 4 + 400 * 8 + 16
    # Partial FC keeps full-size weight and momentum rows: also linear in N
    assert rows[(4000, "pfc 0.1")]["state_bytes"] > 0.9 * 2 * 4000 * d * 4


def test_out_of_memory_by_budget_is_reported_not_raised(tmp_path, capsys):
    # 1.5 MiB: DCQ (queue 1000) and the small sizes fit, FC / Partial FC at 1e5 classes do not
    doc = run_heads(tmp_path, "--classes", "100,1e5", "--queue", "1000", "--memory-budget", "1.5M")
    rows = by_label(doc["rows"])
    for label in ("fc", "pfc 0.1"):
        row = rows[(100000, label)]
        assert row["error"].startswith("over --memory-budget (needs ") and "MiB)" in row["error"]
        assert row["step_ms"] is None and row["state_bytes"] is None and row["peak_bytes"] is None
        assert set(row) == DESIGN_KEYS | {"error"}
        assert "error" not in rows[(100, label)]
    assert rows[(100000, "dcq q=1000")]["step_ms"] > 0
    printed = capsys.readouterr().out
    assert "over --memory-budget (needs" in printed and "out of memory" not in printed  # in the printed table


def test_out_of_memory_during_a_step_is_reported(tmp_path, monkeypatch):
    real_step = bench.HeadRunner.step

    def step(self):
        if self.case.head == "fc" and self.case.classes == 1000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(bench.HeadRunner, "step", step)
    rows = by_label(run_heads(tmp_path, "--classes", "100,1000")["rows"])
    assert rows[(1000, "fc")]["error"] == "out of memory"
    assert rows[(100, "fc")]["step_ms"] > 0 and rows[(1000, "pfc 0.1")]["step_ms"] > 0


def test_plan_groups_keeps_reference_in_every_group():
    cases = bench.HeadsConfig(classes=[10**5]).cases(10**5)
    ref = cases[2]
    sizes = {"fc": (60, 40), "pfc": (40, 10), "dcq": (1, 1)}

    def est(case):
        return sizes[case.head]

    groups, oom = bench.plan_groups(cases, ref, est, budget=105)
    assert oom == [] and all(ref in g for g in groups) and len(groups) == 2
    groups, oom = bench.plan_groups(cases, ref, est, budget=90)
    assert [c.head for c in oom] == ["fc"]


def test_live_tensor_tracker_counts_peak_and_frees():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(1000, 32)
    tracker = bench.LiveTensorTracker([x, w])
    base = x.numel() * 4 + w.numel() * 4
    with tracker:
        y = x @ w.t()  # 64 x 1000 floats
        z = y.relu()
        del y
        z.sum().backward()
        del z
    assert tracker.peak >= base + 2 * 64 * 1000 * 4
    assert tracker.peak <= base + 4 * 64 * 1000 * 4
    assert tracker.live == base + x.numel() * 4  # only x.grad is new and alive


def test_user_errors_are_one_line(capsys, tmp_path):
    assert cli_main(["bench", "heads", "--classes", "1e3.5"]) == 2
    assert "--classes" in capsys.readouterr().err
    assert cli_main(["bench", "heads", "--classes", "10", "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["bench"]) == 2
    assert "bench heads" in capsys.readouterr().err
    with pytest.raises(DcqError):
        bench.parse_bytes("lots")
    assert bench.parse_bytes("1.5M") == 1572864 and bench.parse_counts("1e4,250") == [10000, 250]


def test_plot_is_written(tmp_path):
    png = tmp_path / "heads.png"
    rc = cli_main(["bench", "heads", *TINY, "--classes", "100,1000", "--plot", str(png)])
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def load_train_step():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_tiny_cpu(tmp_path):
    out = tmp_path / "ts.json"
    rc = load_train_step().main(["--image-size", "16", "--dim", "16", "--batch", "4", "--queue", "32",
                                 "--dcq-classes", "100", "--fc-classes", "1000", "--repeats", "1",
                                 "--warmup", "0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["backbone", "dcq", "dcq", "dcq", "fc"]
    assert [(r["references"], r["in_batch_negatives"]) for r in rows[1:4]] == [(1, False), (1, True), (2, True)]
    assert rows[0]["vs_backbone"] == 1.0
    for r in rows:
        assert r["step_ms"] > 0 and r["peak_bytes"] >= r["resident_bytes"] > 0


def test_train_step_recipes_are_parsed_or_refused():
    ts = load_train_step()
    assert ts.parse_recipes("k1, k2+ib") == [(1, False), (2, True)]
    for bad in ("k0", "2", "k2+queue", ""):
        with pytest.raises(DcqError, match="--recipes"):
            ts.parse_recipes(bad)


def test_benchmarks_run_the_training_step():
    """`dcq bench` and benchmarks/train_step.py time the trainer's TrainStep, not a copy of it."""
    from dcq.train.step import TrainStep

    ts = load_train_step()
    assert ts.TrainStep is TrainStep
    case = bench.HeadCase("dcq", 50, queue_size=8)
    batches = bench.make_batches(1, 4, 8, 50, torch.device("cpu"), torch.float32, 0)
    runner = bench.HeadRunner(case, 8, torch.device("cpu"), None, batches, 0)
    assert isinstance(runner.train_step, TrainStep)
    runner.step()
    assert runner.head.queue.filled == 8


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_script_smoke_on_cpu(tmp_path):
    """The GPU script's CPU mode: the real commands, the step rows and the summary, with the JSON keys
    a GPU run writes."""
    env = dict(os.environ, DCQ_GPU_SMOKE="1", DEVICE="cpu", OUT=str(tmp_path), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["ok"] and len(smoke["commands"]) == 1 + 3 * 4  # synth; train, resume, eval, export per head
    assert {c["command"].split()[0] for c in smoke["commands"]} == {"synth", "train", "eval", "export"}
    steps = json.loads((tmp_path / "train_step_gpu.json").read_text())
    assert [(r["mode"], r["classes"], r["queue_size"]) for r in steps["rows"]] == [
        ("backbone", 100, None), ("dcq", 100, 10), ("dcq", 100, 64), ("dcq", 1000, 100), ("dcq", 1000, 64),
        ("fc", 100, None), ("pfc", 100, None), ("pfc", 1000, None)]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert set(summary) == {"info", "seconds", "status", "smoke", "steps", "loader", "loader_vs_dcq_step"}
    assert summary["smoke"]["ok"] and summary["status"] == 0 and summary["loader"]["dcq_k2_items_per_s"] > 0
    assert all(s["samples_per_s"] > 0 for s in summary["steps"])


def test_gpu_script_fits_one_device_call():
    """Its parts' timeouts and the install add up to at most 480 s in the GPU mode (a call is 600 s)."""
    text = (ROOT / "benchmarks" / "gpu.sh").read_text()
    gpu_mode = text[text.index("\nelse\n"):text.index("\nfi\n", text.index("\nelse\n"))]
    parts = {k: int(v) for k, v in re.findall(r"\b(T_[A-Z]+)=(\d+)", gpu_mode)}
    assert set(parts) == {"T_SMOKE", "T_STEP", "T_DATA"}
    fixed = [int(n) for n in re.findall(r"\btimeout (\d+) ", text)]  # install, import check (x2), summary
    assert len(fixed) == 4 and sum(parts.values()) + sum(fixed) <= 480, (parts, fixed)


def test_time_interleaved_rotates_the_order_and_drops_a_runner_out_of_memory():
    calls = []

    class Runner:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.times = name, fail_at, []

        def timed_step(self):
            calls.append(self.name)
            if self.fail_at is not None and len(self.times) == self.fail_at:
                raise MemoryError
            return 0.5

    runners = {"a": Runner("a"), "b": Runner("b", fail_at=1), "c": Runner("c")}
    dropped = []
    bench.time_interleaved(runners, 3, lambda key: dropped.append(runners.pop(key).name))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a"]  # rounds start one later; b is gone in round 3
    assert dropped == ["b"] and set(runners) == {"a", "c"}
    assert runners["a"].times == [0.5, 0.5, 0.5] and runners["c"].times == [0.5, 0.5, 0.5]
