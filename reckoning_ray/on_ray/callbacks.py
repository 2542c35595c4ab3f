"""The W&B writer's hosts in Ray: processes that outlive the training workers.

:class:`TrainTracking` is a Ray Train ``UserCallback``: it runs in the run's Ray Train controller
and feeds the run's :class:`~reckoning_ray.tracking.writer.RunWriter` with every validation the workers
report (rank 0's metrics) and, from the final report, the summary and test metrics. A sweep's
trials are tracked by ``reckoning_ray.on_ray.callbacks.TrackingCallback`` on the sweep's driver with the same
writer class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ray.train import UserCallback
from ray.tune import Callback

from reckoning_ray.core.config import flatten, metric_mode
from reckoning_ray.core.storage import is_uri, local_path
from reckoning_ray.core.sweep_store import SweepStore
from reckoning_ray.on_ray.trials import trial_config
from reckoning_ray.tracking.sweeps import sweep_id_for
from reckoning_ray.tracking.writer import RunNames, RunWriter, run_names


class TrainTracking(UserCallback):
    """One training run's W&B run, written from the Ray Train controller."""

    def __init__(self, cfg_tracking: Any, run_dir: Path, names: RunNames, config: dict[str, Any]) -> None:
        self.cfg_tracking = cfg_tracking
        self.run_dir = Path(run_dir)
        self.names = names
        self.config = config
        self.writer: Optional[RunWriter] = None

    def _open(self) -> RunWriter:
        if self.writer is None:
            self.writer = RunWriter(self.cfg_tracking, self.run_dir, self.names, config=self.config).start()
            self.writer.backfill()  # validations an earlier process made and W&B did not get
        return self.writer

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        reported = metrics[0] if metrics else {}
        writer = self._open()
        if reported.get("final"):
            writer.summary(reported.get("summary") or {})
            writer.finish()
            self.writer = None
        else:
            writer.log(reported)


class TrackingCallback(Callback):
    """W&B for every trial, from the sweep's driver process: one
    :class:`~reckoning_ray.tracking.writer.RunWriter` per trial.

    Each run's summary keeps the best value of ``tune.metric`` (and ``train.metric``); when the
    sweep directory records a W&B sweep (``wandb_sweep.json``), every run joins it.

    A trial that ASHA stops is killed together with its training workers; the driver outlives
    every trial, so each trial's run is started, fed and finished here (run id = trial id, group =
    sweep name, config = the trial's flattened resolved config, files under the trial's
    directory). Results stream in as Tune receives them; validations Tune never passed on (the one
    that made ASHA stop a trial, those of a sweep interrupted while results were in flight) are
    filled in from the trial's metrics.jsonl when the trial starts again and when it ends.
    """

    def __init__(self, base: dict, sweep_root: str) -> None:
        self.base = base
        # the sweep directory (path or URI); a sweep resumed by another driver finds its own copy
        self.sweep_root = sweep_root
        self.writers: dict[str, Any] = {}
        self._store: Optional[SweepStore] = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {"base": self.base, "sweep_root": self.sweep_root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["base"], state["sweep_root"])

    @property
    def trials_local(self) -> Path:
        return local_path(self.sweep_root) / "trials"

    @property
    def store(self) -> Optional[SweepStore]:
        """Mirrors the trials' W&B files and the sweep's files to an object store (None for a path)."""
        if self._store is None and is_uri(self.sweep_root):
            self._store = SweepStore(local_path(self.sweep_root), self.sweep_root)
        return self._store

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = trial.trial_id
        cfg = trial_config(self.base, dict(trial.config))
        cfg.train.run_name = trial_id
        # the run summary keeps the best value of the metric ASHA ranks by (and of train.metric)
        best = {cfg.train.metric: metric_mode(cfg.train.metric), cfg.tune.metric: metric_mode(cfg.tune.metric)}
        # the W&B sweep recorded in the sweep directory (created at the start of an online sweep, or
        # by an earlier publish): read at every trial start, so it holds after --resume too
        sweep_id = sweep_id_for(self.trials_local.parent, cfg.tracking)
        if self.store is not None:
            self.store.pull_trial(trial_id)  # the metrics its workers wrote, for the backfill
        writer = RunWriter(cfg.tracking, self.trials_local / trial_id, run_names(cfg, trial_id=trial_id),
                           config=flatten(cfg), sweep_id=sweep_id, best=best)
        self.writers[trial_id] = writer.start()
        writer.backfill()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        writer = self.writers.get(trial.trial_id)
        if writer is not None:
            if self.store is not None and writer.active:  # validations Tune never heard of go first (RunWriter.log)
                self.store.pull_trial(trial.trial_id)
            writer.log(result)
        if self.store is not None:
            self.store.push_trial(trial.trial_id)
            self.store.push_sweep()  # the ASHA rungs

    def _finish(self, trial: Any, exit_code: int) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            if self.store is not None:
                self.store.pull_trial(trial.trial_id)
            writer.backfill()
            writer.finish(exit_code=exit_code)
            if self.store is not None:
                self.store.push_trial(trial.trial_id)
                self.store.push_sweep()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, 0)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, 1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            self._finish(trial, 0)
        if self._store is not None:  # W&B files still waiting for an object store that went away
            self._store.close(float(self.base["tune"]["storage_wait_s"]))


# -- the driver ------------------------------------------------------------------------------------
