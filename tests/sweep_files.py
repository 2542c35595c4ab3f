"""A finished sweep's files, written by hand: what ``python -m reckoning_ray.tune report`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# (trial, inner.steps, inner.lr_init, status, rounds, curve of val/answer_loss)
TRIALS = [
    ("t0", 1, 1e-4, "ASHA stop", 1, [2.0]),
    ("t1", 2, 3e-3, "ASHA stop", 2, [1.8, 1.5]),
    ("t2", 4, 5e-2, "completed", 4, [1.6, 1.1, 0.8, 0.7]),
    ("t3", 2, 1e-2, "patience stop", 3, [1.7, 1.2, 1.25]),
]
TEST = {"test/label_accuracy": 0.75, "test/label_accuracy/hops_2": 0.875, "test/label_accuracy/hops_3": 0.625,
        "test/recall": 0.5, "test/answer_loss": 0.7, "test/tasks": 16.0, "checkpoint": "best"}


def write_sweep(root: Path, asha_rungs: bool = True) -> Path:
    """A sweep directory of :data:`TRIALS` (ASHA, grace period 1, reduction factor 2, 4 rounds);
    ``asha_rungs``: with the ``asha_state.json`` an ASHA sweep leaves (rungs 1, 2 and 4)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep_config.yaml").write_text(yaml.safe_dump({"tune": {
        "metric": "val/answer_loss", "mode": "min", "scheduler": "asha", "grace_period": 1,
        "reduction_factor": 2, "max_rounds": 4}}))
    if asha_rungs:
        (root / "asha_state.json").write_text(json.dumps({"rungs": [[[4, {"t2": 0.7}], [2, {"t1": 1.5, "t2": 1.1}],
                                                                    [1, {"t0": 2.0, "t1": 1.8}]]]}))
    rows = []
    for trial, steps, lr, status, rounds, curve in TRIALS:
        folder = root / "trials" / trial
        folder.mkdir(parents=True)
        # a stopped trial's workers may validate once more after Tune's decision: not drawn
        extra = [curve[-1] - 0.05] if status == "ASHA stop" else []
        folder.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"round": i + 1, "step": 2 * (i + 1), "val/answer_loss": v}) + "\n"
            for i, v in enumerate(curve + extra)))
        rows.append({"trial": trial, "best": min(curve), "rounds": rounds, "status": status,
                     "label_accuracy": 0.5, "inner.steps": steps, "inner.lr_init": lr,
                     "test": dict(TEST) if trial == "t2" else None})
    (root / "sweep_summary.json").write_text(json.dumps({
        "table": "trial  inner.steps  ...\nt2     4            ...", "best_trial": "t2", "best_value": 0.7,
        "best_test": TEST, "trials": rows}))
    return root
