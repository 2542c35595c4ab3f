"""Evaluation metrics: label accuracy (normalised exact match), knowledge recall, per-hop summaries.

Generated text is read by ``Encoder.parse_generation`` (label = text before "because"); the label
and fact normalisations are the ones of ``reckoning_ray.core.data.encode`` so that gold and generated
text are compared in one canonical form ("Bob is red." == "bob is red .").
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from reckoning_ray.core.data.encode import normalize_fact, normalize_label

__all__ = ["fact_recall", "hop_sums", "label_accuracy", "normalize_fact", "normalize_label", "summarize",
           "summarize_sums"]


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


# Per-hop sums, one row per hop count: what workers all-reduce (sums add up across shards).
SUM_COLUMNS = ("tasks", "correct", "answer_loss", "answer_loss_count", "recall", "recall_count")


def hop_sums(eval_outputs: dict[str, list], hops: Sequence[int]) -> torch.Tensor:
    """``[len(hops), 6]`` float64 sums (:data:`SUM_COLUMNS`) of per-task evaluation lists
    (``Method.evaluate`` output, possibly concatenated over batches); ``hops`` lists the hop
    counts to make rows for (every rank of a sharded evaluation passes the same list). NaN losses
    and recalls are left out of their sums and counts."""
    correct = [bool(c) for c in eval_outputs.get("label_correct", [])]
    n = len(correct)
    for key in ("answer_loss", "recall", "hops"):
        if key in eval_outputs and len(eval_outputs[key]) != n:
            raise ValueError(f"summarize: {key!r} has {len(eval_outputs[key])} entries for {n} tasks")
    rows = {int(h): i for i, h in enumerate(hops)}
    sums = torch.zeros(len(rows), len(SUM_COLUMNS), dtype=torch.float64)
    losses, recalls = eval_outputs.get("answer_loss"), eval_outputs.get("recall")
    for i, h in enumerate(eval_outputs.get("hops", [])):
        row = sums[rows[int(h)]]
        row[0] += 1
        row[1] += float(correct[i])
        for column, values in ((2, losses), (4, recalls)):
            if values is not None and not math.isnan(float(values[i])):
                row[column] += float(values[i])
                row[column + 1] += 1
    return sums


def summarize_sums(sums: torch.Tensor, hops: Sequence[int], prefix: str = "", recall: bool = True) -> dict[str, float]:
    """Metrics from :func:`hop_sums` (summed over shards): ``<prefix>/label_accuracy``,
    ``answer_loss``, ``recall`` (means over tasks; left out with ``recall=False``, for runs that
    generate no facts), ``tasks`` and, per hop count present, ``label_accuracy/hops_<k>`` and
    ``answer_loss/hops_<k>``. An empty prefix gives the bare names."""
    key = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)

    def mean(total: torch.Tensor, count: torch.Tensor) -> float:
        return float(total / count) if count > 0 else float("nan")

    total = sums.sum(0)
    out = {
        key("label_accuracy"): float(total[1] / total[0]) if total[0] > 0 else 0.0,
        key("answer_loss"): mean(total[2], total[3]),
        key("tasks"): float(total[0]),
    }
    if recall:
        out[key("recall")] = mean(total[4], total[5])
    for h, row in zip(hops, sums):
        if row[0] > 0:
            out[key(f"label_accuracy/hops_{h}")] = float(row[1] / row[0])
            out[key(f"answer_loss/hops_{h}")] = mean(row[2], row[3])
    return out


def summarize(eval_outputs: dict[str, list], prefix: str = "", recall: bool = True) -> dict[str, float]:
    """Metrics of per-task evaluation lists in one process (:func:`summarize_sums` of
    :func:`hop_sums`)."""
    hops = sorted({int(h) for h in eval_outputs.get("hops", [])})
    return summarize_sums(hop_sums(eval_outputs, hops), hops, prefix, recall)
