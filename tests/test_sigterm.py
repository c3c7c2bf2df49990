"""SIGTERM (how SLURM, Kubernetes and torchrun pre-empt a job): `dcq train` saves the step it reached,
says so in one line, exits 143, and `--resume` continues exactly."""

from __future__ import annotations

import signal
import time

from test_train import _cli, _write_yaml, read_steps, tiny_config

from dcq.checkpoint import load_checkpoint


def test_sigterm_saves_the_step_reached_and_resume_is_exact(tiny_dataset, tmp_path):
    n = 60
    common = dict(max_steps=n, deterministic=True, workers=0, checkpoint_every=1000, keep_last=5)
    straight = tiny_config(tiny_dataset, tmp_path / "straight", **common)
    stopped = tiny_config(tiny_dataset, tmp_path / "stopped", **common)
    p = _cli(["train", str(_write_yaml(tmp_path / "a.yaml", straight))])
    assert p.wait(timeout=300) == 0, p.stderr.read()

    p = _cli(["train", str(_write_yaml(tmp_path / "b.yaml", stopped))])
    steps = tmp_path / "stopped" / "steps.jsonl"
    deadline = time.time() + 300
    while (not steps.exists() or len(steps.read_text().splitlines()) < 3) and time.time() < deadline \
            and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be stopped"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read()
    lines = [line for line in err.strip().splitlines() if "SIGTERM" in line]
    assert len(lines) == 1 and "continue exactly with --resume" in lines[0] and "Traceback" not in err, err
    reached = max(read_steps(tmp_path / "stopped"))
    assert 3 <= reached < n
    saved = sorted((tmp_path / "stopped").glob("step_*.pt"))
    assert [s.name for s in saved] == [f"step_{reached:08d}.pt"]  # the step reached, no other
    assert load_checkpoint(saved[0])["step"] == reached
    assert "SIGTERM: stopped after step" in (tmp_path / "stopped" / "train.log").read_text()

    q = _cli(["train", str(tmp_path / "b.yaml"), "--resume"])
    assert q.wait(timeout=300) == 0, q.stderr.read()
    a, b = read_steps(tmp_path / "straight"), read_steps(tmp_path / "stopped")
    assert sorted(b) == list(range(1, n + 1))
    for step in range(reached + 1, n + 1):
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} != {b[step]['loss']}"
