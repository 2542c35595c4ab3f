"""W&B tracking: real offline runs written by wandb and read back from their .wandb files."""

from __future__ import annotations

import logging
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb

from reckoning_ray.tracking import writer as tracking
from reckoning_ray.core.config import flatten, load_config
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.tracking.secrets import looks_secret, scrub
from reckoning_ray.tracking.writer import (
    RunWriter,
    Tracker,
    resolve_mode,
    run_names,
    safe_run_id,
)
from wandb_files import find_offline_runs, read_offline_run, read_offline_run_merged

# A syntactically valid (40+ characters) but fake W&B API key.
FAKE_KEY = "0123abcd" * 5
LOGGER = "reckoning_ray.tracking.writer"


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Keep W&B quiet, off the network, away from the user's login and out of the repo."""
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (root / var.lower()).mkdir(exist_ok=True)
        mp.setenv(var, str(root / var.lower()))
    mp.setenv("NETRC", str(root / "netrc-absent"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL",
                "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        mp.delenv(var, raising=False)


def _wandb_children() -> list[int]:
    """Live (non-zombie) child processes of this process whose name starts with 'wandb'."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == os.getpid() and comm.startswith("wandb") and state != "Z":
            found.append(int(entry.name))
    return found


def _teardown_wandb() -> None:
    """Stop the wandb service and check that no wandb process is left behind."""
    wandb.teardown()
    if not Path("/proc").is_dir():
        return  # the process check needs Linux /proc; teardown above still ran
    deadline = time.monotonic() + 10
    while _wandb_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _wandb_children() == [], "wandb service processes left running after teardown"


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    _isolate_wandb(monkeypatch, tmp_path)
    yield
    _teardown_wandb()


def _cfg(mode: str = "offline"):
    return load_config(overrides=[f"tracking.mode={mode}"])


STEPS = [5 * i for i in range(120)]  # 0, 5, ..., 595: the logged step numbers are not 0..n-1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One offline run: 120 logged steps, a summary, and a config with a 100 kB value (its
    record spans several 32 KiB blocks) and secrets that must not reach the file."""
    root = tmp_path_factory.mktemp("finished_run")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        mp.setenv("WANDB_API_KEY", FAKE_KEY)  # offline: W&B must not need or store it
        cfg = _cfg()
        config = flatten(cfg)
        config.update({"notes.long": "n" * 100_000, "hf_token": "hf_secret_value_123",
                       "copied_key": FAKE_KEY, "tracking.api_key": FAKE_KEY})
        tracker = Tracker.start(cfg.tracking, run_id="trial_00001", run_name="trial one",
                                group="the-sweep", config=config, dir=root / "out")
        assert tracker.active and tracker.mode == "offline"
        run_file = tracker.run_file
        for i, step in enumerate(STEPS):
            tracker.log({"train/loss": 1.0 / (i + 1), "val/label_accuracy": torch.tensor(i / 120),
                         "val/per_hop": {"0": i / 400}}, step=step)
        tracker.summary({"best/val/label_accuracy": 0.99, "best/step": 595})
        tracker.finish()
        tracker.finish()  # a second finish is a no-op
        _teardown_wandb()
    return root / "out", run_file, config


def test_offline_run_round_trip(finished_run):
    out, run_file, config = finished_run
    # Layout: <dir>/wandb/offline-run-<timestamp>-<run id>/run-<run id>.wandb (+ latest-run link).
    assert run_file.parent.parent == out / "wandb"
    assert run_file.parent.name.startswith("offline-run-") and run_file.parent.name.endswith("-trial_00001")
    assert run_file.name == "run-trial_00001.wandb"
    assert (out / "wandb" / "latest-run").is_symlink()
    assert find_offline_runs(out) == [run_file.resolve()]  # the symlink does not count twice

    run = read_offline_run(run_file)
    assert (run["run_id"], run["name"], run["group"], run["project"]) == (
        "trial_00001", "trial one", "the-sweep", "reckoning-ray")
    assert run["exit_code"] == 0
    assert run["config"]["inner.lr_init"] == 0.1
    assert run["config"]["train.batch_size"] == 32
    assert run["config"]["data.hops"] == [2]  # a list survives the round trip
    assert run["config"]["preset"] == "embedded" and run["config"]["train.run_name"] == ""
    assert run["config"]["notes.long"] == "n" * 100_000  # reassembled from first/middle/last chunks
    for secret_key in ("hf_token", "copied_key", "tracking.api_key"):
        assert secret_key not in run["config"]
    assert set(run["config"]) == set(config) - {"hf_token", "copied_key", "tracking.api_key"}

    history = run["history"]
    assert [row["_step"] for row in history] == STEPS
    assert history[0]["train/loss"] == 1.0
    assert history[3]["train/loss"] == pytest.approx(0.25)
    assert history[119]["val/label_accuracy"] == pytest.approx(119 / 120)  # a 0-d tensor, logged as a number
    assert history[100]["val/per_hop"] == {"0": pytest.approx(0.25)}  # nested dicts stay nested
    assert run["summary"]["best/val/label_accuracy"] == 0.99
    assert run["summary"]["best/step"] == 595
    assert run["summary"]["train/loss"] == pytest.approx(1 / 120)  # W&B's own last-value summary


def test_api_key_never_written(finished_run):
    out, _, _ = finished_run
    leaked = [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_resume_appends_to_the_same_run(tmp_path):
    cfg = _cfg()
    for start, steps in enumerate(([0, 1, 2], [3, 4])):
        tracker = Tracker.start(cfg.tracking, "resumed", "resumed", "g", {"start": start}, tmp_path)
        for step in steps:
            tracker.log({"loss": 10.0 - step}, step=step)
        tracker.summary({"last_start": start})
        tracker.finish()
    # Offline, each start writes its own directory and file for the same run id.
    files = find_offline_runs(tmp_path)
    assert len(files) == 2 and all(f.name == "run-resumed.wandb" for f in files)
    assert sorted(len(read_offline_run(f)["history"]) for f in files) == [2, 3]
    # Both files ask W&B to resume an existing run of that id, so `wandb sync` appends them.
    assert [read_offline_run(f)["resume"] for f in files] == [True, True]

    merged = read_offline_run_merged(tmp_path, "resumed")
    assert [row["_step"] for row in merged["history"]] == [0, 1, 2, 3, 4]
    assert [row["loss"] for row in merged["history"]] == [10.0, 9.0, 8.0, 7.0, 6.0]
    assert merged["config"]["start"] == 1
    assert merged["summary"]["last_start"] == 1 and merged["summary"]["loss"] == 6.0
    assert merged["exit_code"] == 0 and len(merged["paths"]) == 2
    with pytest.raises(FileNotFoundError, match="no .wandb file of run 'other'"):
        read_offline_run_merged(tmp_path, "other")

    # `wandb sync <dir>/wandb` picks up both files (a dry run needs no key and no network).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    result = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", "wandb"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Would sync 2 run(s)" in result.stderr and "WARNING" not in result.stderr


def test_run_writer_logs_each_validation_once(tmp_path):
    """The writer's own record (not the .wandb files) decides what is logged: a restarted writer
    (a resumed run, a restarted driver) skips steps logged before, fills in what only
    metrics.jsonl holds, and lists its W&B run directories in order."""
    cfg = _cfg()
    names = run_names(cfg)
    run_dir = tmp_path / "run"
    rows = [{"step": s, "round": i + 1, "val/label_accuracy": i / 10, "epoch": i, "other": "x"}
            for i, s in enumerate((4, 8, 12))]
    with RunWriter(cfg.tracking, run_dir, names, config={"a": 1}) as writer:
        assert writer.log(rows[0]) and writer.log(rows[1])
        assert not writer.log(rows[0])  # older than the last logged step
        writer.summary({"trial/status": "completed"})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = RunWriter(cfg.tracking, run_dir, names, config={"a": 1})
    assert again.logged_steps == [4, 8] and again.has_summary({"trial/status": "completed"})
    assert not again.has_summary({"trial/status": "ASHA stop"})
    with again:
        assert again.backfill() == 1  # only step 12 was missing
    record = json.loads((run_dir / RunWriter.RECORD).read_text())
    assert record["steps"] == [4, 8, 12] and record["run_id"] == names.run_id
    assert len(record["dirs"]) == 2 and all((run_dir / d).is_dir() for d in record["dirs"])
    merged = read_offline_run_merged(run_dir, names.run_id)
    assert [row["_step"] for row in merged["history"]] == [4, 8, 12]
    assert "other" not in merged["history"][0] and merged["history"][2]["round"] == 3
    assert merged["summary"]["trial/status"] == "completed"


def test_validations_the_host_never_heard_go_before_a_later_one(tmp_path):
    """A worker lost right after writing validations 1 and 2 (before its host heard of them): the
    restarted run reports 3 first. The writer logs 1 and 2 from metrics.jsonl before it, since W&B
    would refuse their earlier steps after step 12."""
    cfg = _cfg()
    names = run_names(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "round": i + 1, "val/label_accuracy": i / 10} for i, s in enumerate((4, 8, 12, 16))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with RunWriter(cfg.tracking, run_dir, names, config={}) as writer:
        assert writer.log(rows[2]) and writer.logged_steps == [4, 8, 12]
        assert writer.log(rows[3]) and not writer.log(rows[1])
    merged = read_offline_run_merged(run_dir, names.run_id)
    assert [(row["_step"], row["round"]) for row in merged["history"]] == [(4, 1), (8, 2), (12, 3), (16, 4)]


def _record_init_calls(monkeypatch) -> list:
    calls: list = []
    real_init = wandb.init

    def init(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return calls


@pytest.mark.parametrize("configured, env_mode", [("disabled", None), ("offline", "disabled")])
def test_disabled_writes_nothing(tmp_path, monkeypatch, caplog, configured, env_mode):
    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    calls = _record_init_calls(monkeypatch)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with Tracker.start(_cfg(configured).tracking, "r", "r", "g", {"a": 1}, out) as tracker:
            tracker.log({"loss": 1.0}, step=0)
            tracker.summary({"best": 1.0})
    assert (tracker.active, tracker.mode, tracker.run_file) == (False, "disabled", None)
    assert calls == [] and not out.exists() and caplog.records == []


def test_wandb_mode_env_overrides_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker.start(_cfg("disabled").tracking, "env-run", "env-run", "g", {}, tmp_path)
    assert tracker.mode == "offline"
    tracker.log({"loss": 0.5}, step=3)
    tracker.finish()
    [run_file] = find_offline_runs(tmp_path)
    assert [(row["_step"], row["loss"]) for row in read_offline_run(run_file)["history"]] == [(3, 0.5)]


@pytest.mark.parametrize("configured, env_mode, key, expected", [
    ("offline", None, False, "offline"),
    ("disabled", None, False, "disabled"),
    ("offline", "online", True, "online"),
    ("online", "offline", True, "offline"),
    ("online", "dryrun", True, "offline"),   # W&B's old name for offline
    ("offline", "run", True, "online"),      # W&B's old name for online
    ("disabled", "  Offline ", False, "offline"),
    ("online", None, True, "online"),
    ("online", None, False, "offline"),      # no API key: falls back, with a warning
    ("offline", "online", False, "offline"),
])
def test_resolve_mode(monkeypatch, configured, env_mode, key, expected):
    if env_mode is not None:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode(configured) == expected


def test_resolve_mode_warnings_and_errors(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_mode("online") == "offline"
    assert len(caplog.records) == 1 and "no API key" in caplog.text and "wandb sync" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WANDB_MODE", "shiny")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_mode("disabled") == "disabled"
    assert "ignoring WANDB_MODE='shiny'" in caplog.text
    with pytest.raises(ConfigError, match="tracking.mode='cloud' is invalid"):
        resolve_mode("cloud")
    # A `wandb login` entry in the netrc file counts as a key.
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("online") == "online"


def test_online_without_key_logs_offline(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = Tracker.start(_cfg("online").tracking, "no-key", "no-key", "g", {}, tmp_path)
    assert tracker.mode == "offline" and "no API key" in caplog.text
    tracker.log({"loss": 2.0}, step=0)
    tracker.finish()
    [run_file] = find_offline_runs(tmp_path)
    assert run_file.parent.name.startswith("offline-run-")
    assert read_offline_run(run_file)["history"][0]["loss"] == 2.0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    # A key is present, so the online start really tries the (unreachable, local) server.
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(tracking, "INIT_TIMEOUT_S", 3.0)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = Tracker.start(_cfg("online").tracking, "fallback", "fallback", "g", {"a": 1}, tmp_path)
    assert time.monotonic() - began < 20
    assert tracker.mode == "offline" and tracker.active
    assert "online start of run 'fallback' failed" in caplog.text and "wandb sync" in caplog.text
    tracker.log({"loss": 1.5}, step=7)
    tracker.finish()
    # The failed online attempt leaves an empty online run directory; the metrics are offline.
    [offline] = [f for f in find_offline_runs(tmp_path) if f.parent.name.startswith("offline-run-")]
    run = read_offline_run(offline)
    assert [(row["_step"], row["loss"]) for row in run["history"]] == [(7, 1.5)]
    assert run["config"] == {"a": 1} and run["exit_code"] == 0


def test_broken_init_leaves_training_running(tmp_path, monkeypatch, caplog):
    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb is broken")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker = Tracker.start(_cfg().tracking, "broken", "broken", "g", {"a": 1}, tmp_path)
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
        tracker.summary({"best": 1.0})
        tracker.finish()
    assert not tracker.active and tracker.mode == "disabled"
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "wandb is broken" in warnings[0].getMessage()
    assert find_offline_runs(tmp_path) == []


def test_log_failure_warns_once_and_stops_tracking(tmp_path, monkeypatch, caplog):
    tracker = Tracker.start(_cfg().tracking, "log-fails", "log-fails", "g", {}, tmp_path)
    tracker.log({"loss": 3.0}, step=0)
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(kwargs.get("step"))
        raise OSError("disk full")

    monkeypatch.setattr(tracker._run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in (1, 2, 3):
            tracker.log({"loss": 2.0}, step=step)
        tracker.summary({"best": 3.0})
        tracker.finish()
    assert calls == [1] and not tracker.active
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    run = read_offline_run(find_offline_runs(tmp_path)[0])
    assert [row["_step"] for row in run["history"]] == [0] and run["exit_code"] == 1


def test_scrub_drops_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    monkeypatch.setenv("MY_TOKEN", "1")  # too short to be a secret value
    config = {
        "inner.lr_init": 3e-5, "eval.max_new_tokens": 48, "model.tokenizer": "bpe",
        "tracking.entity": "team", "author": "Keyes", "notes": "1",
        "hf_token": "x", "wandb.api_key": "x", "apiKey": "x", "db_password": "x",
        "aws_secret_access_key": "x", "gcp.credentials_path": "x", "AccessToken": "x",
        "private_key": "x", "proxy_auth": "x",
        "comment": f"key is {FAKE_KEY}", "hub": "hf_abcdefgh12345",
        "nested": {"keep": 1, "password": "x", "deeper": {"client_secret": "x", "ok": [1, FAKE_KEY, 2]}},
    }
    assert scrub(config) == {
        "inner.lr_init": 3e-5, "eval.max_new_tokens": 48, "model.tokenizer": "bpe",
        "tracking.entity": "team", "author": "Keyes", "notes": "1",
        "nested": {"keep": 1, "deeper": {"ok": [1, 2]}},
    }
    assert "hf_token" in config  # the input is not modified
    assert looks_secret("HF_TOKEN") and looks_secret("wandbApiKey") and not looks_secret("max_new_tokens")


def test_run_names():
    cfg = load_config()
    assert run_names(cfg) == ("embedded", "embedded", "embedded")
    assert run_names(cfg, "3f2a1_00001", "train_3f2a1_00001") == (
        "3f2a1_00001", "train_3f2a1_00001", "embedded-sweep")
    cfg = load_config(overrides=["tracking.group=ablation", "train.run_name=my_run.2"])
    assert run_names(cfg) == ("my_run.2", "my_run.2", "ablation")
    assert run_names(cfg, "t1") == ("t1", "t1", "ablation")
    assert safe_run_id(" a:b;c,d#e?f/g'h ") == "a-b-c-d-e-f-g-h"
    with pytest.raises(ValueError, match="train.run_name"):
        safe_run_id("//")


def test_reader_tolerates_a_truncated_tail(finished_run, tmp_path):
    _, run_file, _ = finished_run
    data = run_file.read_bytes()
    cut = tmp_path / "cut.wandb"
    history_start = data.rindex(b"n" * 1000)  # the run record (with the long config) comes first
    cut.write_bytes(data[: (history_start + len(data)) // 2])  # a run killed mid-write
    run = read_offline_run(cut, wait_s=0)
    assert run["exit_code"] is None and run["config"]["inner.lr_init"] == 0.1
    steps = [row["_step"] for row in run["history"]]
    assert 0 < len(steps) < len(STEPS) and steps == STEPS[: len(steps)]


def test_reader_rejects_corrupt_files(finished_run, tmp_path):
    _, run_file, _ = finished_run
    data = bytearray(run_file.read_bytes())
    data[data.index(b"n" * 1000) + 500] ^= 0xFF  # a byte inside the long config value's payload
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.wandb: checksum mismatch in the chunk at byte \d+"):
        read_offline_run(bad, wait_s=0)
    other = tmp_path / "other.wandb"
    shutil.copy(run_file, other)
    other.write_bytes(b"PK\x03\x04" + other.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"other\.wandb: not a W&B run file"):
        read_offline_run(other, wait_s=0)
