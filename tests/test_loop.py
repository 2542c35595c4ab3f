"""The framework-free loop: validation schedule, early stopping, checkpoints and exact resume."""

import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CodeOnUnpickle
from reckoning_ray.core.checkpoint import checkpoint_path
from reckoning_ray.core.config import group, load_config, save_config
from reckoning_ray.core.loop import Hooks, Loop, allreduce_gradients, global_step_tasks, shard, worker_tasks
from reckoning_ray.core.plan import validation_points
from reckoning_ray.core.runs import prepare

SMALL = [
    "data.num_train=96", "data.num_validation=32", "data.num_test=8",
    "train.batch_size=16", "train.grad_accum=1", "train.epochs=2", "tracking.mode=disabled",
]


def make_loop(tmp_path: Path, overrides: list[str], name: str = "run", resume_from=None, progress: bool = False,
              log=lambda m: None) -> Loop:
    cfg = load_config(None, SMALL + overrides)
    method, tokenizer, encoder, splits = prepare(cfg)
    hooks = Hooks(log=log, resume_from=resume_from, progress=progress)
    save_config(cfg, tmp_path / name / "config.yaml")
    return Loop(group(cfg, "train"), group(cfg, "outer"), group(cfg, "eval"), method, tokenizer, encoder,
                splits["train"], splits["validation"], tmp_path / name, hooks)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_validation_points_are_middle_and_end():
    assert validation_points(6, 2) == [3, 6]
    assert validation_points(7, 2) == [4, 7]
    assert validation_points(1, 2) == [1]
    assert validation_points(10, 1) == [10]


def test_shards_cover_every_task_once_even_when_uneven():
    micro = list(range(7))
    parts = [shard(micro, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard([0], 1, 2) == []


def test_last_global_step_keeps_the_remainder():
    cfg = load_config(None, SMALL + ["train.batch_size=4", "train.grad_accum=2"])
    order = list(range(10))
    assert global_step_tasks(order, 0, cfg.train) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert global_step_tasks(order, 1, cfg.train) == [[8, 9]]


def test_bucketed_allreduce_sums_every_gradient_once():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(5))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    calls = []

    def double(t: torch.Tensor) -> None:  # a 2-worker SUM where both hold the same gradient
        calls.append(t.numel())
        t.mul_(2)

    allreduce_gradients(params, double, bucket_bytes=4 * 7)
    assert [float(p.grad.flatten()[0]) for p in params] == [2.0, 4.0, 6.0]
    assert calls == [7, 5]  # two buckets, not one call per tensor


def test_two_validations_per_epoch_and_files_written(tmp_path):
    loop = make_loop(tmp_path, [])
    summary = loop.fit()
    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    assert len(metrics) == 4  # 2 epochs x 2 validations
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert [m["epoch"] for m in metrics] == [0.5, 1.0, 1.5, 2.0]
    for name in ("config.yaml", "summary.json", "checkpoints.json"):
        assert (run_dir / name).exists(), name
    record = json.loads((run_dir / "checkpoints.json").read_text())
    best_step = max(metrics, key=lambda m: m["val/label_accuracy"])["step"]  # the first of equal values
    assert record["latest"] == "step-000012" and record["best"] == f"step-{best_step:06d}"
    assert record["best_metric"] == summary["best_metric"] and summary["best_checkpoint"].endswith(record["best"])
    # only the latest and the best are kept, one copy each, each a complete model
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == sorted({record["latest"], record["best"]})
    for name in kept:
        for f in ("config.json", "model.safetensors", "tokenizer.json", "reckoning.json",
                  "meta_parameters.safetensors"):
            assert (run_dir / "checkpoints" / name / f).is_file(), (name, f)
        # the outer optimizer's state is kept for resuming, so only in the latest
        assert (run_dir / "checkpoints" / name / "trainer_state.pt").is_file() == (name == record["latest"])
    assert summary["validations"] == 4
    assert "val/label_accuracy" in metrics[0] and "inner_lr/median" in metrics[0]


def test_early_stopping_stops_when_patience_runs_out(tmp_path):
    # no learning at all: the metric never improves after the first validation
    loop = make_loop(tmp_path, ["outer.lr=1e-12", "outer.inner_lr_lr=0", "train.patience=2", "train.epochs=5"])
    summary = loop.fit()
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3  # best at round 1, then 2 validations without improvement
    assert summary["stopped_early"] is True
    assert summary["best_step"] == metrics[0]["step"]


def test_resume_continues_exactly(tmp_path):
    overrides = ["model.dtype=float64"]
    full = make_loop(tmp_path, overrides, "full")
    full.fit()
    # an interrupted run: killed during step 4, after the first validation (step 3)
    part = make_loop(tmp_path, overrides, "part")
    part.hooks.on_step = _stop_at(4)  # after the checkpoint of the validation at step 3
    with pytest.raises(_Stop):
        part.fit()
    resumed = make_loop(tmp_path, overrides, "part", resume_from=checkpoint_path(tmp_path / "part"))
    assert resumed.progress.global_step == 3
    resumed.fit()
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [m["round"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["val/answer_loss"] == pytest.approx(mb["val/answer_loss"], rel=1e-9, abs=1e-12)
        assert ma["train/loss"] == pytest.approx(mb["train/loss"], rel=1e-9, abs=1e-12)
    sa = full.method.model.state_dict()
    sb = resumed.method.model.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full.method.inner_lrs, resumed.method.inner_lrs, rtol=1e-10, atol=1e-12)


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def hook(global_step: int) -> None:
        if global_step == step:
            raise _Stop()

    return hook


def test_recall_is_absent_without_the_multi_task_target_and_present_with_it(tmp_path):
    label_only = make_loop(tmp_path, ["outer.multi_task=false", "train.epochs=1"], "label-only")
    metrics = label_only.evaluate(label_only.val_records)
    assert "val/recall" not in metrics and "val/label_accuracy" in metrics
    multi = make_loop(tmp_path, ["outer.multi_task=true", "train.epochs=1"], "multi")
    assert 0.0 <= multi.evaluate(multi.val_records)["val/recall"] <= 1.0


def test_the_global_batch_is_split_by_the_workers(tmp_path):
    # batch_size x grad_accum tasks per step whatever the worker count; each worker takes its share
    # of the step, in chunks of at most batch_size tasks
    cfg = load_config(None, SMALL + ["train.batch_size=4", "train.grad_accum=2", "resources.num_workers=2"])
    micro = global_step_tasks(list(range(16)), 0, cfg.train)
    assert micro == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert worker_tasks(micro, 0, 1, 4) == micro
    assert [worker_tasks(micro, r, 2, 4) for r in range(2)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert [worker_tasks(micro, r, 3, 4) for r in range(3)] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7]]]
    assert worker_tasks([[0, 1]], 2, 3, 4) == []  # a worker the step has no task for


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_the_meta_gradient_of_any_worker_count_is_the_one_workers(tmp_path, workers):
    # 2 x 2 = 4 tasks per step (the paper's batch): 3 workers take 2, 1 and 1 tasks. The workers'
    # gradients, summed as the all-reduce sums them, are the one-worker gradient of the same step
    # (dropout off: its masks are drawn per worker), weights and learned inner rates alike. Clipping
    # acts on the summed gradient, after the all-reduce: off here, where each part is taken alone.
    overrides = ["train.batch_size=2", "train.grad_accum=2", "model.dropout=0.0", "outer.clip=0"]

    def step_gradients(rank: int, world: int) -> dict[str, torch.Tensor]:
        loop = make_loop(tmp_path, overrides, name=f"w{world}-r{rank}")
        loop.hooks.rank, loop.hooks.world_size = rank, world
        loop.optimizer.step = lambda: None  # keep the weights: the gradient is what is compared
        loop._train_step(list(range(len(loop.train_records))), 0)
        return {str(i): p.grad.clone() for i, p in enumerate(loop.method.meta_parameters())}

    one = step_gradients(0, 1)
    parts = [step_gradients(r, workers) for r in range(workers)]
    assert any(float(g.abs().sum()) > 0 for g in one.values())
    for name, grad in one.items():
        summed = sum(part[name] for part in parts)
        torch.testing.assert_close(summed, grad, rtol=1e-5, atol=1e-7, msg=name)


# -- the progress bar --------------------------------------------------------------------------------
# SMALL with one epoch: 96 tasks, 16 per step -> 6 optimizer steps, validations after steps 3 and 6.
ONE_EPOCH = ["train.epochs=1", "eval.max_new_tokens=4"]


def bar_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if "run epoch" in line]  # (splitlines would split at "\r")


def test_progress_bar_off_prints_nothing_and_on_resume_starts_at_the_resumed_step(tmp_path, capsys):
    part = make_loop(tmp_path, ONE_EPOCH)  # progress=False
    part.hooks.on_step = _stop_at(4)  # killed after the checkpoint of the validation at step 3
    with pytest.raises(_Stop):
        part.fit()
    err = capsys.readouterr().err
    # (transformers' own "Writing model shards" bars may be there: the Ray worker switches those off)
    assert not bar_lines(err) and "tasks/s" not in err

    resumed = make_loop(tmp_path, ONE_EPOCH, resume_from=checkpoint_path(tmp_path / "run"), progress=True)
    resumed.fit()
    lines = bar_lines(capsys.readouterr().err)
    assert re.search(r"\| 3/6 steps \[", lines[0]), lines  # the run's position, not this process's
    assert re.search(r"\| 6/6 steps \[", lines[-1]), lines


def test_progress_bar_counts_optimizer_steps_to_the_total_with_tasks_per_second(tmp_path, capsys):
    loop = make_loop(tmp_path, ONE_EPOCH, progress=True)
    step_seconds = []
    train_step = loop._train_step

    def timed_step(*args):
        t = time.perf_counter()
        out = train_step(*args)
        step_seconds.append(time.perf_counter() - t)
        return out

    loop._train_step = timed_step
    t0 = time.perf_counter()
    loop.fit()
    elapsed = time.perf_counter() - t0
    lines = bar_lines(capsys.readouterr().err)  # pytest's capture is not a terminal, like Ray's logs
    assert re.search(r"\| 0/6 steps \[", lines[0]) and re.search(r"\| 6/6 steps \[", lines[-1]), lines
    assert "100%" in lines[-1]
    rate = float(re.search(r"([0-9.]+) tasks/s", lines[-1]).group(1))
    # 96 tasks over the time of the 6 optimizer steps only (not the set-up and the validations)
    assert len(step_seconds) == 6
    assert rate == pytest.approx(96 / sum(step_seconds), rel=0.05), (rate, step_seconds, elapsed)
    assert re.search(r"loss [0-9]+\.[0-9]{4}", lines[-1])
    # off a terminal: whole lines only, at most one every 30 s besides the first and the last
    assert all("\r" not in line for line in lines)
    assert len(lines) <= 2 + elapsed // 30, lines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_steps_aside_for_the_validation_lines(tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    loop = make_loop(tmp_path, ONE_EPOCH, progress=True, log=lambda m: term.write(m + "\n"))
    loop.fit()
    text = term.getvalue()
    segments = [s for s in text.split("\n") if "[validate" in s]
    assert len(segments) == 2
    for segment in segments:
        before, line = segment.split("\r")[-2:]
        assert line.startswith("[validate"), segment  # not glued to the end of a bar
        assert before.strip() == "", segment  # the bar was blanked out first
    redraws = [c for c in text.replace("\n", "\r").split("\r") if c.strip()]
    assert re.search(r"\| 6/6 steps \[", redraws[-1]), redraws[-1]  # redrawn below, and finished



def test_a_crafted_trainer_state_is_refused_and_never_runs(tmp_path):
    from reckoning_ray.core.checkpoint import TRAINER_STATE, CheckpointError, load_trainer_state

    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "step-000003"
    checkpoint.mkdir()
    torch.save({"optimizer": {}, "payload": CodeOnUnpickle(marker)}, checkpoint / TRAINER_STATE)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is not a trainer state this project wrote"):
        load_trainer_state(checkpoint)
    assert not marker.exists()
    # what the loop writes loads as data only (the exact resume above goes through it too)
    (checkpoint / TRAINER_STATE).unlink()
    from reckoning_ray.core.loop import _rng_state

    torch.save({"rng": _rng_state(), "history": [{"round": 1}]}, checkpoint / TRAINER_STATE)
    assert load_trainer_state(checkpoint)["history"] == [{"round": 1}]


# -- checkpoints that survive their own writing --------------------------------------------------

def _two_checkpoint_run(output_dir: Path, name: str = "r") -> list[str]:
    """A run with checkpoints at steps 1 and 2 (the embedded model, one-fact tasks, no Ray)."""
    from conftest import ONE_FACT

    return ["embedded", "resources.num_workers=0", "tracking.mode=disabled", "train.patience=0", *ONE_FACT,
            "data.num_train=64", "data.num_validation=16", "data.num_test=8", "train.batch_size=32",
            "train.epochs=1", "train.validations_per_epoch=2", f"train.output_dir={output_dir}",
            f"train.run_name={name}"]


def test_resume_skips_a_write_cut_short_and_refuses_a_damaged_latest(tmp_path, capsys):
    from reckoning_ray.core.checkpoint import CHECKPOINTS, read_record
    from reckoning_ray.train import main as train_main

    args = _two_checkpoint_run(tmp_path)
    assert train_main(args) == 0
    run_dir = tmp_path / "r"
    latest = run_dir / CHECKPOINTS / read_record(run_dir)["latest"]
    # a SIGKILL during a checkpoint write leaves its temporary directory: skipped, named, removed
    partial = run_dir / CHECKPOINTS / "step-000003.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    # the validation's row went to metrics.jsonl before its checkpoint did (a node lost in between)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    cut = dict(json.loads(rows[-1]), step=3, round=len(rows) + 1)
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows) + json.dumps(cut) + "\n")
    capsys.readouterr()
    assert train_main(args + ["train.epochs=2"]) == 0  # continues from step 2 to step 4
    out = capsys.readouterr().out
    assert f"skipping {partial}: a checkpoint write cut short" in out and f"resumed from {latest}" in out
    assert not partial.exists() and read_record(run_dir)["latest"] == "step-000004"
    assert "1 row(s) after step 2 dropped" in out
    after = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in after] == list(range(1, len(after) + 1)) and after[-1]["step"] == 4  # each once
    # a truncated model in the latest checkpoint, and no older one that resumes: one line naming the file
    latest = run_dir / CHECKPOINTS / "step-000004"
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    assert train_main(args + ["train.epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{latest}: model.safetensors is damaged" in err[0], err
    # a missing meta-parameters file is named the same way
    model.unlink()
    (latest / "meta_parameters.safetensors").unlink()
    assert train_main(args + ["train.epochs=3"]) == 2
    assert f"{latest}: model.safetensors is missing" in capsys.readouterr().err


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    import shutil
    import subprocess

    from reckoning_ray.core.checkpoint import CHECKPOINTS, checkpoint_problem, read_record
    from reckoning_ray.train import main as train_main

    # the size of one checkpoint of this run, measured on the ordinary disk
    assert train_main(_two_checkpoint_run(tmp_path / "sizing")) == 0
    one = sum(f.stat().st_size for f in (tmp_path / "sizing" / "r" / CHECKPOINTS).rglob("*") if f.is_file())
    disk = tmp_path / "small-disk"
    disk.mkdir()
    size_kb = int(one * 1.5) // 1024  # room for one checkpoint, not for the next beside it
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        capsys.readouterr()
        assert train_main(_two_checkpoint_run(disk)) == 2
        err = capsys.readouterr().err.strip().splitlines()  # the progress bars, then the error
        errors = [line for line in err if line.startswith("error:")]
        assert errors == [err[-1]], err
        assert "no space left to write checkpoint" in err[-1] and "step-000001 (intact)" in err[-1], err[-1]
        run_dir = disk / "r"
        assert read_record(run_dir)["latest"] == "step-000001"
        assert checkpoint_problem(run_dir / CHECKPOINTS / "step-000001") is None
        assert not list((run_dir / CHECKPOINTS).glob("*.tmp"))  # the partial write is gone
        # with room again, the rerun resumes from it and finishes
        shutil.copytree(run_dir, tmp_path / "moved" / "r")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert train_main(_two_checkpoint_run(tmp_path / "moved")) == 0
    assert read_record(tmp_path / "moved" / "r")["latest"] == "step-000002"


def test_a_damaged_latest_falls_back_to_the_stable_checkpoint_of_a_wsd_run(tmp_path, capsys):
    from reckoning_ray.core.checkpoint import CHECKPOINTS, read_record
    from reckoning_ray.train import main as train_main

    # 4 steps, validated after each 2nd; the cooldown starts at step 2, whose state is kept ("stable")
    args = _two_checkpoint_run(tmp_path) + ["train.epochs=2", "outer.schedule=wsd", "outer.cooldown_fraction=0.5",
                                            "outer.warmup_ratio=0"]
    assert train_main(args) == 0
    run_dir = tmp_path / "r"
    record = read_record(run_dir)
    assert (record["latest"], record["stable"]) == ("step-000004", "step-000002")
    latest = run_dir / CHECKPOINTS / "step-000004"
    (latest / "meta_parameters.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    assert train_main(args + ["train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {latest}: meta_parameters.safetensors is damaged" in out
    assert f"resumed from {run_dir / CHECKPOINTS / 'step-000002'}" in out
    assert read_record(run_dir)["latest"] == "step-000006"
