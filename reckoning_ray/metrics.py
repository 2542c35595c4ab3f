"""Evaluation metrics: label accuracy (normalised exact match), knowledge recall, per-hop summaries.

Generated text is read by ``Encoder.parse_generation`` (label = text before "because"); the label
and fact normalisations are the ones of ``reckoning_ray.data.encode`` so that gold and generated
text are compared in one canonical form ("Bob is red." == "bob is red .").
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

from .data.encode import normalize_fact, normalize_label

__all__ = ["fact_recall", "label_accuracy", "normalize_fact", "normalize_label", "summarize"]


def label_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Share of predictions equal to the gold label after :func:`normalize_label` (0.0 for no tasks)."""
    if len(preds) != len(golds):
        raise ValueError(f"label_accuracy: {len(preds)} predictions for {len(golds)} gold labels")
    if not golds:
        return 0.0
    return sum(normalize_label(p) == normalize_label(g) for p, g in zip(preds, golds)) / len(golds)


def fact_recall(generated: Iterable[str], gold: Iterable[str]) -> float:
    """Share of the generated facts that are gold facts (compared after :func:`normalize_fact`).

    A generation without facts scores 1.0 when the task has no gold facts (nothing to recall, e.g.
    a "none" answer) and 0.0 otherwise.
    """
    generated = [normalize_fact(f) for f in generated if normalize_fact(f)]
    gold_set = {normalize_fact(f) for f in gold}
    if not generated:
        return 0.0 if gold_set else 1.0
    return sum(f in gold_set for f in generated) / len(generated)


def _mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


def summarize(eval_outputs: dict[str, list]) -> dict[str, float]:
    """Aggregate per-task evaluation lists (``ReckoningMethod.evaluate`` output, possibly
    concatenated over batches) into metrics.

    Returns "label_accuracy", "answer_loss", "recall" (means over tasks), "tasks" (count) and, per
    hop count k present, "label_accuracy/hops_{k}" and "answer_loss/hops_{k}".
    """
    correct = [bool(c) for c in eval_outputs.get("label_correct", [])]
    n = len(correct)
    for key in ("answer_loss", "recall", "hops"):
        if key in eval_outputs and len(eval_outputs[key]) != n:
            raise ValueError(f"summarize: {key!r} has {len(eval_outputs[key])} entries for {n} tasks")
    out: dict[str, float] = {
        "label_accuracy": sum(correct) / n if n else 0.0,
        "answer_loss": _mean(eval_outputs.get("answer_loss", [])),
        "recall": _mean(eval_outputs.get("recall", [])),
        "tasks": float(n),
    }
    by_hops: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(eval_outputs.get("hops", [])):
        by_hops[int(h)].append(i)
    losses = eval_outputs.get("answer_loss", [])
    for h in sorted(by_hops):
        index = by_hops[h]
        out[f"label_accuracy/hops_{h}"] = sum(correct[i] for i in index) / len(index)
        if losses:
            out[f"answer_loss/hops_{h}"] = _mean([losses[i] for i in index])
    return out
