"""Config keys, renamed keys, --set coercion, the LR schedule and --resume without a path."""

import math

import pytest

from dcq.cli import main
from dcq.errors import DcqError
from dcq.train.config import build_config, load_config
from dcq.train.build import lr_factor


def test_old_keys_are_read_as_the_new_ones_with_a_note(capsys):
    cfg = build_config({"momentum": 0.95, "train": "data/x.rec", "queue_size": 0.2}, "old.yaml")
    assert (cfg.generator_momentum, cfg.train_data, cfg.queue_fraction, cfg.queue_size) == (0.95, "data/x.rec", 0.2, 0)
    err = capsys.readouterr().err
    assert "momentum=0.95 read as generator_momentum=0.95" in err and "train_data" in err and "queue_fraction" in err
    with pytest.raises(DcqError, match="both 'momentum' .* and 'generator_momentum'"):
        build_config({"momentum": 0.9, "generator_momentum": 0.9})


def test_queue_is_a_count_or_a_fraction_never_both():
    assert (build_config({}).queue_size, build_config({}).queue_fraction) == (0, 0.1)  # 10% of the identities
    cfg = build_config({"queue_size": 8192})
    assert (cfg.queue_size, cfg.queue_fraction) == (8192, 0.0)
    with pytest.raises(DcqError, match="exactly one of queue_size"):
        build_config({"queue_size": 100, "queue_fraction": 0.1})
    with pytest.raises(DcqError, match="queue_size=1.5 is not a valid int"):
        build_config({"queue_size": 1.5})


def test_set_picks_the_queue_setting_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("queue_fraction: 0.3\nmomentum: 0.9\n")
    cfg = load_config(path, ["queue_size=64"])
    assert (cfg.queue_size, cfg.queue_fraction, cfg.generator_momentum) == (64, 0.0, 0.9)
    cfg = load_config(path, ["queue_size=0.05"])  # old-style fraction on the command line
    assert (cfg.queue_size, cfg.queue_fraction) == (0, 0.05)


@pytest.mark.parametrize("pair,key,value", [
    ("flip=false", "flip", False), ("flip=on", "flip", True), ("max_steps=1e3", "max_steps", 1000),
    ("lr=5e-2", "lr", 0.05), ("milestones=[2, 4]", "milestones", [2.0, 4.0]),
    ("eval_bins=a.bin,b.bin", "eval_bins", ["a.bin", "b.bin"]), ("output=runs/x", "output", "runs/x"),
])
def test_set_values_are_coerced_to_the_field_type(pair, key, value):
    assert getattr(load_config(None, [pair]), key) == value


@pytest.mark.parametrize("pair", ["flip=maybe", "max_steps=2.5", "lr=fast", "batch_size=true", "nokey"])
def test_bad_set_values_are_one_clear_error(pair):
    with pytest.raises(DcqError):
        load_config(None, [pair])


def test_lr_factor_warmup_step_decay_and_cosine():
    step = build_config({"warmup_epochs": 1.0, "milestones": [2.0, 3.0], "lr_decay": 0.1})
    assert [lr_factor(step, s, 10, 50) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up over 10 steps
    assert lr_factor(step, 10, 10, 50) == 1.0 and lr_factor(step, 19, 10, 50) == 1.0
    assert math.isclose(lr_factor(step, 20, 10, 50), 0.1) and math.isclose(lr_factor(step, 30, 10, 50), 0.01)
    cos = build_config({"schedule": "cosine"})
    assert lr_factor(cos, 0, 10, 100) == 1.0
    assert math.isclose(lr_factor(cos, 50, 10, 100), 0.5) and lr_factor(cos, 100, 10, 100) < 1e-12


def _tiny(data, out, **over):
    values = {"backbone": "cpunet", "embedding_size": 16, "image_size": 32, "batch_size": 16,
              "train_data": str(data), "output": str(out), "workers": 0, "progress": False,
              "checkpoint_every": 0, "queue_size": 16, "threads": 1, "log_every": 1}
    return [f"{k}={v}" for k, v in {**values, **over}.items()]


def _set(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_resume_without_a_path_takes_the_latest_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DcqError, match="no step_\\*.pt checkpoint"):
        from dcq.train.loop import Trainer

        Trainer(load_config(None, _tiny(tiny_dataset, out, max_steps=2)), resume="latest")
    assert main(["train", *_set(_tiny(tiny_dataset, out, max_steps=2))]) == 0
    assert main(["train", "--resume", *_set(_tiny(tiny_dataset, out, max_steps=3))]) == 0
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'step_00000002.pt'} at step 2" in log


def test_identity_sampling_trains(tiny_dataset, tmp_path):
    assert main(["train", *_set(_tiny(tiny_dataset, tmp_path / "id", max_steps=3, sampling="identity"))]) == 0
    assert (tmp_path / "id" / "step_00000003.pt").is_file()


def test_resume_notes_every_changed_loss_key(tiny_dataset, tmp_path):
    """A checkpoint trained under older defaults, resumed with the new ones: allowed, never silent."""
    out = tmp_path / "run"
    assert main(["train", *_set(_tiny(tiny_dataset, out, max_steps=2, in_batch_negatives="false"))]) == 0
    assert main(["train", "--resume", *_set(_tiny(tiny_dataset, out, max_steps=3, margin=0.25))]) == 0
    log = (out / "train.log").read_text()
    assert "resumed with in_batch_negatives='auto' (the checkpoint trained with False)" in log
    assert "resumed with margin=0.25" in log
    assert "resumed with num_references" not in log  # unchanged keys are not noted
