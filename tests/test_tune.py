"""Ray Tune sweep: search-space checks, placement errors, and a real sweep with ASHA, W&B offline
runs, interruption + resume, and a re-run of the best config."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CodeOnUnpickle, ONE_FACT, sweep_command
from reckoning_ray.core.config import load_config
from reckoning_ray.core.errors import ConfigError
from wandb_files import read_offline_run_merged
from reckoning_ray.core.spaces import load_space
from reckoning_ray.on_ray.report import PICTURES, sweep_data
from huggingface_hub import ModelCard

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_spaces_load():
    cfg = load_config()
    assert set(load_space("embedded", cfg)) == {"inner.steps", "inner.lr_init", "outer.lr"}
    assert load_space("default", cfg)["inner.lr_init"] == ("loguniform", [1e-5, 1e-4])
    assert load_space("paper", cfg)["inner.steps"] == ("grid", [4, 5])


@pytest.mark.parametrize(
    "text, words",
    [
        ("inner.stepz: {choice: [1, 2]}\n", ["inner.stepz", "not a config key"]),
        ("inner.steps: {gaussian: [1, 2]}\n", ["inner.steps", "unknown distribution 'gaussian'", "loguniform"]),
        ("inner.lr_init: {loguniform: [0, 1]}\n", ["inner.lr_init", "low > 0"]),
        ("inner.lr_init: {uniform: [1, 0.1]}\n", ["inner.lr_init", "low < high"]),
        ("inner.steps: {choice: [1, 0]}\n", ["inner.steps", "value 0", "must be >= 1"]),
        ("train.method: {choice: [reckoning, magic]}\n", ["train.method", "'magic'"]),
        ("inner.steps: 3\n", ["inner.steps", "expected one distribution"]),
    ],
)
def test_bad_space_files_name_the_file_the_key_and_what_is_allowed(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path, load_config())
    message = str(info.value)
    assert path in message
    for word in words:
        assert word in message


def test_unknown_space_name_lists_the_spaces():
    with pytest.raises(ConfigError, match=r"tune.space='nope'.*embedded"):
        load_space("nope", load_config())


@pytest.mark.slow
@pytest.mark.ray
def test_placement_reports_impossible_requests_at_once(capsys):
    import ray

    from reckoning_ray.on_ray.sweep import placement
    from reckoning_ray.on_ray.trainer import init_ray

    init_ray(num_cpus=2)
    try:
        cfg = load_config(None, ["resources.cpus_per_worker=4"])
        with pytest.raises(ConfigError, match=r"resources.cpus_per_worker=4.0 is more than any node"):
            placement(cfg, {})
        cfg = load_config(None, ["resources.num_workers=4"])
        with pytest.raises(ConfigError, match=r"resources.num_workers=4 x resources.cpus_per_worker=1.0 needs 4 "
                                              r"CPUs but this cluster has 2; lower resources.num_workers"):
            placement(cfg, {})
        cfg = load_config(None, ["resources.use_gpu=true"])
        with pytest.raises(ConfigError, match=r"resources.use_gpu=true but no node"):
            placement(cfg, {})
        # the paper's node types on a laptop: said at once, then the sweep runs on the nodes there are
        cfg = load_config(None, ["resources.node_type=auto"])
        node_types, concurrent = placement(cfg, {"train.method": ("grid", ["reckoning", "icr"])})
        assert node_types == [] and concurrent == 2
        out = capsys.readouterr().out
        assert "'a100' nodes but this cluster has none" in out and "'rtx3090' nodes" in out
    finally:
        ray.shutdown()


SPACE = """\
inner.lr_init: {grid: [0.3, 0.001]}
outer.lr: {grid: [3.0e-3, 1.0e-5]}
"""


def tune_sweep_command(storage: Path, space: str) -> list[str]:
    # Trials planned for 4 steps (batch 32), validations at steps 2 and 4 (rounds 1, 2), a wsd
    # cooldown from step 2; ASHA's rungs at rounds 1, 2 and 4, and tune.extend: a trial ASHA keeps
    # at round 2 goes on from step 2 at the constant rate to round 4 (step 8), cooling down again
    # from step 4.
    return sweep_command(
        space, storage, "test-sweep", "tune.max_concurrent=2",
        "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_rounds=4", "tune.extend=true",
        "outer.schedule=wsd", "outer.cooldown_fraction=0.5", "outer.warmup_ratio=0",
        "data.num_train=128", "data.num_validation=64",
        "tracking.mode=offline", *ONE_FACT, "tune.metric=val/answer_loss", "tune.mode=min",
    )


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_with_asha_extensions_wandb_and_best_config(tmp_path):
    # an interrupted sweep resumed by a fresh driver: tests/test_object_store.py
    storage = tmp_path / "tune"
    space = write(tmp_path, SPACE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WANDB_MODE", None)
    env.pop("RAY_ADDRESS", None)
    trials = storage / "test-sweep" / "trials"
    # a second command that starts its own local Ray within a second of the sweep's: each keeps to
    # its own instance (Ray Train's placement-group cleaner, left to find "the" local instance,
    # finds two and dies)
    beside = subprocess.Popen(
        [sys.executable, "-m", "reckoning_ray.train", "embedded", *ONE_FACT, "train.max_steps=2",
         "data.num_train=16", "data.num_validation=8", "data.num_test=8", "train.batch_size=8",
         f"train.output_dir={tmp_path / 'beside'}", "tracking.mode=disabled"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    time.sleep(0.5)
    done = subprocess.run(tune_sweep_command(storage, space), capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    beside_output = beside.communicate(timeout=300)[0]
    assert beside.returncode == 0, beside_output[-4000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # a quiet terminal: none of Ray's internal debug or native error lines
    output = done.stdout + done.stderr
    assert "RAW:" not in output and "core_worker.cc" not in output, \
        [line for line in output.splitlines() if "RAW:" in line or "core_worker.cc" in line]
    for text in (output, beside_output):  # (Ray's own transient notices under a busy CPU may show)
        assert "multiple active Ray instances" not in text and "PlacementGroupCleanerMonitor" not in text, \
            text[-4000:]
    summary = json.loads((storage / "test-sweep" / "sweep_summary.json").read_text())
    rows = summary["trials"]
    # every grid point exactly once, each with a result
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert sorted((r["inner.lr_init"], r["outer.lr"]) for r in rows) == sorted(
        (a, b) for a in (0.001, 0.3) for b in (1e-5, 3e-3))
    assert all(r["best"] is not None for r in rows)
    statuses = [r["status"] for r in rows]
    assert "ASHA stop" in statuses and "completed" in statuses, statuses
    for r in rows:  # ASHA-stopped trials ran fewer validation rounds than tune.max_rounds
        assert (r["rounds"] < 4) == (r["status"] == "ASHA stop")
    assert "trial" in done.stdout and "best config:" in done.stdout and "test acc" in done.stdout
    # the first trial at each rung is always kept: at least one went beyond its 2 planned rounds
    assert "extending it to 8 steps from the start of its cooldown" in done.stdout
    # the sweep's last lines name its pictures, drawn with the rungs ASHA recorded
    report = storage / "test-sweep" / "report"
    assert f"report: {report / 'report.html'}" in done.stdout
    assert all((report / name).stat().st_size > 10_000 for name in PICTURES)
    assert sweep_data(storage / "test-sweep")["rungs"] == [1, 2, 4]

    # W&B: an offline run per trial whose history holds every validation and whose config is the trial's
    for r in rows:
        trial = trials / r["trial"]
        run = read_offline_run_merged(trial, r["trial"])
        history = [h for h in run["history"] if "val/answer_loss" in h]
        on_disk = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        record = json.loads((trial / "checkpoints.json").read_text())
        aside = {}
        if r["rounds"] == 4:  # extended: planned 4 steps, now 8, its cooldown from step 4
            assert record["planned_steps"] == 8 and record["stable"] == "step-000004"
            set_aside = (trial / "metrics.cooldown-000004.jsonl").read_text().splitlines()
            rows_aside = [json.loads(line) for line in set_aside]
            assert [(a["round"], a["step"]) for a in rows_aside] == [(2, 4)]
            aside = {a["round"]: a for a in rows_aside}
            # the run's own file: round 2 again, at the constant rate this time, then rounds 3 and 4
            assert [(m["round"], m["step"]) for m in on_disk] == [(1, 2), (2, 4), (3, 6), (4, 8)]
            assert on_disk[1]["val/answer_loss"] != rows_aside[0]["val/answer_loss"]
        else:  # stopped at round 1, or not kept at round 2: never extended
            assert record["planned_steps"] == 4 and not list(trial.glob("metrics.cooldown-*.jsonl"))
        if r["status"] == "completed":  # W&B, like Tune, heard each round once
            assert [h["round"] for h in history] == list(range(1, r["rounds"] + 1)), (r, history)
        else:  # a stopped trial's workers may finish one more validation (in metrics.jsonl and W&B)
            # after ASHA's decision, before they are killed; rounds counts what Tune saw
            assert 1 <= len(history) <= r["rounds"] + 1
        assert run["summary"]["trial/status"] == r["status"] and run["summary"]["trial/rounds"] == r["rounds"]
        for h in history:  # an extension's repeated round: W&B kept the first cooldown's value
            expected = aside.get(h["round"]) or on_disk[h["round"] - 1]
            assert h["val/answer_loss"] == pytest.approx(expected["val/answer_loss"])
        assert run["group"] == "test-sweep"
        # every trial, ASHA-stopped ones included, is tested with its best checkpoint after the sweep
        test = json.loads((trials / r["trial"] / "summary.json").read_text())["test"]
        assert r["test"]["test/label_accuracy"] == test["test/label_accuracy"]
        assert 0.0 <= test["test/label_accuracy"] <= 1.0 and test["test/tasks"] > 0
        assert any(k.startswith("test/label_accuracy/hops_") for k in test)
        assert run["summary"]["test/label_accuracy"] == test["test/label_accuracy"]
        # and its best checkpoint's model card says so
        card = ModelCard.load(trial / "checkpoints" / record["best"] / "README.md")
        assert card.data.eval_results[0].metric_value == test["test/label_accuracy"]
        assert run["config"]["inner.lr_init"] == pytest.approx(r["inner.lr_init"])
        assert run["config"]["outer.lr"] == pytest.approx(r["outer.lr"])

    # the best config re-runs as a plain training run
    best_config = Path(summary["best_config"])
    assert best_config.exists() and Path(summary["best_checkpoint"]).exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "reckoning_ray.train", "--config", str(best_config), "train.max_steps=2",
         "resources.num_workers=0", f"train.output_dir={tmp_path / 'rerun'}", "tracking.mode=disabled"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (tmp_path / "rerun" / "test-sweep-best" / "summary.json").exists()


def test_next_rung_follows_ashas_rungs_up_to_max_rounds():
    from reckoning_ray.on_ray.trials import next_rung

    cfg = load_config(None, ["tune.grace_period=2", "tune.reduction_factor=3", "tune.max_rounds=12"])
    assert [next_rung(r, cfg.tune) for r in (1, 2, 4, 5, 6, 11)] == [2, 6, 6, 6, 12, 12]


def test_asha_posts_its_decision_on_a_trials_last_planned_round(monkeypatch, tmp_path):
    # with tune.extend, trials wait for this decision before they extend themselves
    from types import SimpleNamespace

    from reckoning_ray.on_ray import schedulers

    posted = []

    class Board:
        def decide(self, trial_id, rounds, go):
            posted.append((trial_id, rounds, go))

    monkeypatch.setattr(schedulers, "promotion_board", lambda name, create=False: Board())
    cfg = load_config(None, ["outer.schedule=wsd", "tune.extend=true", "tune.grace_period=2",
                             "tune.reduction_factor=2", "tune.max_rounds=8", "tune.metric=val/label_accuracy",
                             "tune.mode=max"])
    scheduler = schedulers.build_trial_scheduler(cfg, str(tmp_path))
    scheduler.set_search_properties("val/label_accuracy", "max")
    good, bad = SimpleNamespace(trial_id="good", config={}), SimpleNamespace(trial_id="bad", config={})
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    for rounds, value_good, value_bad in [(1, 0.5, 0.4), (2, 0.9, 0.1)]:
        for trial, value in ((good, value_good), (bad, value_bad)):
            result = {"round": rounds, "rounds_planned": 2, "val/label_accuracy": value, "training_iteration": rounds}
            scheduler.on_trial_result(None, trial, result)
    # round 1 is not a planned end: nothing posted; at round 2 (a rung) ASHA keeps the better one
    assert posted == [("good", 2, True), ("bad", 2, False)]


def test_a_trial_extends_only_when_asha_kept_it_at_its_planned_end(monkeypatch, tmp_path):
    from reckoning_ray.on_ray import trials

    decisions = {}

    class Board:
        def wait(self, trial_id, rounds, timeout_s):
            return decisions[(trial_id, rounds)]

    monkeypatch.setattr(trials, "promotion_board", lambda name, create=False: Board())
    cfg = load_config(None, ["outer.schedule=wsd", "tune.extend=true", "tune.grace_period=2",
                             "tune.reduction_factor=2", "tune.max_rounds=8", "train.batch_size=16",
                             "train.epochs=1", "train.validations_per_epoch=2"])
    run_dir = tmp_path / "t"
    run_dir.mkdir()

    def length(summary, go):
        (run_dir / "summary.json").write_text(json.dumps(summary))
        decisions[("t", 2)] = go
        return trials.promoted_length(cfg, "t", run_dir, None, 64, "board")

    # 64 tasks / 16 = 4 steps per epoch, validations at steps 2 and 4: planned rounds 2
    assert length({"validations": 2, "stopped_early": False}, True) == 8  # to rung 4: round 4 is step 8
    assert length({"validations": 2, "stopped_early": False}, False) is None  # ASHA stopped it
    assert length({"validations": 2, "stopped_early": True}, True) is None  # train.patience stopped it
    cfg.train.max_steps, cfg.train.epochs = 16, 4  # planned rounds 8 = tune.max_rounds: the end
    decisions[("t", 8)] = True
    assert length({"validations": 8, "stopped_early": False}, True) is None


def test_asha_state_is_json_survives_a_restart_and_no_pickle_is_read(tmp_path):
    import pickle
    from types import SimpleNamespace

    from reckoning_ray.core.errors import ConfigError
    from reckoning_ray.on_ray.schedulers import ResumableASHA

    marker = tmp_path / "code-ran"
    # a crafted pickle where the state used to be: never opened
    (tmp_path / "asha_state.pkl").write_bytes(pickle.dumps(CodeOnUnpickle(marker)))

    def scheduler():
        s = ResumableASHA(str(tmp_path), time_attr="round", max_t=4, grace_period=1, reduction_factor=2)
        s.set_search_properties("val/answer_loss", "min")
        return s

    first = scheduler()
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(3)]
    for trial in trials:
        first.on_trial_add(None, trial)
    for trial, loss in zip(trials, (1.0, 2.0, 0.5)):
        first.on_trial_result(None, trial, {"round": 1, "val/answer_loss": loss, "training_iteration": 1})
    saved = json.loads((tmp_path / "asha_state.json").read_text())
    assert saved["trial_bracket"] == {"t0": 0, "t1": 0, "t2": 0}
    # a restarted driver: the same rungs, so the same decision on the next result
    second = scheduler()
    late = SimpleNamespace(trial_id="t3", config={})
    second.on_trial_add(None, late)
    first.on_trial_add(None, late)
    result = {"round": 1, "val/answer_loss": 1.5, "training_iteration": 1}
    assert second.on_trial_result(None, late, dict(result)) == first.on_trial_result(None, late, dict(result))
    assert second._state() == first._state()
    assert not marker.exists()
    # a state file that is not what the project writes: one clear error, nothing run
    (tmp_path / "asha_state.json").write_bytes(pickle.dumps(CodeOnUnpickle(marker)))
    with pytest.raises(ConfigError, match="asha_state.json is not the scheduler state this project writes"):
        scheduler().on_trial_add(None, SimpleNamespace(trial_id="t4", config={}))
    assert not marker.exists()



def test_one_sweep_per_name_and_a_killed_drivers_lock_is_taken_over(tmp_path):
    import signal

    from reckoning_ray.core.errors import ConfigError
    from reckoning_ray.core.runs import lock_sweep

    sweep = tmp_path / "tune" / "same-name"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from reckoning_ray.core.runs import "
         f"lock_sweep; h = lock_sweep(Path({str(sweep)!r})); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"tune.name: the sweep {sweep} is already running \(pid {holder.pid} on "):
            lock_sweep(sweep)
        # the command line: exit status 2 and one line, before any work
        out = subprocess.run([sys.executable, "-m", "reckoning_ray.tune", f"tune.storage_path={tmp_path / 'tune'}",
                              "tune.name=same-name"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=""))
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], lines
    finally:
        holder.send_signal(signal.SIGKILL)  # a driver killed without cleaning up
        holder.wait(timeout=30)
    assert (sweep / ".sweep.lock").exists()  # the stale lock file is still there ...
    handle = lock_sweep(sweep)  # ... and is taken over
    assert json.loads((sweep / ".sweep.lock").read_text())["pid"] == os.getpid()
    handle.close()
