"""bench/asha_vs_grid.py: the agreement check refuses two runs that computed different numbers,
and a tiny real comparison (two configurations, two rounds) gives consistent counts and ranks."""

from __future__ import annotations

import json
import os

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("asha_vs_grid")


def sweep_of(histories: dict[tuple, list[float]], metric: str = "val/answer_loss") -> dict[tuple, dict]:
    """A sweep as ``read_sweep`` returns it: per configuration, one history entry per round."""
    return {key: {"trial": f"t{i}", "status": "completed", "tune_rounds": len(values),
                  "history": [{"round": r + 1, metric: v, "val/label_accuracy": 0.5} for r, v in enumerate(values)]}
            for i, (key, values) in enumerate(histories.items())}


def test_agreement_passes_equal_runs_and_counts_the_compared_values(bench):
    keys = ["inner.lr_init"]
    asha = sweep_of({(0.3,): [2.0, 1.5], (0.01,): [2.5]})  # 0.01 stopped by ASHA after one round
    grid = sweep_of({(0.3,): [2.0, 1.5, 1.2], (0.01,): [2.5, 2.4, 2.3]})
    metrics = ["val/answer_loss", "val/label_accuracy"]
    assert bench.require_agreement(asha, grid, metrics, 1e-6, keys) == 3 * 2
    # within the tolerance: a difference of 1e-7 relative passes at 1e-6
    close = sweep_of({(0.3,): [2.0 * (1 + 1e-7), 1.5], (0.01,): [2.5]})
    assert bench.disagreements(close, grid, metrics, 1e-6) == []


def test_agreement_refuses_differing_histories(bench, capsys):
    keys = ["inner.lr_init", "outer.lr"]
    grid = sweep_of({(0.3, 3e-3): [0.81, 0.37, 0.18], (0.01, 3e-3): [0.46, 0.19, 0.02]})
    asha = sweep_of({(0.3, 3e-3): [0.81, 0.37, 0.179], (0.01, 3e-3): [0.46]})
    with pytest.raises(SystemExit) as exc:
        bench.require_agreement(asha, grid, ["val/answer_loss"], 1e-6, keys, changed=["reckoning_ray/bilevel.py"])
    assert exc.value.code == bench.EXIT_DISAGREE == 2
    err = capsys.readouterr().err
    assert "REFUSED" in err and "inner.lr_init=0.3 outer.lr=0.003" in err
    assert "source changed while the sweeps ran (reckoning_ray/bilevel.py)" in err
    problems = bench.disagreements(asha, grid, ["val/answer_loss"], 1e-6)
    assert [(p["config"], p["round"], p["asha"], p["grid"]) for p in problems] == [((0.3, 3e-3), 3, 0.179, 0.18)]
    # a configuration only one run has, and a round the grid run lacks, are refused too
    missing = bench.disagreements(sweep_of({(0.3, 3e-3): [0.81, 0.37, 0.18, 0.1]}), grid, ["val/answer_loss"], 1e-6)
    assert [p["why"] for p in missing] == ["configuration missing from the ASHA run", "round missing from the grid run"]


def test_grid_flags_are_parsed_and_checked(bench):
    assert bench.parse_grid(["inner.steps=1,2", "outer.lr=3.0e-3,1e-4"]) == {"inner.steps": [1, 2],
                                                                               "outer.lr": [3e-3, 1e-4]}
    for bad in (["inner.steps"], ["inner.steps=1,1"], ["inner.steps=1", "inner.steps=2"]):
        with pytest.raises(ValueError, match="--grid"):
            bench.parse_grid(bad)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(
    os.environ.get("RECKONING_BENCH_SWEEPS") != "1",
    reason="two real Ray Tune sweeps (~3 min on 2 cores); set RECKONING_BENCH_SWEEPS=1 to run",
)
def test_tiny_comparison_counts_rounds_and_ranks_every_configuration(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["--grid", "inner.lr_init=0.3,0.001", "--out", str(tmp_path),
            # 64 tasks in batches of 32: 2 steps, validated after each: 2 rounds per full trial
            "data.num_train=64", "data.num_validation=16", "train.epochs=1",
            "tune.max_rounds=2", "tune.grace_period=1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "asha_vs_grid.json").read_text())
    configs = result["configs"]
    assert sorted(c["grid_rank"] for c in configs) == [1, 2]
    assert {c["config"]["inner.lr_init"] for c in configs} == {0.3, 0.001}
    assert all(c["grid_rounds"] == 2 for c in configs)
    assert all(1 <= c["asha_rounds"] <= c["grid_rounds"] for c in configs)
    rounds = result["rounds"]
    assert rounds["grid"] == 4 and rounds["asha"] == sum(c["asha_rounds"] for c in configs) <= rounds["grid"]
    assert result["rounds_ratio"] == pytest.approx(rounds["asha"] / rounds["grid"])
    # the grid's best is its rank-1 configuration, with the best value of every configuration
    best = min(configs, key=lambda c: c["grid_best"])
    assert best["grid_rank"] == 1 and result["picks"]["grid"]["metric"] == pytest.approx(best["grid_best"])
    pick = result["picks"]["asha"]
    assert result["asha_found_grid_best"] == (pick["grid_rank"] == 1)
    assert 0.0 <= pick["label_accuracy"] <= 1.0
    assert f"compute: ASHA ran {rounds['asha']} of the grid's {rounds['grid']} trial-validation rounds" in out
    assert "## per configuration, in the grid's ranking" in out


def test_sweep_strategies_counts_what_extensions_computed_twice(tmp_path):
    # an asha-extend trial planned for 32 steps, extended to 96 and then to 128 (cooldown 0.2 of
    # each plan: from step 26, then from step 77): the two earlier cooldowns ran and were redone
    from reckoning_ray.core.config import load_config

    strategies = load_bench("sweep_strategies")
    cfg = load_config("embedded", ["outer.schedule=wsd", "outer.cooldown_fraction=0.2", "outer.warmup_ratio=0"])
    assert strategies.repeated(tmp_path, cfg) == (0, 0)
    (tmp_path / "metrics.cooldown-000032.jsonl").write_text('{"round": 2, "step": 32}\n')
    (tmp_path / "metrics.cooldown-000096.jsonl").write_text('{"round": 5, "step": 80}\n{"round": 6, "step": 96}\n')
    assert strategies.repeated(tmp_path, cfg) == (3, (32 - 26) + (96 - 77))
    args = strategies.parse_args(["--strategies", "asha-extend", "--seeds", "0"])
    assert args.strategies == ["grid", "asha-extend"]
    with pytest.raises(SystemExit):
        strategies.parse_args(["--strategies", "hyperband"])
