"""A paper-shaped sweep on a fake autoscaling cluster with cluster/a100.yaml's node types.

The paper trains RECKONING on A100s and the fine-tuned in-context baseline on RTX 3090s. With
``resources.node_type=auto`` the sweep asks for exactly that; this test runs the paper's method
grid (RECKONING and FT-ICR, tiny model, CPU) on a local cluster whose autoscaler adds ``a100``
and ``rtx3090`` nodes on demand, then checks from Ray's own records where each trial's training
workers ran: the Train run of each trial (Ray Train's state, run name = trial id), the worker
actors (state API: node, required resources) and the nodes' resources (``ray.nodes()``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from conftest import ONE_FACT, sweep_command
from reckoning_ray.ops import checks as rc
from reckoning_ray.ops import fake_cluster as fc
from reckoning_ray.core.config import AUTO_NODE_TYPE
from reckoning_ray.on_ray.trainer import AUTOSCALER_CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]
A100_YAML = REPO / "cluster" / "a100.yaml"
SWEEP = "paper-shaped"
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


def _sweep_command(space: Path, storage: Path) -> List[str]:
    """The sweep: the paper's method grid and placement, on the embedded tiny model."""
    return sweep_command(
        space, storage, SWEEP, "resources.node_type=auto", "tune.max_concurrent=2",
        # curve stopping judges from the 4th round on: with 2 rounds it stops nothing, and the
        # sweep runs its scheduler on the cluster (ASHA runs in the other sweep tests)
        "tracking.mode=disabled", "tune.grace_period=1", "tune.max_rounds=2", "tune.scheduler=curve",
        *ONE_FACT,  # placement is under test, not learning
    )


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
@pytest.mark.timeout(420)
def test_paper_sweep_places_reckoning_on_a100_and_icr_on_rtx3090(tmp_path: Path, monkeypatch):
    # Ray 2.60 turns token authentication on wherever ~/.ray/auth_token exists (any earlier local
    # ray.init() writes one); then the dashboard answers 401 without the token and the fake
    # cluster never reports ready. This private cluster runs without it, and so do its clients.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.util.state import list_actors

    space = tmp_path / "methods.yaml"
    space.write_text("train.method: {grid: [reckoning, icr]}\n")
    storage = tmp_path / "tune"
    t0 = time.time()
    # Ray Train keeps its run / worker records only with state tracking on, in the processes
    # that build the trainers (the trials): the cluster's environment reaches every worker.
    with fc.fake_cluster(A100_YAML, cpus_per_node=1, max_workers_per_type=1,
                         env={"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_AUTH_MODE": "disabled"}) as cluster:
        cluster_s = time.time() - t0
        autoscaler_yaml = tmp_path / "autoscaler.yaml"
        autoscaler_yaml.write_text(yaml.safe_dump(cluster.config))
        env = dict(os.environ, RAY_ADDRESS=cluster.address, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
        env[AUTOSCALER_CONFIG_ENV] = str(autoscaler_yaml)
        sweep = subprocess.run(_sweep_command(space, storage), capture_output=True, text=True, env=env,
                               cwd=tmp_path, timeout=300)
        sweep_s = time.time() - t0 - cluster_s
        assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
        # Neither node type was dropped as unknown to the cluster.
        assert "this cluster has none" not in sweep.stdout + sweep.stderr

        # The sweep's trials and the method each trained (the run directory's saved config).
        trials = storage / SWEEP / "trials"
        methods = {d.name: yaml.safe_load((d / "config.yaml").read_text())["train"]["method"]
                   for d in trials.iterdir() if (d / "config.yaml").exists()}
        assert sorted(methods.values()) == ["icr", "reckoning"], methods

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
    print(f"cluster up in {cluster_s:.0f}s, sweep took {sweep_s:.0f}s; node types: {kinds}")

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
    runs_by_trial = {r["name"]: r for r in runs}
    assert set(runs_by_trial) == set(methods), (sorted(runs_by_trial), sorted(methods))
    for trial_id, method in methods.items():
        gpu = AUTO_NODE_TYPE[method]
        workers = [w for attempt in runs_by_trial[trial_id]["attempts"] for w in attempt["workers"]]
        assert workers, f"trial {trial_id} ({method}) has no recorded workers"
        for worker in workers:
            assert worker["resources"]["resources"] == {"CPU": 1.0, gpu: 1.0}
            assert worker["actor_id"] in actors, worker["actor_id"]
            assert actors[worker["actor_id"]].node_id == worker["node_id"]
            assert worker["node_id"] in placed[gpu], (method, worker["node_id"], placed)
