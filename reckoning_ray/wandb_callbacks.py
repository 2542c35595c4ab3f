"""The W&B writer's hosts in Ray: processes that outlive the training workers.

:class:`TrainTracking` is a Ray Train ``UserCallback``: it runs in the run's Ray Train controller
and feeds the run's :class:`~reckoning_ray.tracking.RunWriter` with every validation the workers
report (rank 0's metrics) and, from the final report, the summary and test metrics. A sweep's
trials are tracked by ``reckoning_ray.tune.TrackingCallback`` on the sweep's driver with the same
writer class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ray.train import UserCallback

from .tracking import RunNames, RunWriter


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
