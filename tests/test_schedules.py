"""Outer learning-rate schedules (reckoning_ray/schedules.py) and extendable warmup-stable-decay runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ONE_FACT
from reckoning_ray.core.checkpoint import checkpoint_path, read_record
from reckoning_ray.core.schedules import LrSchedule
from reckoning_ray.train import main as train_main


def test_linear_is_transformers_linear_schedule_and_wsd_is_flat_then_cools_down():
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, 3, 20).lr_lambdas[0]
    ours = LrSchedule("linear", 20, 3)
    assert [ours(s) for s in range(25)] == [reference(s) for s in range(25)]
    wsd = LrSchedule("wsd", 20, 2, cooldown_fraction=0.25)
    assert wsd.cooldown_start == 15
    assert [wsd(s) for s in range(20)] == [0.0, 0.5] + [1.0] * 13 + [1.0, 0.8, 0.6, 0.4, 0.2]
    wsd.extend_to(40)  # the same warmup, the cooldown at the new end
    assert wsd.cooldown_start == 30 and [wsd(s) for s in (1, 15, 29, 30, 39)] == [0.5, 1.0, 1.0, 1.0, 0.1]
    cosine = LrSchedule("cosine", 10, 0)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)


RUN = ["embedded", "resources.num_workers=0", "tracking.mode=disabled", "train.patience=0", *ONE_FACT,
       "model.dtype=float64", "data.num_train=64", "data.num_validation=16", "data.num_test=16",
       "train.validations_per_epoch=2", "train.epochs=20", "outer.schedule=wsd", "outer.cooldown_fraction=0.25"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def test_a_wsd_run_extended_from_its_cooldown_start_is_the_longer_run_exactly(tmp_path):
    # 8 steps: warmup 2, constant to step 6, cooldown 6 -> 8; then extended to 16
    assert train_main(RUN + ["train.max_steps=8", "outer.warmup_ratio=0.25", f"train.output_dir={tmp_path}",
                             "train.run_name=short"]) == 0
    short = tmp_path / "short"
    record = read_record(short)
    assert record["stable"] == "step-000006" and record["planned_steps"] == 8
    assert (checkpoint_path(short, "stable") / "trainer_state.pt").is_file()
    assert [r["step"] for r in _rows(short)] == list(range(1, 9))

    assert train_main(["--resume", str(short), "--extend-to", "16"]) == 0
    # the same run planned for 16 steps from the start: warmup 2 (0.125 x 16), cooldown 12 -> 16
    assert train_main(RUN + ["train.max_steps=16", "outer.warmup_ratio=0.125", f"train.output_dir={tmp_path}",
                             "train.run_name=long"]) == 0
    long = tmp_path / "long"
    extended, fresh = _rows(short), _rows(long)
    assert [r["step"] for r in extended] == [r["step"] for r in fresh] == list(range(1, 17))
    for a, b in zip(extended, fresh):  # float64 on the CPU: the very same numbers
        assert a["val/answer_loss"] == b["val/answer_loss"] and a["train/loss"] == b["train/loss"], (a, b)
    wa, wb = _weights(checkpoint_path(short, "latest")), _weights(checkpoint_path(long, "latest"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    # the first cooldown's validations are set aside, and the stable state moved to the new cooldown
    aside = [json.loads(line) for line in (short / "metrics.cooldown-000008.jsonl").read_text().splitlines()]
    assert [r["step"] for r in aside] == [7, 8]
    assert read_record(short)["stable"] == "step-000012" and read_record(short)["planned_steps"] == 16
    summary = json.loads((short / "summary.json").read_text())
    assert summary["steps"] == 16 and "test" in summary


def test_extend_to_refuses_runs_that_cannot_extend(tmp_path, capsys):
    assert train_main(RUN + ["train.max_steps=4", "outer.schedule=linear", f"train.output_dir={tmp_path}",
                             "train.run_name=lin"]) == 0
    assert train_main(["--resume", str(tmp_path / "lin"), "--extend-to", "8"]) == 2
    assert "outer.schedule=wsd" in capsys.readouterr().err
    assert train_main(RUN + ["train.max_steps=4", f"train.output_dir={tmp_path}", "train.run_name=w"]) == 0
    assert train_main(["--resume", str(tmp_path / "w"), "--extend-to", "4"]) == 2
    assert "planned for 4 steps" in capsys.readouterr().err
    assert train_main(RUN + ["--extend-to", "8"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_validation_rounds_and_steps_agree_with_the_planned_validations():
    from reckoning_ray.core.schema import TrainConfig
    from reckoning_ray.core.plan import planned_validations, steps_for_validations, validations_through

    for tasks, batch, per_epoch in [(64, 8, 2), (100, 16, 3), (10, 4, 1), (30, 4, 4)]:
        train = TrainConfig(batch_size=batch, grad_accum=1, validations_per_epoch=per_epoch, epochs=50)
        for rounds in range(1, 12):
            steps = steps_for_validations(tasks, train, rounds)
            longer = TrainConfig(batch_size=batch, grad_accum=1, validations_per_epoch=per_epoch, epochs=50,
                                 max_steps=steps)
            assert planned_validations(tasks, longer) == rounds == validations_through(tasks, train, steps)
            # one step before that validation, the run has made one fewer
            assert validations_through(tasks, train, steps - 1) in (rounds - 1, rounds)


def test_an_extended_run_knows_which_rounds_its_hosts_heard_already(tmp_path):
    # Ray Tune and W&B take increasing rounds only: the rounds the extension repeats (after the
    # cooldown's start, up to the earlier end) are the ones they heard of
    from reckoning_ray.core.config import load_config
    from reckoning_ray.core.loop import Hooks
    from reckoning_ray.core.runs import build_loop
    from reckoning_ray.on_ray.trainer import extend

    assert train_main(RUN + ["train.max_steps=8", "train.batch_size=16", f"train.output_dir={tmp_path}",
                             "train.run_name=r"]) == 0
    run_dir = tmp_path / "r"
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]  # 4 steps per epoch, 2 validations each
    cfg = load_config(str(run_dir / "config.yaml"))
    extend(cfg, run_dir, 16, 64)
    loop = build_loop(cfg, run_dir, Hooks(device=torch.device("cpu"), log=lambda m: None))
    # resumed at the stable state (step 6, round 3), the next validation is round 4 again
    assert loop.progress.global_step == 6 and loop.progress.validations == 3 and loop.rounds_heard == 4
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3]
    # a plain resume of the extended run (e.g. a restarted worker) still knows it
    again = build_loop(cfg, run_dir, Hooks(device=torch.device("cpu"), log=lambda m: None))
    assert again.rounds_heard == 4
