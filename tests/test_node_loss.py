"""A worker node lost mid-trial, as a preempted cloud instance is lost, with an elastic trial: on a
fake cluster with cluster/a100.yaml's node types and two ``a100`` nodes (one worker place each), a
one-trial sweep trains RECKONING with ``resources.max_workers=2``. It starts with what is free and
grows to both nodes after a validation; once it has stored a round on two workers, one node's
raylet and every process it started are SIGKILLed. Ray Train's worker group fails, and the trial
fits again from its latest checkpoint (``resources.max_failures``) with the one worker that can be
placed: it shrinks instead of waiting or failing, and grows again when the autoscaler has replaced
the node. The sweep finishes with no command from the user; its rounds in ``metrics.jsonl`` and
in the W&B run are each there once, each with the worker count that trained it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ONE_FACT, sweep_command
from wandb_files import read_offline_run_merged
from reckoning_ray.core.elastic import history_text
from reckoning_ray.ops import fake_cluster as fc
from reckoning_ray.on_ray.trainer import AUTOSCALER_CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]
A100_YAML = REPO / "cluster" / "a100.yaml"
SWEEP = "node-loss"


def node_processes(temp_dir: Path, node_type: str) -> list[int]:
    """The raylets of the fake cluster in ``temp_dir`` that stand for ``node_type`` nodes (the
    node provider starts each with ``RAY_NODE_TYPE_NAME=<the YAML's node type, ray.worker.a100>``
    in its environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        names = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RAY_NODE_TYPE_NAME=")]
        if cmdline and cmdline[0].endswith(b"raylet") and str(temp_dir).encode() in b" ".join(cmdline) \
                and any(name.rsplit(".", 1)[-1] == node_type for name in names):
            found.append(int(proc.name))
    return found


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, and so on."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_an_elastic_trial_whose_node_is_lost_shrinks_and_goes_on(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # see tests/test_cluster_sweep.py
    space = tmp_path / "space.yaml"
    space.write_text("inner.lr_init: {grid: [0.3]}\n")
    storage = tmp_path / "tune"  # a path every node of the fake cluster sees, as NFS would be
    conf = yaml.safe_load(A100_YAML.read_text())  # two a100 nodes from the start, kept (or replaced)
    conf["available_node_types"]["ray.worker.a100"].update(min_workers=2, max_workers=2)
    cluster_yaml = tmp_path / "a100-two.yaml"
    cluster_yaml.write_text(yaml.safe_dump(conf))
    with fc.fake_cluster(cluster_yaml, cpus_per_node=1, max_workers_per_type=2,
                         env={"RAY_AUTH_MODE": "disabled"}) as cluster:
        autoscaler_yaml = tmp_path / "autoscaler.yaml"
        autoscaler_yaml.write_text(yaml.safe_dump(cluster.config))
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO),
                   **{AUTOSCALER_CONFIG_ENV: str(autoscaler_yaml)})
        env.pop("WANDB_MODE", None)
        # 6 validation rounds of 4 steps each (batch 16, 128 tasks, two validations per epoch)
        command = sweep_command(space, storage, SWEEP, "resources.node_type=auto", "resources.max_failures=2",
                                "resources.max_workers=2", "data.num_train=128", "train.epochs=3",
                                "train.batch_size=16", "tune.max_rounds=6", "tune.grace_period=6",
                                "tracking.mode=offline", *ONE_FACT)
        log_path = tmp_path / "sweep.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        trials = storage / SWEEP / "trials"
        killed: list[int] = []
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not killed:
            metrics = list(trials.glob("*/metrics.jsonl"))
            rows = [json.loads(line) for line in metrics[0].read_text().splitlines()] if metrics else []
            if any(r["workers"] == 2 for r in rows):  # a round stored by the grown trial
                raylets = node_processes(cluster.temp_dir, "a100")
                assert len(raylets) == 2, raylets
                killed = [raylets[0], *descendants(raylets[0])]
                for pid in killed:  # the whole node at once, as a lost instance
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                rounds_before = len(rows)
            time.sleep(0.5)
        assert killed, log_path.read_text()[-4000:]
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log_path.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert "with the workers there are now" in output, output[-6000:]  # the trial's fit restarted

    (trial,) = [d for d in trials.iterdir() if d.is_dir()]
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert rounds_before < 6  # the node was lost before the trial's end
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    workers = [r["workers"] for r in rows]
    # it grew onto the second node, and after the loss went on with the one worker left
    assert 2 in workers[:rounds_before] and 1 in workers[rounds_before:], workers
    summary = json.loads((storage / SWEEP / "sweep_summary.json").read_text())
    (row,) = summary["trials"]
    assert row["status"] == "completed" and row["rounds"] == 6
    assert row["workers"] == history_text(workers), row
    run = read_offline_run_merged(trial, trial.name)
    history = [(h["round"], h["workers"]) for h in run["history"] if "val/answer_loss" in h]
    assert history == list(zip(range(1, 7), workers)), history  # W&B has each round's worker count
