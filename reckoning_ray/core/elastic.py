"""Elastic runs: how many workers each run of a cluster holds, and what each worker count did.

A run with ``resources.max_workers > resources.num_workers`` is elastic. Its worker count is
decided by a :class:`WorkerPool` (one per sweep, or per run; on Ray a named actor,
:mod:`reckoning_ray.on_ray.elastic`) at two moments only:

- when the run (re)starts: the workers that are free now, at least ``num_workers`` (a run that
  finds fewer waits for them, as a fixed run does);
- right after each validation, once its checkpoint is written (and stored): the run keeps its
  workers, or ends its worker group there and starts again with the new count from that
  checkpoint. A resize therefore redoes no step. A lost node is the other way a worker group
  ends: the run restarts with the workers left from its latest checkpoint, redoing the steps
  since that validation (at most the steps between two validations).

The share of each run is max-min fair (:func:`water_fill`): the slots (worker places of the
cluster) less what the trials not yet started need are spread over the running runs, each
between its ``num_workers`` and ``max_workers``. A run grows only into slots that are free now,
and gives back what it holds above its share when another run needs it, so a trial that
ASHA keeps takes over the slots of the trials it stopped, and a new trial of the sweep still
starts with its ``num_workers``.

The global batch, the data order and the learning-rate schedule do not depend on the worker
count (:mod:`reckoning_ray.core.loop`): a resize changes the speed, never the experiment.

Each run's rank 0 appends what its worker groups did to ``workers.jsonl`` in the run directory
(:func:`append_event`): ``launch`` (the group was asked for), ``ready`` (its workers run and the
checkpoint is restored), ``round`` (a validation's checkpoint), ``end`` (the group ended: done,
or resized). :func:`timeline` reads it back; ``bench/elastic_sweep.py`` measures a sweep with it.

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

WORKERS_FILE = "workers.jsonl"


def elastic_bounds(cfg: Any) -> Optional[tuple[int, int]]:
    """(least, most) workers of an elastic run (``resources.max_workers`` above
    ``resources.num_workers``), None for a fixed one."""
    least, most = int(cfg.resources.num_workers), int(cfg.resources.max_workers or 0)
    return (least, most) if most > least else None


def water_fill(budget: int, bounds: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Max-min fair shares of ``budget`` slots over runs with ``{run: (least, most)}`` workers:
    every run gets its least (even beyond the budget: it waits for its workers), then one slot at
    a time goes to the run with the fewest, up to its most (ties: by name)."""
    shares = {run: int(lo) for run, (lo, _) in bounds.items()}
    left = int(budget) - sum(shares.values())
    while left > 0:
        growing = [run for run, (_, hi) in bounds.items() if shares[run] < int(hi)]
        if not growing:
            break
        run = min(growing, key=lambda r: (shares[r], r))
        shares[run] += 1
        left -= 1
    return shares


class WorkerPool:
    """The worker counts of the elastic runs sharing ``slots`` worker places.

    ``pending``: trials of the sweep not started yet, of which ``concurrency`` (the trials run at
    once) less the running ones start as soon as they can: their ``least`` workers are kept free
    for them.
    """

    def __init__(self, slots: int, concurrency: int = 1) -> None:
        self.slots, self.concurrency = int(slots), int(concurrency)
        # until told otherwise, as many trials as run at once are about to start (a sweep's first
        # trials ask before the driver has said how many wait)
        self.pending = self.concurrency if self.concurrency > 1 else 0
        self.held: dict[str, int] = {}  # run -> workers its group holds (or waits for)
        self.bounds: dict[str, tuple[int, int]] = {}
        self.restart: dict[str, int] = {}  # run -> the count its next group starts with (a resize)

    # -- what the cluster and the sweep say --------------------------------------------------------
    def set_slots(self, slots: int) -> None:
        self.slots = int(slots)

    def set_pending(self, pending: int) -> None:
        self.pending = int(pending)

    def _starting(self) -> int:
        """Trials that start as soon as they can: pending ones, up to the concurrency."""
        return min(self.pending, max(self.concurrency - len(self.held), 0))

    def _reserved(self) -> int:
        least = min((lo for lo, _ in self.bounds.values()), default=1)
        return self._starting() * least

    def shares(self) -> dict[str, int]:
        """Every run's fair share, the trials about to start counted in as runs like the others
        (so that a run does not grow into workers it would give back at once)."""
        bounds = dict(self.bounds)
        like = (min((lo for lo, _ in self.bounds.values()), default=1), max((hi for _, hi in self.bounds.values()), default=1))
        for i in range(self._starting()):
            bounds[f"\uffff starting {i}"] = like  # sorts after every run's name
        shares = water_fill(self.slots, bounds)
        return {run: shares[run] for run in self.bounds}

    def _free_for(self, run: str) -> int:
        return self.slots - self._reserved() - sum(k for r, k in self.held.items() if r != run)

    # -- what a run asks --------------------------------------------------------------------------
    def start(self, run: str, least: int, most: int) -> int:
        """The workers ``run``'s next group starts with: its share, as far as it is free now, at
        least ``least``. A resize decided at its last validation comes first."""
        self.bounds[run] = (int(least), int(most))
        if run in self.restart:  # as far as it is still there (a node may have gone since)
            count = max(int(least), min(self.restart.pop(run), self._free_for(run)))
        else:
            self.held[run] = int(least)  # running now: no longer one of the trials about to start
            count = max(int(least), min(self.shares()[run], self._free_for(run)))
        self.held[run] = count
        return count

    def resize(self, run: str, current: int, least: int, most: int) -> int:
        """Right after a validation's checkpoint: the count ``run`` goes on with. Above its share
        it gives back the excess; below it grows into what is free now. A count other than
        ``current`` is kept for its next :meth:`start`."""
        self.bounds[run] = (int(least), int(most))
        self.held[run] = int(current)
        share = self.shares()[run]
        count = current
        if share > current:
            count = max(current, min(share, self._free_for(run)))
        elif share < current:
            count = share
        if count != current:
            self.restart[run] = count
        self.held[run] = count
        return count

    def hold(self, run: str, count: int) -> int:
        """``run``'s group has ``count`` workers after all (fewer could be placed than decided);
        a resize decided for it and not made is dropped."""
        self.restart.pop(run, None)
        self.held[run] = int(count)
        return int(count)

    def next_start(self, run: str) -> Optional[int]:
        """The count a resize decided for ``run``'s next group (None: no resize)."""
        return self.restart.get(run)

    def release(self, run: str) -> None:
        """``run`` ended (finished, stopped, failed): its workers are free."""
        for table in (self.held, self.bounds, self.restart):
            table.pop(run, None)


# -- what each worker group did ----------------------------------------------------------------------

def append_event(run_dir: str | os.PathLike, event: str, workers: int, **fields: Any) -> None:
    """One line of ``workers.jsonl``: ``{"event", "t" (unix seconds), "workers", ...}``."""
    row = {"event": event, "t": fields.pop("t", None) or time.time(), "workers": int(workers), **fields}
    path = Path(run_dir) / WORKERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / WORKERS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by a killed writer ends what can be read
    return rows


def timeline(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's worker groups in order: ``{"workers", "launch", "ready", "last_round", "end",
    "rounds", "resume_step", "end_step", "why"}`` (times in unix seconds; ``ready``,
    ``last_round``, ``end`` are None where the group never got there: a group killed while it
    trained ends at its last round, what it trained after that is lost)."""
    groups: list[dict[str, Any]] = []
    for e in events:
        if e["event"] == "launch":
            groups.append({"workers": e["workers"], "launch": e["t"], "ready": None, "last_round": None, "end": None,
                           "rounds": 0, "resume_step": None, "end_step": None, "why": None})
        elif not groups:
            continue
        elif e["event"] == "ready":
            groups[-1].update(ready=e["t"], resume_step=e.get("step"), workers=e["workers"])
        elif e["event"] == "round":
            groups[-1].update(last_round=e["t"], rounds=groups[-1]["rounds"] + 1, end_step=e.get("step"))
        elif e["event"] == "end":
            groups[-1].update(end=e["t"], why=e.get("why"), end_step=e.get("step", groups[-1]["end_step"]))
    return groups


def steps_redone(groups: list[dict[str, Any]]) -> int:
    """Optimizer steps trained twice: a group that resumed from an earlier step than the one its
    predecessor had reached at its last validation (a lost node's steps after it are not seen)."""
    redone = 0
    for before, after in zip(groups, groups[1:]):
        if before["end_step"] is not None and after["resume_step"] is not None:
            redone += max(0, int(before["end_step"]) - int(after["resume_step"]))
    return redone


def history_text(workers_per_round: Iterable[Optional[int]]) -> str:
    """The worker count of each validation round in short: ``1x2 2x6`` is 2 rounds with 1 worker,
    then 6 with 2 ("" without any)."""
    runs: list[list[int]] = []
    for count in workers_per_round:
        if count is None:
            continue
        if runs and runs[-1][0] == int(count):
            runs[-1][1] += 1
        else:
            runs.append([int(count), 1])
    return " ".join(f"{k}x{n}" for k, n in runs)


__all__ = ["WORKERS_FILE", "WorkerPool", "append_event", "elastic_bounds", "history_text", "read_events", "steps_redone", "timeline",
           "water_fill"]
