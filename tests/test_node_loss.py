"""A worker node lost mid-trial, as a preempted cloud instance is lost: on a fake autoscaling
cluster with cluster/a100.yaml's node types, a one-trial sweep trains RECKONING on an ``a100``
node; once the trial has stored its first validation round, that node's raylet and every process
it started are SIGKILLed. Ray Train's worker group fails, the trial fits again from its latest
checkpoint (``resources.max_failures``) on a new ``a100`` node that the autoscaler adds, and the
sweep finishes with no command from the user. Its rounds in ``metrics.jsonl`` and in the W&B run
are each there once."""

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
def test_a_trial_whose_node_is_lost_goes_on_on_a_new_node(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # see tests/test_cluster_sweep.py
    space = tmp_path / "space.yaml"
    space.write_text("inner.lr_init: {grid: [0.3]}\n")
    storage = tmp_path / "tune"  # a path every node of the fake cluster sees, as NFS would be
    # two a100 nodes at most: the autoscaler adds the replacement while the lost one is still listed
    with fc.fake_cluster(A100_YAML, cpus_per_node=1, max_workers_per_type=2,
                         env={"RAY_AUTH_MODE": "disabled"}) as cluster:
        autoscaler_yaml = tmp_path / "autoscaler.yaml"
        autoscaler_yaml.write_text(yaml.safe_dump(cluster.config))
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO),
                   **{AUTOSCALER_CONFIG_ENV: str(autoscaler_yaml)})
        env.pop("WANDB_MODE", None)
        # 4 validation rounds of 4 steps each (batch 16, 128 tasks, two validations per epoch)
        command = sweep_command(space, storage, SWEEP, "resources.node_type=auto", "resources.max_failures=2",
                                "data.num_train=128", "train.epochs=2", "train.batch_size=16",
                                "tune.max_rounds=4", "tune.grace_period=4", "tracking.mode=offline", *ONE_FACT)
        log_path = tmp_path / "sweep.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
        trials = storage / SWEEP / "trials"
        killed: list[int] = []
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not killed:
            metrics = list(trials.glob("*/metrics.jsonl"))
            if metrics and metrics[0].read_text().strip():  # the trial's first round is stored
                raylets = node_processes(cluster.temp_dir, "a100")
                assert len(raylets) == 1, raylets
                killed = [raylets[0], *descendants(raylets[0])]
                for pid in killed:  # the whole node at once, as a lost instance
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                rounds_before = len(metrics[0].read_text().splitlines())
            time.sleep(0.5)
        assert killed, log_path.read_text()[-4000:]
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log_path.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert "from the latest checkpoint" in output, output[-6000:]  # the trial's fit restarted

    (trial,) = [d for d in trials.iterdir() if d.is_dir()]
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert rounds_before < 4  # the node was lost before the trial's end
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows] == [4, 8, 12, 16]
    summary = json.loads((storage / SWEEP / "sweep_summary.json").read_text())
    (row,) = summary["trials"]
    assert row["status"] == "completed" and row["rounds"] == 4
    run = read_offline_run_merged(trial, trial.name)
    history = [h["round"] for h in run["history"] if "val/answer_loss" in h]
    assert history == [1, 2, 3, 4], history
