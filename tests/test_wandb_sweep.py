"""A Ray Tune sweep as a W&B sweep: the search space translated and checked by W&B's own validator,
sweep ids and best-value summaries in real offline runs, the trial table's status against Tune's
record, and `publish --dry-run` on a sweep directory written by real offline runs (no network)."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
import yaml

from reckoning_ray.core.config import flatten, load_config, save_config
from reckoning_ray.tracking.writer import RunWriter, Tracker, run_names
from wandb_files import read_offline_run_merged
from reckoning_ray.core.spaces import SPACES_DIR, load_space
from reckoning_ray.on_ray.sweep import start_wandb_sweep
from reckoning_ray.on_ray.results import trial_outcome
from reckoning_ray.tune import main as tune_main
from reckoning_ray.tracking.sweeps import (
    SWEEP_FILE,
    SWEEP_ID_FILE,
    read_sweep_file,
    sweep_config,
    sweep_config_of,
    violations,
)
from test_tracking import _isolate_wandb, _teardown_wandb


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    yield
    _teardown_wandb()


# -- translation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("space_file", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_is_a_valid_wandb_sweep(space_file):
    cfg = load_config()
    space = load_space(str(space_file), cfg)
    config = sweep_config_of(cfg, space, "a description")
    assert violations(config) == []
    assert list(config["parameters"]) == list(space)  # the flattened keys the runs log
    assert config["metric"] == {"name": cfg.tune.metric,
                                "goal": {"min": "minimize", "max": "maximize"}[cfg.tune.mode]}
    assert config["controller"] == {"type": "local"}
    every_grid = all(dist == "grid" for dist, _ in space.values())
    assert config["method"] == ("grid" if every_grid else "random")


def test_paper_grid_is_a_grid_and_embedded_is_random():
    cfg = load_config()
    assert sweep_config_of(cfg, load_space("paper", cfg))["method"] == "grid"
    assert sweep_config_of(cfg, load_space("embedded", cfg))["method"] == "random"


def test_every_distribution_translates_exactly(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "inner.steps: {choice: [1, 2]}\n"
        "train.seed: {grid: [1, 2, 3]}\n"
        "model.dropout: {uniform: [0.0, 0.2]}\n"
        "inner.lr_init: {loguniform: [1.0e-3, 0.3]}\n"
        "train.epochs: {randint: [1, 4]}\n"
        "outer.lr: {qloguniform: [1.0e-4, 1.0e-2, 1.0e-4]}\n"
    )
    cfg = load_config(overrides=["tune.metric=val/answer_loss", "tune.mode=min", "tune.name=every"])
    config = sweep_config_of(cfg, load_space(str(path), cfg))
    assert config == {
        "name": "every",
        "method": "random",
        "metric": {"name": "val/answer_loss", "goal": "minimize"},
        "parameters": {
            "inner.steps": {"values": [1, 2]},
            "train.seed": {"values": [1, 2, 3]},
            "model.dropout": {"distribution": "uniform", "min": 0.0, "max": 0.2},
            "inner.lr_init": {"distribution": "log_uniform_values", "min": 1e-3, "max": 0.3},
            "train.epochs": {"distribution": "int_uniform", "min": 1, "max": 3},  # Tune's high is exclusive
            "outer.lr": {"distribution": "q_log_uniform_values", "min": 1e-4, "max": 1e-2, "q": 1e-4},
        },
        "controller": {"type": "local"},
    }
    assert violations(config) == []


def test_the_validator_rejects_what_wandb_would():
    # W&B's "loguniform" takes log-space bounds: a config that kept Tune's name would be wrong,
    # and W&B's validator says so; so does a goal W&B does not know.
    config = sweep_config({"outer.lr": ("loguniform", [1e-4, 1e-2])}, "val/answer_loss", "min", "x")
    assert violations(config) == []
    config["parameters"]["outer.lr"]["distribution"] = "loguniform"
    assert violations(config)
    config = sweep_config({"inner.steps": ("choice", [1, 2])}, "val/answer_loss", "min", "x")
    config["metric"]["goal"] = "best"
    assert any("best" in v for v in violations(config))


# -- runs: sweep id and best-value summaries -------------------------------------------------------

def test_offline_run_keeps_the_sweep_id_and_the_best_values(tmp_path):
    cfg = load_config(overrides=["tracking.mode=offline", "train.metric=val/label_accuracy"])
    tracker = Tracker.start(cfg.tracking, "t_00001", "t_00001", "sweep", flatten(cfg), tmp_path / "out",
                            sweep_id="abc123xy", best={"val/answer_loss": "min", "val/label_accuracy": "max"})
    assert tracker.mode == "offline"
    for step, (loss, acc) in enumerate([(0.5, 0.3), (0.2, 0.8), (0.4, 0.6)]):
        tracker.log({"val/answer_loss": loss, "val/label_accuracy": acc, "train/loss": loss}, step=step)
    tracker.finish()
    run = read_offline_run_merged(tmp_path / "out", "t_00001")
    assert run["sweep_id"] == "abc123xy"  # RunRecord.sweep_id: what `wandb sync` sends
    summary = run["summary"]
    assert summary["val/answer_loss"] == {"min": 0.2}
    assert summary["val/label_accuracy"] == {"max": 0.8}
    assert summary["train/loss"] == 0.4  # metrics without a definition keep the last value


def test_training_run_keeps_the_best_value_of_train_metric_by_default(tmp_path):
    cfg = load_config(overrides=["tracking.mode=offline", "train.metric=val/answer_loss"])
    tracker = Tracker.start(cfg.tracking, "plain", "plain", "g", flatten(cfg), tmp_path)
    for step, loss in enumerate([0.3, 0.1, 0.2]):
        tracker.log({"val/answer_loss": loss}, step=step)
    tracker.finish()
    run = read_offline_run_merged(tmp_path, "plain")
    assert run["sweep_id"] is None
    assert run["summary"]["val/answer_loss"] == {"min": 0.1}


# -- status and rounds: the table agrees with Tune -------------------------------------------------

@pytest.mark.parametrize("last, error, max_rounds, expected", [
    ({"round": 4, "rounds_planned": 4, "stopped_early": False}, False, 4, ("completed", 4)),
    ({"round": 2, "rounds_planned": 16, "stopped_early": False}, False, 2, ("completed", 2)),  # ASHA's max_t
    ({"round": 1, "rounds_planned": 16, "stopped_early": False}, False, 2, ("ASHA stop", 1)),
    ({"round": 1, "rounds_planned": 16, "stopped_early": True}, False, 2, ("patience stop", 1)),
    ({"round": 1, "rounds_planned": 16, "stopped_early": False}, True, 2, ("error", 1)),
    (None, True, 2, ("error", 0)),
])
def test_trial_outcome(last, error, max_rounds, expected):
    assert trial_outcome(last, error, max_rounds) == expected


def test_table_takes_status_and_rounds_from_tunes_record(tmp_path, capsys):
    # A trial that ASHA stopped after round 1 while its workers finished round 2 (= tune.max_rounds)
    # before they were ended: metrics.jsonl holds 2 rounds, Tune saw 1. The table used to call it
    # "completed" with 2 rounds; it must say what Tune says, in the table and in the W&B summary.
    import pandas as pd
    from ray.tune import Result

    from reckoning_ray.on_ray.results import summarize

    cfg = load_config(overrides=[f"tune.storage_path={tmp_path}", "tune.name=s", "tune.max_rounds=2", "tune.grace_period=1",
                                 "tune.metric=val/answer_loss", "tune.mode=min", "tracking.mode=offline"])
    trials = tmp_path / "s" / "trials"
    results = []
    for trial, losses, seen in (("t_00000", [0.5, 0.3], 2), ("t_00001", [0.6, 0.2], 1)):
        rows = [{"round": r + 1, "rounds_planned": 12, "step": 8 * (r + 1), "stopped_early": False,
                 "val/answer_loss": loss, "val/label_accuracy": 0.5} for r, loss in enumerate(losses)]
        (trials / trial).mkdir(parents=True)
        (trials / trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        params = {"inner.lr_init": 0.01}
        results.append(Result(metrics=dict(rows[seen - 1], config=params), checkpoint=None, error=None,
                              path=str(tmp_path / "s" / trial), metrics_dataframe=pd.DataFrame(rows[:seen])))
    space = {"inner.lr_init": ("loguniform", [1e-3, 0.3])}
    out = summarize(cfg, results, space)
    table = {r["trial"]: (r["status"], r["rounds"]) for r in out["trials"]}
    assert table == {"t_00000": ("completed", 2), "t_00001": ("ASHA stop", 1)}
    for trial, (status, rounds) in table.items():
        run = read_offline_run_merged(trials / trial, trial)
        assert (run["summary"]["trial/status"], run["summary"]["trial/rounds"]) == (status, rounds)
        # every validation of metrics.jsonl reaches W&B by the sweep's end, the one Tune never saw too
        assert [h["round"] for h in run["history"] if "val/answer_loss" in h] == [1, 2]
    # the validation Tune never saw is still the trial's best value (its best/ checkpoint)
    assert out["best_trial"] == "t_00001" and out["best_value"] == pytest.approx(0.2)


# -- publish --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_template(tmp_path_factory):
    """A small, real sweep directory: sweep_config.yaml, wandb_sweep.yaml (written as a sweep
    start writes it), two trials' offline runs written by the real W&B writer (the second
    resumed once, so it has two run directories) and sweep_summary.json."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        cfg = load_config(overrides=[f"tune.storage_path={root / 'tune'}", "tune.name=pub", "tune.space=embedded",
                                     "tracking.mode=offline", "tracking.entity=team", "tracking.project=proj"])
        sweep = root / "tune" / "pub"
        save_config(cfg, sweep / "sweep_config.yaml")
        start_wandb_sweep(cfg, load_space("embedded", cfg), fresh=True)
        for trial, starts in (("ab12c_00000", 1), ("ab12c_00001", 2)):
            for start in range(starts):
                names = run_names(cfg, trial_id=trial)
                with RunWriter(cfg.tracking, sweep / "trials" / trial, names, {"inner.steps": 1}) as writer:
                    writer.log({"val/answer_loss": 0.5 - start / 10, "step": start})
        (sweep / "sweep_summary.json").write_text("{}")
        _teardown_wandb()
    return sweep


@pytest.fixture()
def finished_sweep(sweep_template, tmp_path):
    """A fresh copy of ``sweep_template`` for one test."""
    copy = tmp_path / "tune" / "pub"
    shutil.copytree(sweep_template, copy, symlinks=True)
    return copy


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (local Unix sockets are allowed)."""
    real_connect = socket.socket.connect
    attempts = []

    def connect(sock, address):
        if sock.family != socket.AF_UNIX:
            attempts.append(address)
            raise OSError(f"network use in a test: connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield attempts
    assert attempts == [], f"the command tried to reach {attempts}"


def _publish(capsys, *args: str) -> tuple[int, str]:
    code = tune_main(["publish", *args])
    return code, capsys.readouterr().out


def test_publish_dry_run_prints_the_sync_command_and_the_sweep(finished_sweep, no_network, capsys):
    sweep = finished_sweep
    before = sorted(str(p) for p in sweep.rglob("*"))
    code, text = _publish(capsys, str(sweep), "--dry-run")
    assert code == 0
    dirs = {t: sorted((sweep / "trials" / t / "wandb").glob("offline-run-*")) for t in ("ab12c_00000", "ab12c_00001")}
    assert [len(d) for d in dirs.values()] == [1, 2]
    sync = [line for line in text.splitlines() if " -m wandb sync " in line]
    assert sync == [" ".join([sys.executable, "-m", "wandb", "sync", "--project", "proj", "--entity", "team",
                              *(str(d) for d in dirs["ab12c_00000"] + dirs["ab12c_00001"])])]
    sent = yaml.safe_load(text.split("\n---\n", 1)[1])
    assert sent["entity"] == "team" and sent["project"] == "proj"
    assert sent["prior_runs"] == ["ab12c_00000", "ab12c_00001"]
    assert sent["config"] == read_sweep_file(sweep)
    assert sent["config"]["parameters"]["outer.lr"] == {"distribution": "log_uniform_values",
                                                        "min": 3e-4, "max": 1e-2}
    assert "passes W&B's sweep-config validator" in text
    assert "create the W&B sweep" in text and "mark the W&B sweep finished" in text
    # a dry run writes nothing: no sweep id recorded, no run marked as synced
    assert sorted(str(p) for p in sweep.rglob("*")) == before
    assert not (sweep / SWEEP_ID_FILE).exists()


def test_publish_reuses_the_recorded_sweep(finished_sweep, no_network, capsys):
    (finished_sweep / SWEEP_ID_FILE).write_text(json.dumps({"id": "s1d2e3f4", "entity": "team", "project": "proj"}))
    code, text = _publish(capsys, str(finished_sweep), "--dry-run")
    assert code == 0
    assert "add the trial runs to the recorded W&B sweep s1d2e3f4" in text
    assert "create the W&B sweep" not in text


def test_publish_refuses_a_directory_that_is_not_a_sweep(tmp_path, no_network, capsys):
    code, text = _publish(capsys, str(tmp_path), "--dry-run")
    assert code == 2 and "not a sweep directory" in text


def test_an_unreachable_wandb_does_not_stop_an_online_sweep(tmp_path, monkeypatch, caplog):
    # A key is present, so the sweep is really created against the (unreachable, local) server.
    from reckoning_ray.tracking.sweeps import start_online_sweep

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd" * 5)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    for var in ("WANDB_ENTITY", "WANDB_PROJECT"):  # wandb.sweep sets them; restore them afterwards
        monkeypatch.setenv(var, "unset")
    cfg = load_config(overrides=["tracking.mode=online", "tracking.entity=team", "tracking.project=proj"])
    config = sweep_config_of(cfg, load_space("embedded", cfg))
    with caplog.at_level("WARNING", logger="reckoning_ray.tracking.sweeps"):
        assert start_online_sweep(cfg, tmp_path, config, timeout_s=3.0) is None
    assert "could not create the sweep" in caplog.text and "publish" in caplog.text
    assert not (tmp_path / SWEEP_ID_FILE).exists()
    # a sweep created by an earlier start (--resume) is reused without asking W&B
    (tmp_path / SWEEP_ID_FILE).write_text(json.dumps({"id": "s1", "entity": "team", "project": "proj"}))
    assert start_online_sweep(cfg, tmp_path, config, timeout_s=3.0) == "s1"


def test_a_fresh_sweep_forgets_the_previous_w_and_b_sweep(finished_sweep):
    (finished_sweep / SWEEP_ID_FILE).write_text(json.dumps({"id": "old", "entity": "team", "project": "proj"}))
    cfg = load_config(str(finished_sweep / "sweep_config.yaml"))
    cfg.tune.storage_path = str(finished_sweep.parent)
    start_wandb_sweep(cfg, load_space("embedded", cfg), fresh=False)  # --resume keeps it
    assert (finished_sweep / SWEEP_ID_FILE).exists()
    first = (finished_sweep / SWEEP_FILE).read_text()
    start_wandb_sweep(cfg, load_space("embedded", cfg), fresh=True)
    assert not (finished_sweep / SWEEP_ID_FILE).exists()
    assert read_sweep_file(finished_sweep)["parameters"] == yaml.safe_load(first)["parameters"]


def test_trial_outcome_with_extensions_completes_only_at_max_rounds():
    # tune.extend: a trial ASHA keeps at its planned end goes on, so one that ended there was stopped
    assert trial_outcome({"round": 2, "rounds_planned": 2}, False, 4, extend=True) == ("ASHA stop", 2)
    assert trial_outcome({"round": 4, "rounds_planned": 4}, False, 4, extend=True) == ("completed", 4)
