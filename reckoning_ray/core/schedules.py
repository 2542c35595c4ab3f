"""Outer learning-rate schedules: the multiplier of the base rate at each optimizer step.

``outer.schedule``:

- ``linear``: linear warmup, then linear decay to 0 at the last step (the paper's; the same
  values as ``transformers.get_linear_schedule_with_warmup``);
- ``cosine``: linear warmup, then half a cosine down to 0;
- ``wsd`` (warmup-stable-decay; Hägele et al. 2024): linear warmup, a constant rate, and a
  linear cooldown to 0 over the last ``outer.cooldown_fraction`` of the steps. Up to the
  cooldown the rate does not depend on the run's length, so a run can be *extended*: continued
  from its state at the start of the cooldown (the loop keeps that checkpoint) at the constant
  rate, and cooled down again at the new end. A run extended to N steps makes exactly the steps
  of a run planned for N steps.

Warmup is ``outer.warmup_ratio`` of the steps first planned, in steps, and stays that long when
the run is extended. Nothing here imports Ray.
"""

from __future__ import annotations

import math
from typing import Any


class LrSchedule:
    """Multiplier of step ``step`` (0-based, as ``LambdaLR`` counts); picklable, so its fields are
    saved with the scheduler's state (``LambdaLR.state_dict``)."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, cooldown_fraction: float = 0.2) -> None:
        self.kind = str(kind)
        self.warmup_steps = int(warmup_steps)
        self.cooldown_fraction = float(cooldown_fraction)
        self.total_steps = int(total_steps)

    @property
    def cooldown_start(self) -> int:
        """The first step of the cooldown (wsd); the run's length for the other schedules."""
        if self.kind != "wsd":
            return self.total_steps
        cooldown = int(round(self.cooldown_fraction * self.total_steps))
        return max(self.warmup_steps, self.total_steps - cooldown)

    def extend_to(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if self.kind == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        if self.kind == "cosine":
            progress = float(step - warmup) / float(max(1, total - warmup))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        if self.kind == "wsd":
            start = self.cooldown_start
            if step < start:
                return 1.0
            return max(0.0, float(total - step) / float(max(1, total - start)))
        raise ValueError(f"outer.schedule={self.kind!r}: choose linear, cosine or wsd")


def build_lr_schedule(optimizer: Any, kind: str, total_steps: int, warmup_ratio: float,
                    cooldown_fraction: float) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    schedule = LrSchedule(kind, total_steps, int(warmup_ratio * total_steps), cooldown_fraction)
    return LambdaLR(optimizer, schedule)


def schedule_of(scheduler: Any) -> LrSchedule:
    return scheduler.lr_lambdas[0]


__all__ = ["LrSchedule", "build_lr_schedule", "schedule_of"]
