"""`dcq demo` end to end at a tiny size: dataset cache, training, evaluation, report files."""

import argparse
import json

from dcq.cli import main


def test_demo_smoke(tmp_path, capsys):
    from dcq.data import synthesize
    from dcq.demo import DEMO_DATA, dataset_cache

    cache, out = tmp_path / "cache", tmp_path / "out"
    # Pre-fill the cache (fewer verification pairs than the demo's own 6000), so the demo reuses it.
    folder = dataset_cache(argparse.Namespace(identities=20, seed=0, cache=str(cache)))
    synthesize(folder, profile=DEMO_DATA["profile"], identities=20, image_size=DEMO_DATA["image_size"],
               seed=0, val_pairs=200, progress=False)
    assert main(["demo", "--identities", "20", "--steps", "2", "--cache", str(cache), "--out", str(out),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"reusing synthetic dataset {folder}" in printed and "| DCQ (weight generator) |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"raw_pixels", "dcq", "train_seconds", "longtail"} <= set(metrics)
    assert metrics["regime"] == {"profile": DEMO_DATA["profile"], "identities": 20, "batch_size": 64,
                                 "queue_entries": 2, "queue_batches": 2 / 64}
    assert "DCQ's 10% queue 2 entries" in (out / "report.md").read_text()
    assert metrics["dcq"]["pairs"] == 200 and metrics["encoder"] == {"dcq": "weight_generator"}
    for name in ("roc.png", "longtail.png", "report.md"):
        assert (out / name).is_file()
    assert (out / "runs" / "dcq" / "tb").is_dir()
