"""benchmarks/claims.py: its score diagnostics, its variant parser and its table of failed runs."""

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_stats_against_a_hand_computation(claims):
    genuine = [0.9, 0.7, 0.8, 0.6]
    impostor = [0.1, -0.1, 0.3, 0.5, 0.0, 0.2]
    scores = np.array(genuine + impostor)
    issame = np.array([True] * 4 + [False] * 6)
    order = np.random.default_rng(0).permutation(len(scores))  # order of pairs must not matter
    st = claims.score_stats(scores[order], issame[order])

    g_mean = sum(genuine) / 4
    i_mean = sum(impostor) / 6
    g_var = sum((x - g_mean) ** 2 for x in genuine) / 4
    i_var = sum((x - i_mean) ** 2 for x in impostor) / 6
    assert st["genuine_mean"] == pytest.approx(0.75)
    assert st["impostor_mean"] == pytest.approx(i_mean)
    assert st["genuine_std"] == pytest.approx(math.sqrt(g_var))
    assert st["impostor_std"] == pytest.approx(math.sqrt(i_var))
    assert st["d_prime"] == pytest.approx((g_mean - i_mean) / math.sqrt((g_var + i_var) / 2))
    # 99th percentile of 6 sorted impostors by linear interpolation: between 0.3 and 0.5 at 0.95
    assert st["impostor_q99"] == pytest.approx(0.3 + 0.95 * 0.2)
    assert 0.3 < st["impostor_q999"] <= 0.5


def test_variants_are_checked_before_any_run(claims):
    name, settings = claims.parse_variant("DCQ m0.3:head=dcq;margin=0.3;in_batch_negatives=true")
    assert name == "DCQ m0.3"
    assert settings == {"head": "dcq", "margin": "0.3", "in_batch_negatives": "true"}
    claims.check_settings(name, settings)  # valid: no exit
    with pytest.raises(SystemExit, match="unknown key 'marign'; did you mean margin"):
        claims.check_settings("typo", claims.parse_variant("typo:marign=0.3")[1])
    with pytest.raises(SystemExit, match="margin_type"):
        claims.check_settings("bad", {"margin_type": "sphereface"})
    with pytest.raises(SystemExit):
        claims.parse_variant("no colon")
    with pytest.raises(SystemExit, match="unknown variant"):
        claims.main(["--runs", "FC,DCQ 7%", "--data", "ms1m=/nonexistent"])


def test_every_named_variant_is_a_valid_config_and_the_m09_rows_keep_their_momentum(claims):
    for name, settings in claims.VARIANTS.items():
        claims.check_settings(name, {**claims.BASE, **settings})
    # rows recorded before 0.99 became the default stay reproducible under their own names
    assert claims.VARIANTS["DCQ 10% m0.9"]["generator_momentum"] == 0.9
    assert claims.VARIANTS["DCQ 10% queue only m0.9"]["generator_momentum"] == 0.9
    assert "generator_momentum" not in claims.VARIANTS["DCQ 10%"]  # the default recipe


def test_markdown_keeps_failed_runs_as_rows(claims):
    ok = {"profile": "ms1m", "run": "FC", "seed": 0, "identities": 10, "images": 100,
          "verify": {"accuracy": 0.9, "accuracy_std": 0.01, "tar_at_far": {"1e-3": 0.2, "1e-2": 0.5}},
          "score_stats": {"genuine_mean": 0.6, "impostor_q99": 0.3, "d_prime": 3.0}}
    failed = {"profile": "ms1m", "run": "DCQ", "seed": 0, "identities": 10, "images": 100,
              "error": "RuntimeError: boom"}
    text = claims.markdown([ok, failed], SimpleNamespace(steps=5, image_size=40), 1.0, "cmd")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    fc = next(line for line in lines if line.startswith("| FC"))
    dcq = next(line for line in lines if line.startswith("| DCQ"))
    assert "failed: RuntimeError: boom" in dcq
    assert fc.count("|") == header.count("|") == dcq.count("|")
    assert "| 0.600 | 0.300 | 3.00 |" in fc
