"""Tune schedulers that survive a driver restart: ASHA and learning-curve stopping, each saving
its state into the sweep directory (Tune does not save the scheduler with the experiment), and,
with ``tune.extend``, ASHA posting its decision on each trial's last planned round to the
promotion board. :func:`build_trial_scheduler` builds the one ``tune.scheduler`` names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from ray.tune.schedulers import ASHAScheduler

from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.storage import local_path
from reckoning_ray.on_ray.curve import CurveStopping
from reckoning_ray.on_ray.trials import board_name, promotion_board


class Resumable:
    """A scheduler whose state survives ``--resume``: mixed in before a Tune scheduler class.

    Tune restores trials and the searcher but rebuilds the scheduler empty, so after a resume
    ASHA would judge the remaining trials only against each other (and curve stopping would
    forget the other trials' curves). This saves the scheduler's state after every result, in
    the sweep directory where this process runs it (``STATE_FILE``), and reloads it before it
    schedules again.
    """

    STATE_FILE = ""

    def _init_state(self, sweep_root: str) -> None:
        self._sweep_root = sweep_root  # the sweep directory (path or URI): its file is found where it runs
        self._loaded = False

    @property
    def _state_path(self) -> str:
        return str(local_path(self._sweep_root) / self.STATE_FILE)

    def _state(self) -> dict[str, Any]:
        """What a resume needs, as JSON values."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _load(self) -> None:
        # JSON, never a pickle: a sweep directory someone else wrote cannot run code here
        if not self._loaded and os.path.exists(self._state_path):
            try:
                with open(self._state_path, encoding="utf-8") as f:
                    self._restore(json.load(f))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ConfigError(f"{self._state_path} is not the scheduler state this project writes ({exc}); "
                                  "move it away to resume without it, or start the sweep fresh") from None
        self._loaded = True

    def _save(self) -> None:
        Path(self._state_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._state(), f)
        os.replace(tmp, self._state_path)

    def _known(self, trial_id: str) -> bool:
        return False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if not self._known(trial.trial_id):
            super().on_trial_add(tune_controller, trial)  # type: ignore[misc]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        self._save()
        return decision


class ResumableASHA(Resumable, ASHAScheduler):
    """ASHA (the default ``tune.scheduler``) whose rungs survive ``--resume``. With ``board`` (the
    name of the sweep's :class:`PromotionBoard`, ``tune.extend``) it posts its decision on each
    trial's last planned round there."""

    STATE_FILE = "asha_state.json"

    def __init__(self, sweep_root: str, board: Optional[str] = None, **kwargs: Any) -> None:
        ASHAScheduler.__init__(self, **kwargs)
        self._init_state(sweep_root)
        self._board = board

    def _known(self, trial_id: str) -> bool:
        return trial_id in self._trial_info  # ASHAScheduler's own record (the exception in _state)

    def _state(self) -> dict[str, Any]:
        # Private API (ray==2.60.0): ASHAScheduler has no public state to save and restore; its
        # state is each trial's bracket (_trial_info), each bracket's rungs (_rungs: [(milestone,
        # {trial id: value})]) and two counters, read here and set again in _restore
        index = {id(bracket): i for i, bracket in enumerate(self._brackets)}
        return {"counter": self._counter, "num_stopped": self._num_stopped,
                "trial_bracket": {trial: index[id(bracket)] for trial, bracket in self._trial_info.items()},
                "rungs": [[[milestone, recorded] for milestone, recorded in bracket._rungs]
                          for bracket in self._brackets]}

    def _restore(self, state: dict[str, Any]) -> None:
        if len(state["rungs"]) != len(self._brackets):
            raise ValueError(f"{len(state['rungs'])} brackets saved, {len(self._brackets)} configured")
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket._rungs = [(milestone, {str(t): float(v) for t, v in recorded.items()})
                              for milestone, recorded in rungs]
        self._trial_info = {str(t): self._brackets[int(i)] for t, i in state["trial_bracket"].items()}
        self._counter, self._num_stopped = int(state["counter"]), int(state["num_stopped"])

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        planned, rounds = int(result.get("rounds_planned") or 0), int(result.get("round") or 0)
        if self._board and planned and rounds >= planned:
            promotion_board(self._board).decide(trial.trial_id, rounds, decision == ASHAScheduler.CONTINUE)
        return decision


class ResumableCurve(Resumable, CurveStopping):
    """Learning-curve stopping (``tune.scheduler=curve``) whose curves survive ``--resume``."""

    STATE_FILE = "curve_state.json"

    def __init__(self, sweep_root: str, **kwargs: Any) -> None:
        CurveStopping.__init__(self, **kwargs)
        self._init_state(sweep_root)

    def _state(self) -> dict[str, Any]:
        return {"curves": self._curves, "decisions": self.decisions}

    def _restore(self, state: dict[str, Any]) -> None:
        self._curves = {str(t): [(float(r), float(z)) for r, z in curve] for t, curve in state["curves"].items()}
        self.decisions = [dict(d) for d in state["decisions"]]


def build_trial_scheduler(cfg: DictConfig, root: str) -> Any:
    """The Tune scheduler ``tune.scheduler`` names: ASHA, curve stopping, or FIFO (none stops)."""
    from ray.tune.schedulers import FIFOScheduler

    t = cfg.tune
    if t.scheduler == "asha":
        return ResumableASHA(root, board=board_name(cfg) if t.extend else None, time_attr="round",
                             max_t=t.max_rounds, grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    if t.scheduler == "curve":
        return ResumableCurve(root, max_t=t.max_rounds, top_k=t.curve_top_k, confidence=t.curve_confidence,
                              min_rounds=t.curve_min_rounds)
    return FIFOScheduler()
