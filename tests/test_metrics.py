"""Metrics: normalised label accuracy, knowledge recall, per-hop summaries."""

from __future__ import annotations

import math

import pytest

from reckoning_ray.core.metrics import fact_recall, label_accuracy, summarize
from reckoning_ray.core.data.encode import normalize_label


def test_label_accuracy_is_normalised_exact_match():
    preds = ["Yes.", " no ", "yes because bob is red", "son - in - law", "none"]
    golds = ["yes", "no", "yes", "son-in-law", "no"]
    # "yes because ..." is not a label: the caller cuts at "because" before comparing.
    assert label_accuracy(preds, golds) == pytest.approx(3 / 5)
    assert normalize_label("Son-in-law!") == normalize_label("son - in - law") == "son-in-law"
    assert label_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        label_accuracy(["yes", "no"], ["yes"])


def test_fact_recall_counts_generated_facts_found_in_the_gold_facts():
    gold = ["bob is red .", "if someone is red then they are big ."]
    assert fact_recall(["Bob is red.", "If someone is red then they are big."], gold) == 1.0
    assert fact_recall(["bob is red .", "anne is red ."], gold) == 0.5
    assert fact_recall(["anne is red ."], gold) == 0.0
    assert fact_recall([], gold) == 0.0  # nothing recalled
    assert fact_recall([], []) == 1.0  # nothing to recall (e.g. a "none" answer)


def test_summarize_gives_overall_and_per_hop_metrics():
    outputs = {
        "hops": [0, 0, 1, 1, 1, 3],
        "label_correct": [True, False, True, True, False, True],
        "answer_loss": [0.5, 1.5, 0.2, 0.4, 0.6, 2.0],
        "recall": [1.0, 0.0, 0.5, 0.5, float("nan"), 1.0],
    }
    out = summarize(outputs)
    assert out["label_accuracy"] == pytest.approx(4 / 6)
    assert out["answer_loss"] == pytest.approx(5.2 / 6)
    assert out["recall"] == pytest.approx(3.0 / 5)  # NaN entries are left out
    assert out["tasks"] == 6.0
    assert out["label_accuracy/hops_0"] == 0.5
    assert out["label_accuracy/hops_1"] == pytest.approx(2 / 3)
    assert out["label_accuracy/hops_3"] == 1.0
    assert out["answer_loss/hops_1"] == pytest.approx(0.4)
    assert "label_accuracy/hops_2" not in out


def test_summarize_rejects_lists_of_different_lengths_and_handles_no_tasks():
    with pytest.raises(ValueError, match="'answer_loss' has 1 entries for 2 tasks"):
        summarize({"label_correct": [True, False], "answer_loss": [0.1], "hops": [0, 0]})
    empty = summarize({"label_correct": [], "answer_loss": [], "recall": [], "hops": []})
    assert empty["label_accuracy"] == 0.0 and empty["tasks"] == 0.0 and math.isnan(empty["answer_loss"])
