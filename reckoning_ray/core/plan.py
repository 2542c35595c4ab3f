"""How long a run is: optimizer steps per epoch, where the validations fall, the planned steps
and validation rounds of a run, and the rounds an extended (wsd) run has already reported.

One home for this arithmetic: the loop (:mod:`reckoning_ray.core.loop`), the Ray Train worker
and the sweep's trials (extensions to ASHA's next rung) all use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reckoning_ray.core.schema import TrainConfig


def steps_per_epoch(num_tasks: int, train: TrainConfig) -> int:
    per_step = train.batch_size * train.grad_accum
    return max(1, math.ceil(num_tasks / per_step))


def validation_points(n_steps: int, per_epoch: int) -> list[int]:
    """Step indices (1-based, within an epoch) after which to validate: evenly spaced, last = end."""
    points = sorted({max(1, math.ceil(k * n_steps / per_epoch)) for k in range(1, per_epoch + 1)})
    return points


def planned_steps(num_tasks: int, train: TrainConfig) -> int:
    """Optimizer steps of a run on ``num_tasks`` training tasks: its epochs, at most ``train.max_steps``."""
    total = steps_per_epoch(num_tasks, train) * train.epochs
    return min(total, train.max_steps) if train.max_steps else total


def planned_validations(num_tasks: int, train: TrainConfig) -> int:
    """Validations a run on ``num_tasks`` training tasks makes when it is not stopped early."""
    per_epoch = steps_per_epoch(num_tasks, train)
    total = planned_steps(num_tasks, train)
    points = validation_points(per_epoch, train.validations_per_epoch)
    return sum(1 for s in range(1, total + 1) if (s - 1) % per_epoch + 1 in points or s == total)


def steps_for_validations(num_tasks: int, train: TrainConfig, rounds: int) -> int:
    """The optimizer step of a run's ``rounds``-th validation when nothing limits its length:
    the run length (``train.max_steps``) whose last validation is that round."""
    per_epoch = steps_per_epoch(num_tasks, train)
    points = validation_points(per_epoch, train.validations_per_epoch)
    epoch, k = divmod(int(rounds) - 1, len(points))
    return epoch * per_epoch + points[k]


def validations_through(num_tasks: int, train: TrainConfig, steps: int) -> int:
    """Validations a run made up to and including optimizer step ``steps``, which is a validation
    point or the run's last step (where it validates as well)."""
    per_epoch = steps_per_epoch(num_tasks, train)
    points = validation_points(per_epoch, train.validations_per_epoch)
    full, rest = divmod(int(steps), per_epoch)
    within = sum(1 for p in points if p <= rest)
    return full * len(points) + within + (1 if rest and rest not in points else 0)


COOLDOWN_METRICS = "metrics.cooldown-{steps:06d}.jsonl"


def rounds_set_aside(run_dir: Path) -> int:
    """The last validation round of the cooldowns an extended wsd run set aside
    (``metrics.cooldown-*.jsonl``), 0 for a run never extended. The extension repeats the rounds
    up to it (from the cooldown's start, at the constant rate); hosts that need increasing rounds
    (Ray Tune, W&B) heard of them already and get only the later ones."""
    last = 0
    for path in Path(run_dir).glob(COOLDOWN_METRICS.replace("{steps:06d}", "*")):
        for line in path.read_text().splitlines():
            if line.strip():
                last = max(last, int(json.loads(line).get("round") or 0))
    return last
