"""Learning-curve stopping (reckoning_ray/curve.py): the scheduler's decisions on curves built to
lose and to win, fed as Tune feeds results (one per validation round)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from reckoning_ray.on_ray.curve import CurveStopping, fit, probability_to_beat
from reckoning_ray.on_ray.schedulers import ResumableCurve, build_trial_scheduler

ROUNDS = 10


def _loss(a: float, b: float, c: float, noise: float = 0.003):
    wiggle = np.random.default_rng(int(a * 1000 + b * 100)).normal(0, noise, ROUNDS)
    return [a + b * t ** (-c) + wiggle[t - 1] for t in range(1, ROUNDS + 1)]


def _feed(scheduler: CurveStopping, trial_id: str, curve: list[float], key: str = "val/answer_loss") -> list[str]:
    trial = SimpleNamespace(trial_id=trial_id)
    decisions = []
    for t, value in enumerate(curve, start=1):
        decision = scheduler.on_trial_result(None, trial, {key: value, "round": t, "rounds_planned": ROUNDS})
        decisions.append(decision)
        if decision == TrialScheduler.STOP:
            break
    return decisions


def test_the_fit_recovers_a_power_law_and_its_prediction():
    t = list(range(1, 7))
    params, cov, sigma = fit(t, [0.2 + 1.5 * x ** -0.7 for x in t])
    assert params == pytest.approx([0.2, 1.5, 0.7], abs=1e-4) and sigma < 1e-6
    assert probability_to_beat(t, [0.2 + 1.5 * x ** -0.7 for x in t], 10, target=0.5) == 1.0
    assert probability_to_beat(t, [0.2 + 1.5 * x ** -0.7 for x in t], 10, target=0.4) == 0.0
    assert fit([1, 2, 3], [1.0, 0.5, 0.3]) is None  # too short to judge


def test_stops_a_curve_built_to_lose_and_keeps_one_built_to_win():
    scheduler = CurveStopping(max_t=ROUNDS, top_k=1, confidence=0.95, min_rounds=4)
    assert scheduler.set_search_properties("val/answer_loss", "min")
    # the reference trial: ends near 0.1 + 0.5 / 10 = 0.15
    assert TrialScheduler.STOP not in _feed(scheduler, "ref", _loss(0.1, 0.5, 1.0))
    # flattens out at 0.9: stopped once the curve shows it
    loser = _feed(scheduler, "loser", _loss(0.9, 0.5, 1.0))
    assert loser[-1] == TrialScheduler.STOP and len(loser) <= 6, loser
    # behind the reference at every round until the 6th, but heading for 0.02: never stopped
    winner_curve = _loss(0.02, 1.0, 0.9)
    assert winner_curve[3] > _loss(0.1, 0.5, 1.0)[3]  # ASHA would judge it worse at round 4
    assert TrialScheduler.STOP not in _feed(scheduler, "winner", winner_curve)
    assert [d["trial"] for d in scheduler.decisions] == ["loser"]
    assert scheduler.decisions[0]["chance"] < 0.05


def test_accuracy_curves_and_top_k():
    scheduler = CurveStopping(max_t=ROUNDS, top_k=2, min_rounds=4)
    scheduler.set_search_properties("val/label_accuracy", "max")
    acc = lambda a, b, c: [1 - v for v in _loss(a, b, c)]  # noqa: E731
    _feed(scheduler, "a", acc(0.05, 0.6, 1.0), "val/label_accuracy")
    # with one other trial there is no 2nd best yet: nothing is stopped
    assert TrialScheduler.STOP not in _feed(scheduler, "b", acc(0.7, 0.2, 1.0), "val/label_accuracy")
    # now a (0.9) and b (0.28) are the bests; c heads for 0.5 accuracy, above b: kept
    assert TrialScheduler.STOP not in _feed(scheduler, "c", acc(0.5, 0.3, 1.0), "val/label_accuracy")
    # d heads for 0.1 accuracy, below the 2nd best: stopped
    assert _feed(scheduler, "d", acc(0.9, 0.1, 1.0), "val/label_accuracy")[-1] == TrialScheduler.STOP


def test_the_sweep_builds_it_and_it_survives_a_resume(tmp_path):
    from omegaconf import OmegaConf

    from reckoning_ray.core.config import load_config

    cfg = load_config("embedded")
    OmegaConf.update(cfg, "tune.scheduler", "curve")
    scheduler = build_trial_scheduler(cfg, str(tmp_path))
    assert isinstance(scheduler, ResumableCurve)
    scheduler.set_search_properties("val/label_accuracy", "max")
    _feed(scheduler, "a", [0.1 * t for t in range(1, 5)], "val/label_accuracy")
    assert (tmp_path / "curve_state.json").is_file()
    restored = pickle.loads(pickle.dumps(build_trial_scheduler(cfg, str(tmp_path))))  # as Tune rebuilds it
    restored.set_search_properties("val/label_accuracy", "max")
    restored.on_trial_add(None, SimpleNamespace(trial_id="b"))
    assert len(restored._curves["a"]) == 4
