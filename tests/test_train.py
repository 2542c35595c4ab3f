"""Ray Train: data-parallel equivalence, worker-crash recovery, input errors that are not retried
and the paper presets (a stopped run continued by its command: tests/test_golden.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_FACT
from reckoning_ray.core.checkpoint import checkpoint_path
from reckoning_ray.core.config import load_config
from reckoning_ray.train import main, run

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE = [
    "data.num_train=48", "data.num_validation=16", "data.num_test=8",
    "train.batch_size=4", "train.grad_accum=1", "train.epochs=1", "train.patience=0",
    "model.dtype=float64", "tracking.mode=disabled", "resources.max_failures=0", *ONE_FACT,
]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from reckoning_ray.on_ray.trainer import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = checkpoint_path(run_dir, "latest")
    state = load_file(str(latest / "model.safetensors"))
    state.update(load_file(str(latest / "meta_parameters.safetensors")))  # the learned inner rates
    return state


def assert_same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One worker, 4 tasks per step, uninterrupted: 12 steps, validations after steps 6 and 12."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, BASE + [f"train.output_dir={out}", "train.run_name=one-worker"])
    summary = run(cfg)
    return out, summary


def test_one_run_leaves_its_files_and_two_validations(reference):
    out, summary = reference
    run_dir = out / "one-worker"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints.json"):
        assert (run_dir / name).exists(), name
    rows = metrics(run_dir)
    # one record: Ray keeps no checkpoint copies of its own; the run keeps its latest and its best
    assert not list(run_dir.glob("checkpoint_*")) and len(list((run_dir / "checkpoints").iterdir())) <= 2
    assert [r["step"] for r in rows] == [6, 12]
    assert summary["validations"] == 2
    assert "val/label_accuracy/hops_0" in summary["best_validation"]
    # the reported number: the best checkpoint on the test split (8 tasks)
    test = json.loads((run_dir / "summary.json").read_text())["test"]
    assert test["test/tasks"] == 8 and test["checkpoint"] == "best"
    assert "test/label_accuracy/hops_0" in test


def test_evaluate_command_reproduces_the_recorded_test_metrics(reference, capsys):
    from reckoning_ray.evaluate import main as evaluate_main

    out, _ = reference
    run_dir = out / "one-worker"
    recorded = json.loads((run_dir / "summary.json").read_text())["test"]
    assert evaluate_main([str(run_dir)]) == 0
    assert f"test label_accuracy {recorded['test/label_accuracy']:.3f}" in capsys.readouterr().out
    again = json.loads((run_dir / "summary.json").read_text())["test"]
    assert again["test/answer_loss"] == pytest.approx(recorded["test/answer_loss"], rel=1e-12)
    assert evaluate_main([str(out / "no-such-run")]) == 2
    assert "not a run directory" in capsys.readouterr().err




def test_two_workers_one_killed_restart_and_match_one_worker(reference, tmp_path, monkeypatch):
    """Two workers split the same global batch, rank 0 dies abruptly at step 7 (as a node lost
    mid-step), Ray Train restarts the group from the step-6 checkpoint, and the run ends where the
    uninterrupted one-worker run ends."""
    out, _ = reference
    marker = tmp_path / "crashed"
    monkeypatch.setenv("RECKONING_RAY_CRASH_AT", f"7:{marker}")
    cfg = load_config(None, BASE + [f"train.output_dir={out}", "train.run_name=two-workers",
                                    "resources.num_workers=2", "resources.max_failures=1"])
    assert cfg.train.batch_size * cfg.train.grad_accum == 4  # the same tasks per step as one worker
    summary = run(cfg)
    assert marker.exists()  # the worker really died at step 7
    assert summary["steps"] == 12
    assert [r["step"] for r in metrics(out / "two-workers")] == [6, 12]  # the same steps, each round once
    assert_same(final_state(out / "two-workers"), final_state(out / "one-worker"), rtol=1e-9, atol=1e-11)
    a, b = metrics(out / "one-worker"), metrics(out / "two-workers")
    for ra, rb in zip(a, b):
        assert ra["val/answer_loss"] == pytest.approx(rb["val/answer_loss"], rel=1e-9)
        assert ra["val/label_accuracy"] == rb["val/label_accuracy"]


def test_cli_help_and_bad_override():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    help_text = subprocess.run([sys.executable, "-m", "reckoning_ray.train", "--help"], capture_output=True,
                               text=True, env=env, check=True).stdout
    assert "embedded" in help_text and "paper" in help_text and "key=value" in help_text
    assert main(["embedded", "train.epochs=0"]) == 2


def test_more_workers_than_a_step_has_tasks_is_a_config_error(capsys):
    # 3 tasks per step split over 2 workers is fine (one takes 2, tests/test_loop.py); 4 workers are not
    assert main(["train.batch_size=3", "train.grad_accum=1", "resources.num_workers=4"]) == 2
    err = capsys.readouterr().err
    assert "resources.num_workers=4 is invalid" in err and "3 tasks of an optimizer step" in err
    assert main(["train.batch_size=2", "train.grad_accum=2", "resources.max_workers=5"]) == 2
    assert "resources.max_workers=5 is invalid" in capsys.readouterr().err
    assert main(["resources.num_workers=2", "resources.max_workers=1"]) == 2
    assert "resources.max_workers=1 is invalid: an elastic run grows from" in capsys.readouterr().err


def test_bad_override_fails_before_any_work(capsys):
    assert main(["train.batch_size=0"]) == 2
    assert "train.batch_size=0 is invalid: must be >= 1" in capsys.readouterr().err


def test_an_input_error_in_a_worker_is_not_retried(reference, tmp_path, monkeypatch, capsys):
    """A worker that raises a config error ends the run at once (exit 2, one line), although
    resources.max_failures would allow restarts; a crash is restarted (the two-worker test)."""
    out, _ = reference
    marker = tmp_path / "attempts"
    monkeypatch.setenv("RECKONING_RAY_INPUT_ERROR_AT", f"2:{marker}")
    code = main(BASE + [f"train.output_dir={out}", "train.run_name=input-error", "resources.max_failures=2"])
    assert code == 2
    assert marker.read_text().splitlines() == ["input error at step 2"]  # one attempt, no restart
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: ConfigError: RECKONING_RAY_INPUT_ERROR_AT: an input error at step 2"


def test_an_impossible_resource_request_fails_at_once(ray_local, capsys):
    assert main(BASE + ["resources.num_workers=8", "train.batch_size=8"]) == 2
    assert "resources.num_workers=8 x resources.cpus_per_worker=1.0 needs 8 CPUs" in capsys.readouterr().err
