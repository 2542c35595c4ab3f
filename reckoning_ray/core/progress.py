"""The training loop's progress display: one tqdm bar per run counting optimizer steps (with
tasks per second and the loss), which steps aside on a terminal for the validation lines and
prints plain lines when the output is not a terminal (Ray's worker logs).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from tqdm import tqdm


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    validations: int = 0
    best_metric: Optional[float] = None
    best_step: int = -1
    bad_validations: int = 0  # validations since the best one
    stopped_early: bool = False


class _LineStream:
    """A file for tqdm where every redraw is a line of its own.

    On a terminal tqdm redraws one line with carriage returns; written to a file or a Ray worker's
    log, those redraws pile up in one line that Ray cuts anywhere (and whose "\r" wipes its
    "(RayTrainWorker pid=...)" prefix), so here each redraw becomes a whole line instead.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:  # tqdm's clears and its closing newline write nothing visible
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class ProgressBar:
    """Rank 0's bar over the run's optimizer steps: steps done / total, elapsed < ETA (wall clock,
    validations included), tasks/s of the optimizer steps (all workers; validations left out) and
    the last step's train loss.

    On a terminal it redraws in place at most every 0.5 s; anywhere else (Ray workers' logs, files)
    it prints at most one line every 30 s, plus one at the start and one at the end.
    """

    def __init__(self, total: int, initial: int, desc: str, file: Any = None) -> None:
        file = file if file is not None else sys.stderr
        self.tty = bool(getattr(file, "isatty", lambda: False)())
        # miniters=1 turns off tqdm's dynamic miniters, so its monitor thread never redraws between
        # updates (it would every maxinterval = 10 s) and mininterval alone sets the pace
        # tqdm's own step rate (wall clock, validations included) is left out so that the line
        # shows one speed, tasks/s; the ETA still uses it
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", miniters=1,
                        mininterval=0.5 if self.tty else 30.0, maxinterval=30.0,
                        file=file if self.tty else _LineStream(file), dynamic_ncols=self.tty,
                        ascii=not self.tty, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                                   "[{elapsed}<{remaining}{postfix}]")
        self.tasks = 0
        self.seconds = 0.0

    def step(self, tasks: int, seconds: float, loss: float) -> None:
        """One optimizer step of ``tasks`` tasks (all workers) that took ``seconds``; cheap: most
        calls do not redraw."""
        self.tasks += tasks
        self.seconds += seconds
        self.bar.set_postfix_str(f"{self.tasks / max(self.seconds, 1e-9):.1f} tasks/s, loss {loss:.4f}",
                                 refresh=False)
        self.bar.update(1)

    def describe(self, desc: str) -> None:
        self.bar.set_description_str(desc, refresh=False)

    @contextmanager
    def around_print(self) -> Iterator[None]:
        """Print other lines inside this block: on a terminal the bar steps aside and is redrawn
        below them (elsewhere its lines are whole lines already)."""
        if self.tty:
            self.bar.clear()
        try:
            yield
        finally:
            if self.tty:
                self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
