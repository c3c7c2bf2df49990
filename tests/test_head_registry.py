"""A head is its module plus one entry in `dcq.heads.registry.HEADS`: the trainer reads specs only."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn.functional as F

from dcq.heads.base import Head, HeadOutput
from dcq.heads.registry import HEADS, HeadSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "dcq"


def test_no_code_outside_the_registry_asks_which_head_a_config_names():
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "registry.py" or "bench" in path.parts:
            continue  # `dcq bench heads` names the heads it times on purpose
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "head" \
                    and any(isinstance(c, ast.Constant) and c.value in HEADS for c in node.comparators):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"head-specific branches outside heads/registry.py: {found}"


class CosineToMean(Head):
    """A toy head: each row's positive is the batch mean of its identity; no class state at all."""

    def forward(self, embeddings, labels, key=None):
        q = F.normalize(embeddings.float(), dim=1)
        same = (labels[:, None] == labels[None, :]).float()
        centres = F.normalize(same @ q.detach(), dim=1)
        logits = 10.0 * q @ centres.t()
        targets = torch.arange(len(labels), device=labels.device)
        return HeadOutput(loss=F.cross_entropy(logits, targets), logits=logits, targets=targets)


def test_a_new_head_trains_with_one_registration(tiny_dataset, tmp_path, monkeypatch):
    from dcq.train.config import build_config
    from dcq.train.loop import train

    spec = HeadSpec("toy", build=lambda cfg, n, distributed, world: CosineToMean(),
                    state_bytes=lambda cfg, n, world: 0)
    monkeypatch.setitem(HEADS, "toy", spec)
    cfg = build_config({"head": "toy", "backbone": "cpunet", "embedding_size": 16, "image_size": 32,
                        "batch_size": 8, "train_data": str(tiny_dataset), "max_steps": 3, "workers": 0,
                        "threads": 1, "progress": False, "eval_bins": [], "output": str(tmp_path / "toy")}, "test")
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["last_loss"] > 0
    ckpt = torch.load(tmp_path / "toy" / "final.pt", weights_only=True)
    assert ckpt["weight_generator"] is None  # no references: no weight generator, none decoded
