"""Test-split evaluation of a trained run: the number a paper reports.

Validation only selects (early stopping, the best checkpoint, ASHA); the reported result is the
test accuracy of the checkpoint chosen on validation. :class:`Evaluator` evaluates checkpoints of
one config on a split; :func:`evaluate_run` a run directory's best (or latest) checkpoint on the
test split; :func:`evaluate_best` the same at the end of a training run. The metrics are label
accuracy overall and per hop, answer loss and, for runs trained on the multi-task target,
knowledge recall (``test/...`` keys); :func:`save_test` writes them into the run's
``summary.json`` (key ``"test"``), and ``reckoning_ray.tracking.writer.record_test`` also into
the run's W&B summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from reckoning_ray.core.card import refresh_cards
from reckoning_ray.core.checkpoint import CheckpointError, is_checkpoint, resolve
from reckoning_ray.core.config import load_config

SPLITS = ("test", "validation")


class Evaluator:
    """A checkpoint's method with ``cfg``'s data and encoder, built once and evaluated on any
    split; other weights can be loaded into it (``load``: the model soups)."""

    def __init__(self, cfg: DictConfig, checkpoint: str | Path, device: Optional[Any] = None) -> None:
        # heavy: imported here to keep torch off this module's import
        from reckoning_ray.core.runs import prepare

        checkpoint = Path(checkpoint)
        if not is_checkpoint(checkpoint):
            raise CheckpointError(f"{checkpoint} is not a checkpoint directory (expected config.json and "
                                  "reckoning.json)")
        self.cfg = cfg
        self.method, _, self.encoder, self.splits = prepare(cfg, checkpoint)
        if device is not None:
            self.method.to(device)

    def load(self, weights: dict[str, Any], meta_parameters: dict[str, Any]) -> None:
        self.method.model.load_state_dict(weights)
        self.method.load_extra_state(meta_parameters)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        import torch

        # heavy: imported here to keep numpy, torch off this module's import
        from reckoning_ray.core.loop import evaluate_records

        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: choose one of {SPLITS}")
        prefix = "test" if split == "test" else "val"
        with torch.random.fork_rng():  # evaluation draws no randomness, but leave the caller's RNG alone
            return evaluate_records(self.method, self.encoder, self.splits[split], self.cfg.train.batch_size,
                                    self.cfg.outer.multi_task, prefix)


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str | Path, split: str = "test",
                        device: Optional[Any] = None) -> dict[str, float]:
    """Metrics of the checkpoint directory ``checkpoint`` (``reckoning_ray.checkpoint``) on
    ``split`` of ``cfg``'s data, in this process.

    The data is read with the run's own ``data`` config, so the split is the one the run was
    trained beside. Keys: ``<split prefix>/label_accuracy``, ``.../hops_<k>``, ``answer_loss``,
    ``recall`` (multi-task runs only), ``tasks``; the prefix is ``test`` or ``val``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: choose one of {SPLITS}")
    return Evaluator(cfg, checkpoint, device).evaluate(split)



def save_test(run_dir: str | Path, metrics: dict[str, float], checkpoint: str) -> dict[str, Any]:
    """Write test ``metrics`` into ``run_dir/summary.json`` (key ``"test"``); returns the values
    for the run's W&B summary."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["test"] = dict(metrics, checkpoint=checkpoint)
    path.write_text(json.dumps(summary, indent=2))
    refresh_cards(run_dir)  # the checkpoints' model cards now carry the test numbers
    return dict(metrics, **{"test/checkpoint": checkpoint})


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", device: Optional[Any] = None) -> dict[str, float]:
    """Evaluate the run's ``best`` (or ``latest``) checkpoint on the test split with the run's
    saved config and return the metrics (:func:`reckoning_ray.tracking.writer.record_test` records them)."""

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); pass "
                                f"<train.output_dir>/<train.run_name> or a sweep's trials/<trial id>")
    cfg = load_config(str(run_dir / "config.yaml"))
    return evaluate_checkpoint(cfg, resolve(run_dir, checkpoint), "test", device=device)


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: overall accuracy, per hop, recall, answer loss."""
    prefix = next(iter(metrics)).split("/", 1)[0]
    per_hop = " ".join(f"h{k.rsplit('_', 1)[1]}={v:.3f}" for k, v in metrics.items()
                       if k.startswith(f"{prefix}/label_accuracy/hops_"))
    recall = f" recall {metrics[prefix + '/recall']:.3f}" if f"{prefix}/recall" in metrics else ""
    return (f"{prefix} label_accuracy {metrics[prefix + '/label_accuracy']:.3f} ({per_hop}){recall} "
            f"answer_loss {metrics[prefix + '/answer_loss']:.4f} on {int(metrics[prefix + '/tasks'])} tasks")

def evaluate_best(run_dir: Path, device: Any) -> dict[str, Any]:
    """Evaluate the run's best checkpoint (chosen on validation) on the test split: the reported
    number. Writes it into summary.json; returns the W&B summary values."""
    metrics = evaluate_run(run_dir, "best", device=device)
    print(f"[test] best checkpoint: {format_metrics(metrics)}", flush=True)
    return save_test(run_dir, metrics, "best")
