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
    assert "DCQ's queue 2 entries" in (out / "report.md").read_text()
    assert "settings_changed" not in metrics and "--set" not in (out / "report.md").read_text()
    assert metrics["dcq"]["pairs"] == 200 and metrics["encoder"] == {"dcq": "weight_generator"}
    for name in ("roc.png", "longtail.png", "report.md"):
        assert (out / name).is_file()
    assert (out / "runs" / "dcq" / "tb").is_dir()


def test_demo_set_changes_the_recipe_of_every_head_and_the_report_names_it(tmp_path):
    import yaml

    from dcq.data import synthesize
    from dcq.demo import DEMO_DATA, dataset_cache

    cache, out = tmp_path / "cache", tmp_path / "out"
    folder = dataset_cache(argparse.Namespace(identities=20, seed=0, cache=str(cache)))
    synthesize(folder, profile=DEMO_DATA["profile"], identities=20, image_size=DEMO_DATA["image_size"],
               seed=0, val_pairs=200, progress=False)
    assert main(["demo", "--identities", "20", "--steps", "2", "--cache", str(cache), "--out", str(out),
                 "--threads", "1", "--set", "generator_momentum=0.5", "--set", "queue_size=8"]) == 0
    saved = yaml.safe_load((out / "runs" / "dcq" / "config.yaml").read_text())
    assert saved["generator_momentum"] == 0.5 and saved["queue_size"] == 8 and saved["queue_fraction"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings_changed"] == {"generator_momentum": "0.5", "queue_size": "8", "queue_fraction": 0.0}
    assert metrics["regime"]["queue_entries"] == 8  # the regime is the changed recipe's
    assert "Changed from the demo's recipe (--set): generator_momentum=0.5" in (out / "report.md").read_text()


def test_demo_set_refuses_a_bad_or_demo_owned_key_before_training(tmp_path, capsys):
    args = ["demo", "--identities", "20", "--steps", "2", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert main([*args, "--set", "max_steps=5"]) == 2
    assert "the demo sets max_steps itself; use --steps instead" in capsys.readouterr().err
    assert main([*args, "--set", "generator_momentum=fast"]) == 2
    err = capsys.readouterr().err
    assert "generator_momentum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()  # refused before the dataset was synthesised
