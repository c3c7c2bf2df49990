"""A checkpoint written before the config renames (dcq 0.1.0) still loads, evaluates and resumes."""

import functools
import json
from pathlib import Path

import pytest

from dcq.checkpoint import build_eval_encoder, load_checkpoint
from dcq.cli import main
from dcq.train.config import build_config
from dcq.train.loop import Trainer

OLD = Path(__file__).parent / "fixtures" / "old_dcq_step.pt"


@pytest.fixture
def narrow_cpunet(monkeypatch):
    """The fixture was trained with a narrow CPUNet to keep it a few KB (see fixtures/README.md)."""
    import dcq.models
    from dcq.models.cpunet import CPUNet

    monkeypatch.setattr(dcq.models, "CPUNet", functools.partial(CPUNet, widths=(4, 4, 4), blocks=0))


def test_old_checkpoint_loads_with_its_old_config_keys(narrow_cpunet):
    ckpt = load_checkpoint(OLD)
    assert ckpt["version"] == 1 and ckpt["step"] == 2
    old = ckpt["config"]
    assert old["momentum"] == 0.9 and old["queue_size"] == 0.25 and "train" in old  # the old names
    encoder, info = build_eval_encoder(ckpt)
    assert info == {"which": "weight_generator", "backbone": "cpunet", "embedding_size": 8, "image_size": 32}


def test_dcq_eval_reads_an_old_checkpoint(narrow_cpunet, tiny_dataset, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", str(OLD), "--bin", str(tiny_dataset / "val.bin"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["val"]
    assert 0.5 <= result["accuracy"] <= 1.0 and result["pairs"] > 0


def test_resume_from_an_old_checkpoint_with_the_new_keys(narrow_cpunet, tiny_dataset, tmp_path):
    cfg = build_config({
        "backbone": "cpunet", "embedding_size": 8, "image_size": 32, "batch_size": 16,
        "train_data": str(tiny_dataset), "output": str(tmp_path / "run"), "max_steps": 4, "workers": 0,
        "progress": False, "checkpoint_every": 0, "queue_fraction": 0.25, "generator_momentum": 0.9,
        "threads": 1, "schedule": "cosine",
    }, "test")
    trainer = Trainer(cfg, resume=str(OLD))
    assert trainer.step == 2 and trainer.head.queue.size == 12 and trainer.head.queue.filled == 12
    summary = trainer.run()
    assert summary["steps"] == 4
    assert load_checkpoint(summary["final"])["config"]["generator_momentum"] == 0.9
