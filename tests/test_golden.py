"""Stored-value tests of the embedded preset, run as a user runs it (the CLI, without Ray:
``resources.num_workers=0``): a fixed number of CPU steps must give the stored losses and
accuracies, a run stopped mid-way and continued must reproduce the stored tail, and the best checkpoint
it leaves must answer a question with one command (``python -m reckoning_ray.predict``).

A change that moves these numbers changes the experiment: if it is intended, say why in the
commit and store the new values (run this file with ``GOLDEN_PRINT=1`` to print them).
"""

import json
import os
from pathlib import Path

import pytest

from reckoning_ray.predict import ReckoningModel
from reckoning_ray.predict import main as predict_main
from reckoning_ray.train import main as train_main

STEPS = 8
RUN = [
    # 256 tasks in steps of 32 (the preset's batch): 8 steps, a validation after every 2nd
    "embedded", "resources.num_workers=0", f"train.max_steps={STEPS}", "train.validations_per_epoch=4",
    "data.num_train=256", "data.num_validation=32", "data.num_test=32", "eval.max_tasks=32",
    "tracking.mode=offline", "train.patience=0",
]
# (step, val/answer_loss, val/label_accuracy, val/recall, train/loss) of every validation, and the
# test metrics of the best checkpoint; float32 on a CPU, 1 thread (tests/conftest.py)
GOLDEN = [
    (2, 2.875439926981926, 0.0, 0.0, 3.1266112327575684),
    (4, 2.465342715382576, 0.0, 0.0, 2.7529574632644653),
    (6, 2.271462917327881, 0.0, 0.0, 2.4263312816619873),
    (8, 2.1736706271767616, 0.03125, 0.0, 2.2650136947631836),
]
GOLDEN_TEST = {"test/label_accuracy": 0.0, "test/answer_loss": 2.1926039159297943}


def _rows(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val/answer_loss"], r["val/label_accuracy"], r["val/recall"], r["train/loss"]) for r in rows]


def _check(rows: list[tuple], golden: list[tuple]) -> None:
    assert [r[0] for r in rows] == [g[0] for g in golden]
    for row, gold in zip(rows, golden):
        assert row[1] == pytest.approx(gold[1], rel=1e-4), row
        assert row[2] == pytest.approx(gold[2], abs=1.5 / 32), row  # at most one task flips
        assert row[3] == pytest.approx(gold[3], abs=0.02), row
        assert row[4] == pytest.approx(gold[4], rel=1e-4), row


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_MODE", "offline")
        assert train_main(RUN + [f"train.output_dir={root}", "train.run_name=full"]) == 0
    return root


def test_embedded_steps_give_the_stored_values(golden_run):
    run_dir = golden_run / "full"
    rows = _rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    test = {k: v for k, v in summary["test"].items() if k.startswith("test/")}
    if os.environ.get("GOLDEN_PRINT"):
        print("GOLDEN =", rows)
        print("GOLDEN_TEST =", test)
    assert GOLDEN is not None, "store the printed values (GOLDEN_PRINT=1)"
    _check(rows, GOLDEN)
    assert test["test/answer_loss"] == pytest.approx(GOLDEN_TEST["test/answer_loss"], rel=1e-4)
    assert test["test/label_accuracy"] == pytest.approx(GOLDEN_TEST["test/label_accuracy"], abs=1.5 / 32)
    # the W&B writer logged every validation once, and the record says where
    record = json.loads((run_dir / "wandb_run.json").read_text())
    assert record["steps"] == [r[0] for r in rows] and record["summary"]["test/tasks"] == 32.0


def test_an_interrupted_run_resumes_to_the_stored_tail(golden_run, tmp_path, monkeypatch, capsys):
    """A run that fails after step 5, past the validation at step 4 (validations after every 2nd
    step), is continued by the same command (its train.run_name): from that checkpoint it ends where
    the uninterrupted run does."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = RUN + [f"train.output_dir={tmp_path}", "train.run_name=part"]
    monkeypatch.setenv("RECKONING_RAY_INPUT_ERROR_AT", f"5:{tmp_path / 'failed'}")
    assert train_main(args) == 2
    assert [r[0] for r in _rows(tmp_path / "part")] == [2, 4]
    monkeypatch.delenv("RECKONING_RAY_INPUT_ERROR_AT")
    capsys.readouterr()
    assert train_main(args) == 0
    assert "resumed from" in capsys.readouterr().out
    _check(_rows(tmp_path / "part"), _rows(golden_run / "full"))


def test_predict_answers_from_the_best_checkpoint(golden_run, tmp_path, capsys):
    run_dir = golden_run / "full"
    facts = tmp_path / "facts.txt"
    facts.write_text("# a theory\nAnne is red.\nIf someone is red then they are big.\n")
    code = predict_main([str(run_dir), "--knowledge", str(facts), "--question", "Anne is big.", "--recall"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    model = ReckoningModel.from_pretrained(run_dir)
    answer = model.answer(["Anne is red.", "If someone is red then they are big."], "Anne is big.")
    assert out[0] == answer.label and answer.label  # the command prints what the Python API answers
    assert [line.strip() for line in out[1:]] == [f"recalled: {f}" for f in answer.facts]
    assert model.family == "proofwriter" and model.inner_steps == 1
    # a bad path: one line naming what to pass, exit 2
    assert predict_main([str(tmp_path), "--knowledge", str(facts), "--question", "x"]) == 2
    assert "holds no best checkpoint" in capsys.readouterr().err
