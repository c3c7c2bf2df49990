"""Training never loses or silently corrupts work: the run folder, resume, checksums, divergence."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import ROOT, tiny_config

from dcq.errors import DcqError
from dcq.checkpoint import load_checkpoint, save_checkpoint
from dcq.train.loop import Trainer, train
from dcq.train.rundir import checkpoint_files, latest_checkpoint


def dcq(*args, env=None, timeout=300, nan_at_step=None):
    """`dcq ARGS`; `nan_at_step`: through tests/nan_injection.py, which poisons that step's loss."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    entry = ["-m", "dcq"] if nan_at_step is None else [str(ROOT / "tests" / "nan_injection.py"), str(nan_at_step)]
    return subprocess.run([sys.executable, *entry, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(p, needle):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]


def snapshot(folder):
    folder = Path(folder)
    if not folder.exists():
        return None
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def test_bad_eval_bins_path_stops_before_step_one(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_dataset, out, eval_bins=[str(tmp_path / "missing.bin")])
    one_error_line(dcq("train", write_config(tmp_path / "c.yaml", cfg)), "missing.bin does not exist")
    assert not out.exists()


def test_used_folder_is_refused_and_overwrite_replaces_it(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, max_steps=2))
    before = snapshot(out)
    with pytest.raises(DcqError, match="already holds a run.*--overwrite"):
        train(tiny_config(tiny_dataset, out, max_steps=3))
    assert snapshot(out) == before
    (out / "step_00000099.pt").write_bytes(b"an abandoned checkpoint")
    summary = train(tiny_config(tiny_dataset, out, max_steps=3), overwrite=True)
    assert summary["steps"] == 3
    assert [p.name for p in checkpoint_files(out)] == ["step_00000003.pt"]
    assert len((out / "steps.jsonl").read_text().splitlines()) == 3  # no mix of the two runs


HOLD_LOCK = """
import sys, time
from dcq.train.rundir import RunFolder
folder = RunFolder(sys.argv[1])
folder.claim(resume=False, overwrite=False)
folder.begin()
print("locked", flush=True)
time.sleep(120)
"""


def test_concurrent_run_is_locked_out(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = dcq("train", write_config(tmp_path / "c.yaml", tiny_config(tiny_dataset, out, max_steps=2)))
        one_error_line(p, f"in use by another dcq train (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".dcq.lock"]
    # the holder died: its lock died with it
    assert train(tiny_config(tiny_dataset, out, max_steps=1))["steps"] == 1


def test_stale_temporaries_removed_and_stray_step_names_ignored(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    strays = ["step_backup.pt", "step_00000010 (copy).pt", "step_.pt"]
    for name in strays:
        (out / name).write_bytes(b"not a checkpoint")
    (out / ".step_00000004.pt.abc123.tmp").write_bytes(b"")  # left by a kill -9 during a write
    train(tiny_config(tiny_dataset, out, max_steps=4, checkpoint_every=2, keep_last=1))
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.endswith(".tmp") for n in names)
    assert all(n in names for n in strays)  # never read, counted or deleted
    assert [p.name for p in checkpoint_files(out)] == ["step_00000004.pt"]
    trainer = Trainer(tiny_config(tiny_dataset, out, max_steps=6, checkpoint_every=2), resume="latest")
    assert trainer.step == 4
    trainer.close()


def test_resume_continues_the_newest_checkpoint_of_the_run(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_dataset, out, max_steps=6, checkpoint_every=2, keep_last=5)
    train(cfg)
    # Roll back to step 2: steps 4 and 6 belong to the abandoned branch and are set aside.
    trainer = Trainer(tiny_config(tiny_dataset, out, max_steps=5, checkpoint_every=3, keep_last=5),
                      resume=str(out / "step_00000002.pt"))
    trainer.run()
    trainer.close()
    assert [p.name for p in checkpoint_files(out)] == ["step_00000002.pt", "step_00000003.pt", "step_00000005.pt"]
    assert (out / "abandoned_step_00000006.pt").is_file()
    assert latest_checkpoint(out).name == "step_00000005.pt"
    # newest by time first: a higher step number written earlier does not win
    os.utime(out / "step_00000003.pt", ns=(time.time_ns() + 10**9,) * 2)
    assert latest_checkpoint(out).name == "step_00000003.pt"


def test_changed_optimiser_settings_apply_on_resume(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, max_steps=4, checkpoint_every=2, schedule="step", milestones=[100.0]))
    cfg = tiny_config(tiny_dataset, out, max_steps=8, schedule="step", milestones=[100.0], lr=0.01,
                      sgd_momentum=0.5, weight_decay=1e-3)
    trainer = Trainer(cfg, resume="latest")
    groups = trainer.optimizer.param_groups
    assert all(g["lr"] == pytest.approx(0.01) and g["momentum"] == 0.5 and g["weight_decay"] == 1e-3 for g in groups)
    trainer.run()
    trainer.close()
    assert all(g["lr"] == pytest.approx(0.01) for g in trainer.optimizer.param_groups)  # the schedule keeps it
    log = (out / "train.log").read_text()
    assert "lr 0.05 -> 0.01" in log and "sgd_momentum 0.9 -> 0.5" in log and "weight_decay 0.0005 -> 0.001" in log


@pytest.mark.parametrize("change, needle", [
    ({"queue_size": 8}, "queue_size=16"),
    ({"queue_size": 0, "queue_fraction": 0.25}, "queue_size=16"),
    ({"optimizer": "adamw"}, "optimizer='sgd'"),
    ({"embedding_size": 16}, "embedding_size=32"),
    ({"train_data": "OTHER"}, "training set differs"),
])
def test_resume_refuses_what_it_cannot_continue(tiny_dataset, tmp_path, change, needle):
    out = tmp_path / "run"
    train(tiny_config(tiny_dataset, out, max_steps=2))
    if change.get("train_data") == "OTHER":
        from dcq.data import synthesize

        other = tmp_path / "other"
        synthesize(other, profile="ms1m", identities=40, image_size=32, fmt="rec", seed=1, progress=False)
        change = {"train_data": str(other)}
    before = snapshot(out)
    p = dcq("train", write_config(tmp_path / "c.yaml", tiny_config(tiny_dataset, out, max_steps=4, **change)),
            "--resume")
    one_error_line(p, needle)
    assert snapshot(out) == before


def test_flipped_bytes_in_a_checkpoint_are_reported(tmp_path):
    pattern = torch.arange(4096, dtype=torch.float32)
    path = save_checkpoint(tmp_path / "step_00000001.pt", {"step": 1, "weights": pattern})
    data = bytearray(path.read_bytes())
    at = bytes(data).find(pattern[1000:1016].numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DcqError, match="is damaged"):
        load_checkpoint(path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "dcq-checkpoint", "version": 1, "step": 3, "w": torch.ones(2)}, path)
    assert load_checkpoint(path)["step"] == 3


def test_exploding_run_stops_with_the_step_named(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    p = dcq("train", write_config(tmp_path / "c.yaml", tiny_config(tiny_dataset, out, lr=1000.0, max_steps=30)))
    one_error_line(p, "training diverged at step")
    assert "no checkpoint was written yet" in p.stderr
    assert not list(out.glob("*.pt"))


def test_nan_at_step_one_does_not_claim_a_checkpoint(tiny_dataset, tmp_path):
    p = dcq("train", write_config(tmp_path / "c.yaml", tiny_config(tiny_dataset, tmp_path / "run", max_steps=3)),
            nan_at_step=1)
    one_error_line(p, "step 1: loss is nan")
    assert "untouched" not in p.stderr and "no checkpoint was written yet" in p.stderr
