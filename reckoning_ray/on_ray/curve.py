"""Learning-curve stopping: a Ray Tune scheduler that extrapolates each trial's validation curve
(after Domhan et al., IJCAI 2015) and stops a trial that will most likely not beat the best.

``tune.scheduler=curve``. After every validation round ``t`` of a trial, once it has
``tune.curve_min_rounds`` points, the scheduler fits a saturating power law to its curve of
``tune.metric``::

    loss-like value z(t) = a + b * t ** (-c),    c in (0, 5]     (z = metric, or -metric for max)

by least squares (``scipy.optimize.curve_fit``), and predicts the value at the trial's last
round ``T`` (its planned rounds, at most ``tune.max_rounds``). The spread of that prediction comes
from the fit: parameter draws from the fit's covariance plus the residual noise. The trial is
stopped when the probability that its final value beats the ``tune.curve_top_k``-th best value
of the *other* trials so far is below ``1 - tune.curve_confidence``. A trial that already beats
that value, a fit that fails, or a curve that is not yet long enough always continues.

Unlike ASHA, which compares trials at the same round, this keeps a trial that is behind now but
improving fast enough to end ahead, and stops a trial that has flattened out early. Nothing
here is specific to RECKONING; it needs only the validation metric per round.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


def power_law(t: Any, a: float, b: float, c: float) -> Any:
    return a + b * np.power(t, -c)


def fit(rounds: list[float], values: list[float]) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
    """Least-squares fit of :func:`power_law` to a loss-like curve: (parameters, their
    covariance, residual standard deviation), or None when the fit fails."""
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    t, z = np.asarray(rounds, dtype=float), np.asarray(values, dtype=float)
    if len(t) < 4 or not np.all(np.isfinite(z)):
        return None
    p0 = [float(z[-1]), float(z[0] - z[-1]) or 1e-3, 0.5]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, cov = curve_fit(power_law, t, z, p0=p0, bounds=([-np.inf, -np.inf, 1e-3], [np.inf, np.inf, 5.0]),
                                    maxfev=10000)
    except (RuntimeError, ValueError):
        return None
    residual = z - power_law(t, *params)
    sigma = float(np.sqrt(np.sum(residual ** 2) / max(1, len(t) - 3)))
    if not np.all(np.isfinite(cov)):
        return None
    return params, cov, sigma


def probability_to_beat(rounds: list[float], values: list[float], final_round: float, target: float,
                        seed: int = 0, draws: int = 2000) -> Optional[float]:
    """The chance that the loss-like curve ends below ``target`` at ``final_round``, or None when
    the curve cannot be fitted."""
    fitted = fit(rounds, values)
    if fitted is None:
        return None
    params, cov, sigma = fitted
    rng = np.random.default_rng(seed)
    samples = rng.multivariate_normal(params, cov, size=draws, check_valid="ignore", method="eigh")
    samples[:, 2] = np.clip(samples[:, 2], 1e-3, 5.0)
    final = power_law(float(final_round), samples[:, 0], samples[:, 1], samples[:, 2])
    final = final + rng.normal(0.0, sigma, size=draws)
    return float(np.mean(final < target))


class CurveStopping(FIFOScheduler):
    """Stops trials whose extrapolated validation curve is unlikely to beat the ``top_k``-th best
    other trial (module docstring). ``metric``/``mode`` come from ``TuneConfig``."""

    def __init__(self, max_t: int, top_k: int = 1, confidence: float = 0.95, min_rounds: int = 4,
                 time_attr: str = "round") -> None:
        super().__init__()
        self._max_t, self._top_k, self._confidence = int(max_t), int(top_k), float(confidence)
        self._min_rounds, self._time_attr = max(4, int(min_rounds)), time_attr
        self._mode: Optional[str] = None
        self._curves: dict[str, list[tuple[float, float]]] = {}  # trial id -> [(round, loss-like value)]
        self.decisions: list[dict[str, Any]] = []  # why each trial was stopped (for the sweep's log)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        if self._metric and metric:
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def _z(self, value: float) -> float:
        return float(value) if self._mode == "min" else -float(value)

    def _target(self, trial_id: str) -> Optional[float]:
        """The top_k-th best value (loss-like) of the other trials so far."""
        bests = sorted(min(z for _, z in curve) for other, curve in self._curves.items() if other != trial_id and curve)
        return bests[self._top_k - 1] if len(bests) >= self._top_k else None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._metric not in result or self._time_attr not in result:
            return TrialScheduler.CONTINUE
        value = float(result[self._metric])
        if not math.isfinite(value):
            return TrialScheduler.CONTINUE
        t = float(result[self._time_attr])
        curve = self._curves.setdefault(trial.trial_id, [])
        curve[:] = [(r, z) for r, z in curve if r < t] + [(t, self._z(value))]
        final = float(min(int(result.get("rounds_planned") or self._max_t), self._max_t))
        target = self._target(trial.trial_id)
        if len(curve) < self._min_rounds or target is None or t >= final:
            return TrialScheduler.CONTINUE
        if min(z for _, z in curve) <= target:
            return TrialScheduler.CONTINUE  # already at least as good
        seed = zlib.crc32(f"{trial.trial_id}:{int(t)}".encode())
        chance = probability_to_beat([r for r, _ in curve], [z for _, z in curve], final, target, seed=seed)
        if chance is None or chance >= 1.0 - self._confidence:
            return TrialScheduler.CONTINUE
        self.decisions.append({"trial": trial.trial_id, "round": int(t), "final_round": int(final),
                               "chance": chance, "target": target if self._mode == "min" else -target})
        print(f"curve stopping: trial {trial.trial_id} at round {int(t)}: {chance:.1%} chance to beat the "
              f"{self._top_k}-th best {self._metric} by round {int(final)}; stopped", flush=True)
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"Curve stopping: {len(self.decisions)} trial(s) stopped"


__all__ = ["CurveStopping", "fit", "power_law", "probability_to_beat"]
