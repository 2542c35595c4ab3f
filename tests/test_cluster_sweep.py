"""The paper's tables run on a fake autoscaling cluster with cluster/a100.yaml's node types.

The paper trains RECKONING on A100s and the fine-tuned in-context baseline on RTX 3090s. With
``resources.node_type=auto`` a sweep asks for exactly that; this test runs ``paper run`` (one
Ray Tune experiment: two cells of Table 1, RECKONING and FT-ICR, tiny model, CPU, curve
stopping) on the suite-wide fake cluster, whose autoscaler adds ``a100`` and ``rtx3090`` nodes on
demand, then checks from Ray's own records where each trial's training workers ran: the Train
run of each trial (Ray Train's state, run name = trial id), the worker actors (state API: node,
required resources) and the nodes' resources (``ray.nodes()``); and ``paper report`` on the result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from conftest import PAPER_MINI
from reckoning_ray.ops import checks as rc
from reckoning_ray.core.schema import AUTO_NODE_TYPE
from reckoning_ray.on_ray.trainer import AUTOSCALER_CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]
A100_YAML = REPO / "cluster" / "a100.yaml"
SWEEP = "paper-table1"
# An actor in a placement group asks for its bundle's resources under formatted names:
# "<resource>_group_<placement group id>" and "<resource>_group_<bundle index>_<placement group id>".
_PG_RESOURCE = re.compile(r"^(?P<name>.+?)_group_(?:\d+_)?[0-9a-f]+$")


def _asked_resources(required: Dict[str, float]) -> Dict[str, float]:
    """An actor's required resources under their own names (placement-group formatting removed)."""
    out: Dict[str, float] = {}
    for key, amount in required.items():
        match = _PG_RESOURCE.match(key)
        name = match.group("name") if match else key
        if name != "bundle":  # Ray's marker resource of every bundle, not asked for by the workers
            out[name] = max(out.get(name, 0.0), amount)
    return out


def _paper_command(storage: Path, proofwriter: str) -> List[str]:
    """`paper run`: two cells of Table 1 (RECKONING, FT-ICR) on ProofWriter depth 2, one seed."""
    return [
        sys.executable, "-m", "reckoning_ray.paper", "run", "table1", *PAPER_MINI, "resources.num_workers=1",
        "resources.node_type=auto", f"tune.storage_path={storage}", "tune.max_concurrent=2",
        # curve stopping judges from the 4th round on: with one round it stops nothing, and the
        # sweep runs its scheduler on the cluster (ASHA runs in the other sweep tests)
        "tune.scheduler=curve", "--proofwriter", proofwriter, "--rows", "reckoning-mt,ft-icr-mt",
        "--columns", "pw-2", "--seeds", "1",
    ]


def _train_runs(dashboard_url: str, expected: int, timeout_s: float = 30.0) -> List[Dict[str, Any]]:
    """Ray Train's record of its runs (dashboard, Train V2 state), once ``expected`` runs have workers."""
    deadline, runs = time.time() + timeout_s, []
    while time.time() < deadline:
        with urllib.request.urlopen(f"{dashboard_url}/api/train/v2/runs/v1", timeout=10) as response:
            runs = json.loads(response.read())["train_runs"]
        if len(runs) >= expected and all(a["workers"] for r in runs for a in r["attempts"]):
            return runs
        time.sleep(1)
    return runs


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_paper_run_places_reckoning_on_a100_and_icr_on_rtx3090(fake_a100_cluster, paper_data, tmp_path: Path,
                                                             monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the fake cluster runs without token authentication
    import ray
    from ray.util.state import list_actors

    from reckoning_ray.core.config import load_config
    from reckoning_ray.paper import main as paper_main

    cluster = fake_a100_cluster
    storage = tmp_path / "tune"
    t0 = time.time()
    autoscaler_yaml = tmp_path / "autoscaler.yaml"
    autoscaler_yaml.write_text(yaml.safe_dump(cluster.config))
    env = dict(os.environ, RAY_ADDRESS=cluster.address, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env[AUTOSCALER_CONFIG_ENV] = str(autoscaler_yaml)
    sweep = subprocess.run(_paper_command(storage, paper_data["proofwriter"]), capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    sweep_s = time.time() - t0
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
    assert "2 cells x 1 seed(s) = 2 runs" in sweep.stdout
    # Neither node type was dropped as unknown to the cluster.
    assert "this cluster has none" not in sweep.stdout + sweep.stderr

    # The sweep's trials, the method each trained and its cell (the run directory's saved config).
    trials = storage / SWEEP / "trials"
    saved = {d.name: load_config(str(d / "config.yaml")) for d in trials.iterdir() if (d / "config.yaml").exists()}
    methods = {trial: str(cfg.train.method) for trial, cfg in saved.items()}
    assert sorted(methods.values()) == ["icr", "reckoning"], methods
    assert {cfg.tracking.group for cfg in saved.values()} == {"table1/reckoning-mt/pw-2", "table1/ft-icr-mt/pw-2"}

    # The report: the paper's layout, with the rows not run marked, not 0.
    assert paper_main(["report", str(storage / SWEEP), "--no-wandb"]) == 0
    report = (storage / SWEEP / "paper_report.md").read_text()
    assert "| RECKONING (MT) | pw-2 | - |" in report and "| FT-ICR (MT) | pw-2 | - |" in report
    assert "| No-Facts | pw-2 | - | not run |" in report

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
        actors = {a.actor_id: a for a in list_actors(
            address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
            raise_on_missing_output=False)}
        runs = _train_runs(cluster.dashboard_url, expected=len(methods))
    finally:
        ray.shutdown()
    kinds = [sorted(k for k in r if k in rc.GPU_NODE_TYPES) for r in nodes.values()]
    print(f"paper run took {sweep_s:.0f}s; node types: {kinds}")

    # The workers as the state API records them: each asked for one node type's resource and ran
    # on a node that has it and not the other.
    assert actors, "no RayTrainWorker actor recorded"
    placed: Dict[str, List[str]] = {gpu: [] for gpu in rc.GPU_NODE_TYPES}
    for actor in actors.values():
        required = _asked_resources(actor.required_resources)
        assert actor.placement_group_id, actor  # a Ray Train worker, in its run's placement group
        asked = [g for g in rc.GPU_NODE_TYPES if required.get(g)]
        assert len(asked) == 1 and required == {"CPU": 1.0, asked[0]: 1.0}, (actor.actor_id, actor.required_resources)
        gpu = asked[0]
        resources = nodes[actor.node_id]
        assert resources.get(gpu, 0) > 0, (gpu, actor.node_id, resources)
        assert not any(g in resources for g in rc.GPU_NODE_TYPES if g != gpu), resources
        placed[gpu].append(actor.node_id)
    assert all(placed.values()), placed
    assert not set(placed["a100"]) & set(placed["rtx3090"])

    # Each trial to its workers: Ray Train's run of a trial is named after the trial id.
    runs_by_trial = {r["name"]: r for r in runs if r["name"] in methods}  # this test's runs
    assert set(runs_by_trial) == set(methods), (sorted(r["name"] for r in runs), sorted(methods))
    for trial_id, method in methods.items():
        gpu = AUTO_NODE_TYPE[method]
        workers = [w for attempt in runs_by_trial[trial_id]["attempts"] for w in attempt["workers"]]
        assert workers, f"trial {trial_id} ({method}) has no recorded workers"
        for worker in workers:
            assert worker["resources"]["resources"] == {"CPU": 1.0, gpu: 1.0}
            assert worker["actor_id"] in actors, worker["actor_id"]
            assert actors[worker["actor_id"]].node_id == worker["node_id"]
            assert worker["node_id"] in placed[gpu], (method, worker["node_id"], placed)
