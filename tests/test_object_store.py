"""Every result of a sweep lives in its object store: a sweep on a fake multi-node cluster with
``tune.storage_path=s3://...`` on a real S3-compatible server (``tests/s3_server.py``), interrupted,
its cluster torn down (Ray's temporary directory goes with it) and every node's local run files
deleted, then resumed by a fresh driver on a new cluster; while the resumed sweep trains, the store
goes away for 25 s and comes back (a proxy in front of the server closes its port). What is
checked is read from the bucket alone, with pyarrow, after every local copy is gone: the sweep's table, its best config, every
trial's metrics, checkpoints (loadable models) and W&B runs; and ``publish`` and ``soup`` read
the sweep from the bucket too (the soups are written back to it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ONE_FACT, sweep_command
from s3_server import StoreProxy, create_bucket, download, s3_server
from wandb_files import read_offline_run_merged
from reckoning_ray.ops import fake_cluster as fc
from reckoning_ray.core.storage import CACHE_ENV
from reckoning_ray.on_ray.trainer import AUTOSCALER_CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]
A100_YAML = REPO / "cluster" / "a100.yaml"
SWEEP = "bucket-sweep"
STORAGE = "s3://results/sweeps"
OUTAGE_S = 25


def _command(space: Path) -> list[str]:
    # resources.node_type=auto: RECKONING trains on an a100 node, not on the head where the driver runs
    return sweep_command(space, STORAGE, SWEEP, "resources.node_type=auto", "tune.max_concurrent=1",
                         "tune.grace_period=1", "tune.max_rounds=2", "tracking.mode=offline", *ONE_FACT)


def _bucket_files(s3env: dict, prefix: str) -> list[str]:
    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=s3env["AWS_ENDPOINT_URL"], access_key=s3env["AWS_ACCESS_KEY_ID"],
                         secret_key=s3env["AWS_SECRET_ACCESS_KEY"], region=s3env["AWS_DEFAULT_REGION"])
    infos = s3.get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == fs.FileType.File]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_from_the_bucket_alone(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # see tests/test_cluster_sweep.py
    space = tmp_path / "space.yaml"
    space.write_text("inner.lr_init: {grid: [0.3, 0.001]}\n")
    node_cache = tmp_path / "node-cache"  # the local run files of every node of the cluster
    with s3_server(tmp_path) as direct:
        create_bucket(direct, "results")
        proxy = StoreProxy(direct)  # the store as every process of the sweep reaches it
        s3env = proxy.env
        cluster_env = {**s3env, CACHE_ENV: str(node_cache), "RAY_AUTH_MODE": "disabled"}

        def driver_env(cluster: fc.FakeCluster, cache: Path) -> dict:
            autoscaler_yaml = tmp_path / "autoscaler.yaml"
            autoscaler_yaml.write_text(yaml.safe_dump(cluster.config))
            env = dict(os.environ, **s3env, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO))
            env.update({CACHE_ENV: str(cache), AUTOSCALER_CONFIG_ENV: str(autoscaler_yaml)})
            env.pop("WANDB_MODE", None)
            return env

        # 1. the sweep, interrupted once its first trial has stored its final summary
        with fc.fake_cluster(A100_YAML, cpus_per_node=1, max_workers_per_type=1, env=cluster_env) as cluster:
            ray_temp = cluster.temp_dir
            log = open(tmp_path / "first.log", "w")
            proc = subprocess.Popen(_command(space), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    env=driver_env(cluster, tmp_path / "driver-cache-1"))
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if any(p.endswith("/summary.json") for p in _bucket_files(s3env, f"results/sweeps/{SWEEP}/trials")):
                    break
                time.sleep(1)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            proc.send_signal(signal.SIGINT)  # Tune saves its experiment state and stops
            proc.wait(timeout=180)
        assert not ray_temp.exists()  # Ray's temporary directory went with the cluster
        for cache in (node_cache, tmp_path / "driver-cache-1"):
            shutil.rmtree(cache)
        stored = _bucket_files(s3env, f"results/sweeps/{SWEEP}")
        first = {p.split("/")[4] for p in stored if p.endswith("/summary.json")}
        assert len(first) == 1, stored
        assert any(p.endswith("/sweep_config.yaml") for p in stored), stored

        # 2. a fresh driver on a new cluster resumes it from the bucket; once the other trial has
        # stored a round, the store goes away for OUTAGE_S seconds (every process's S3 connections
        # go through the proxy): longer than resources.max_failures=2 restarts would last if a failed
        # upload stopped a worker, as it did before uploads waited in the background
        with fc.fake_cluster(A100_YAML, cpus_per_node=1, max_workers_per_type=1, env=cluster_env) as cluster:
            log2 = open(tmp_path / "second.log", "w")
            proc = subprocess.Popen(_command(space) + ["--resume"], stdout=log2, stderr=subprocess.STDOUT,
                                    cwd=tmp_path, env=driver_env(cluster, tmp_path / "driver-cache-2"))
            deadline, outage = time.time() + 300, None
            while time.time() < deadline and proc.poll() is None and outage is None:
                stored = _bucket_files(direct, f"results/sweeps/{SWEEP}/trials")
                if any(p.endswith("/metrics.jsonl") and p.split("/")[4] not in first for p in stored):
                    proxy.down()
                    outage = time.time()
                    time.sleep(OUTAGE_S)
                    proxy.up()
                time.sleep(0.5)
            try:
                proc.wait(timeout=400)
            finally:
                if proc.poll() is None:
                    proc.kill()
        resumed = (tmp_path / "second.log").read_text()
        assert outage is not None, resumed[-4000:]
        assert proc.returncode == 0, resumed[-6000:]
        assert "best config:" in resumed and "test acc" in resumed
        # the sweep said the store was away (a worker's upload, the driver's, or its final pull,
        # whichever met the outage), and went on
        assert "unreachable" in resumed, resumed[-6000:]
        assert "restart 1 of" not in resumed  # no training restarted for the store's sake
        for cache in (node_cache, tmp_path / "driver-cache-2"):
            shutil.rmtree(cache, ignore_errors=True)

        # 3. everything, from the bucket alone
        got = download(s3env, f"{STORAGE}/{SWEEP}", tmp_path / "bucket")
        summary = json.loads((got / "sweep_summary.json").read_text())
        rows = summary["trials"]
        assert sorted(r["inner.lr_init"] for r in rows) == [0.001, 0.3], rows
        assert all(r["best"] is not None and r["status"] in ("completed", "ASHA stop") for r in rows), rows
        assert summary["best_checkpoint"].startswith(f"{STORAGE}/{SWEEP}/trials/{summary['best_trial']}/checkpoints/")
        best_config = yaml.safe_load((got / "best_config.yaml").read_text())
        best_row = next(r for r in rows if r["trial"] == summary["best_trial"])
        assert best_config["inner"]["lr_init"] == best_row["inner.lr_init"]
        assert (got / "sweep_config.yaml").is_file() and (got / "asha_state.json").is_file()
        # the pictures the sweep drew at its end were copied to the bucket beside its files
        assert all((got / "report" / name).stat().st_size > 0
                   for name in ("curves.png", "keys.png", "test_by_hops.png", "report.html"))

        from reckoning_ray.core.checkpoint import load_pretrained, read_record

        for r in rows:
            run_dir = got / "trials" / r["trial"]
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # the trial finished on the first cluster was not trained again
            assert [m["round"] for m in metrics] == list(range(1, len(metrics) + 1)) and len(metrics) >= r["rounds"]
            record = read_record(run_dir)
            assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted({record["latest"], record["best"]})
            model = load_pretrained(run_dir)  # the best checkpoint, a model on its own
            assert model.meta_parameters()
            test = json.loads((run_dir / "summary.json").read_text())["test"]
            assert test["test/tasks"] > 0 and r["test"]["test/label_accuracy"] == test["test/label_accuracy"]
            run = read_offline_run_merged(run_dir, r["trial"])  # its W&B run, from the bucket's files
            history = [h for h in run["history"] if "val/answer_loss" in h]
            assert [h["round"] for h in history] == [m["round"] for m in metrics]
            assert run["summary"]["trial/status"] == r["status"]
            assert run["summary"]["test/label_accuracy"] == test["test/label_accuracy"]
        assert {r["trial"] for r in rows} >= first

        # 4. publish reads the sweep from the bucket (dry run: W&B is not reachable here)
        env = dict(os.environ, **s3env, PYTHONPATH=str(REPO), **{CACHE_ENV: str(tmp_path / "publisher")})
        published = subprocess.run([sys.executable, "-m", "reckoning_ray.tune", "publish", f"{STORAGE}/{SWEEP}",
                                    "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
        assert published.returncode == 0, published.stdout[-3000:] + published.stderr[-3000:]
        for r in rows:
            assert r["trial"] in published.stdout
        assert "mark the W&B sweep finished" in published.stdout

        # 5. soups of the sweep, from the bucket and back into it
        env[CACHE_ENV] = str(tmp_path / "cook")
        souped = subprocess.run([sys.executable, "-m", "reckoning_ray.tune", "soup", f"{STORAGE}/{SWEEP}"],
                                capture_output=True, text=True, env=env, timeout=300)
        assert souped.returncode == 0, souped.stdout[-3000:] + souped.stderr[-3000:]
        stored = _bucket_files(s3env, f"results/sweeps/{SWEEP}/soups")
        assert any(p.endswith("soups/soups.json") for p in stored), stored
        assert any(p.endswith("soups/greedy/model.safetensors") for p in stored), stored
