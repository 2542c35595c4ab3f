"""A fake multi-node autoscaling cluster on this machine, with a cluster YAML's node types.

``fake_cluster_config`` turns ``cluster/a100.yaml``'s node types into a Ray "fake multi-node"
autoscaling config (no cloud, no GPU: each node type keeps its custom resource, ``a100`` or
``rtx3090``); ``fake_cluster`` starts it with ``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`` (``ray up`` with the fake provider does not work in Ray 2.60) and tears
it down by killing exactly the processes it started. Local runs and the tests use it to prove
that trials land on the node type they ask for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import yaml

from reckoning_ray.on_ray.trainer import API_SERVER_ENV, free_ports
from reckoning_ray.ops.checks import ClusterConfigError, load_cluster_yaml

# The fake multi-node provider names its head node type this way (Ray 2.60, FAKE_HEAD_NODE_TYPE).
FAKE_HEAD_NODE_TYPE = "ray.head.default"


# -- fake multi-node cluster on this machine --------------------------------------------------------

def fake_cluster_config(cluster_yaml: str | Path, gcs_address: Optional[str] = None, cpus_per_node: int = 1,
                        max_workers_per_type: int = 1, object_store_mb: int = 256) -> Dict[str, Any]:
    """A Ray fake multi-node autoscaling config with the node types of ``cluster_yaml``.

    Each worker type of the source keeps its name and its resources (``a100: 8`` stays 8) except
    ``CPU`` (capped at ``cpus_per_node``, so the fake nodes fit a laptop) and ``GPU`` (0: there is
    no GPU); at most ``max_workers_per_type`` nodes of each type. The head becomes
    ``ray.head.default`` (the name the fake provider gives its head) with ``cpus_per_node`` CPUs
    and no GPU. ``gcs_address`` (host:port) tells the provider where the head's GCS listens
    (default: port 6379 of this machine). Every field the autoscaler reads without defaults
    (commands, file mounts) is filled, since the autoscaler reads this file as is.
    """
    source = load_cluster_yaml(cluster_yaml)
    types = source.get("available_node_types") or {}
    head = source.get("head_node_type")
    if not types or head not in types:
        raise ClusterConfigError(f"{cluster_yaml}: a fake cluster needs available_node_types and its "
                                 f"head_node_type (the local provider's single node type has no GPU types)")
    object_store = int(object_store_mb) * 1024 * 1024
    node_types: Dict[str, Any] = {
        FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": int(cpus_per_node), "GPU": 0}, "node_config": {},
                              "min_workers": 0, "max_workers": 0},
    }
    total = 0
    for name, node_type in types.items():
        if name == head:
            continue
        resources = {k: v for k, v in (node_type.get("resources") or {}).items() if k not in ("CPU", "GPU")}
        resources["CPU"] = min(int((node_type.get("resources") or {}).get("CPU", cpus_per_node)), int(cpus_per_node))
        resources["GPU"] = 0
        resources["object_store_memory"] = object_store
        hi = min(int(node_type.get("max_workers", max_workers_per_type)), int(max_workers_per_type))
        lo = min(int(node_type.get("min_workers", 0)), hi)
        node_types[name] = {"resources": resources, "node_config": {}, "min_workers": lo, "max_workers": hi}
        total += hi
    provider: Dict[str, Any] = {
        "type": "fake_multinode",
        # Fake nodes share this machine's IP; the autoscaler must tell them apart by node id.
        "use_node_id_as_ip": True,
        # No SSH or setup on fake nodes, and no relaunch of nodes whose config hash differs.
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    if gcs_address:
        provider["gcs_address"] = gcs_address
    return {
        "cluster_name": f"{source.get('cluster_name', 'reckoning-ray')}-fake",
        "max_workers": total,
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": source.get("idle_timeout_minutes", 5),
        "provider": provider,
        "auth": {},
        "docker": {},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": node_types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass(frozen=True)
class FakeCluster:
    """A running fake cluster: ``address`` for ``ray.init``, ``dashboard_url`` for ``ray job submit``."""

    address: str
    dashboard_url: str
    temp_dir: Path
    config: Dict[str, Any]
    log_path: Path


def _session_processes(sid: int, marker: str) -> List[int]:
    """Live (non-zombie) pids in session ``sid`` or whose command line contains ``marker``."""
    pids: List[int] = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if fields[0] == "Z":
            continue
        if int(fields[3]) == sid or marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_cluster(head: subprocess.Popen, temp_dir: Path, timeout_s: float = 20.0) -> List[int]:
    """SIGKILL every process of the cluster started as ``head``; returns the pids still alive after."""
    own = os.getpid()
    deadline = time.time() + timeout_s
    alive: List[int] = []
    while True:
        if Path("/proc").is_dir():
            alive = [p for p in _session_processes(head.pid, str(temp_dir)) if p != own]
        else:  # no /proc (macOS): the session's process group is all we can name
            alive = []
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(head.pid, signal.SIGKILL)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=0.5)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def _set_parent_death_signal() -> None:
    # Runs in the child before exec: if the process that started the cluster dies without
    # tearing it down, the kernel kills `ray start --block`, and with it the head's processes
    # (they share its fate). Linux only; elsewhere teardown relies on fake_cluster's finally.
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def fake_cluster(cluster_yaml: str | Path, cpus_per_node: int = 1, max_workers_per_type: int = 1,
                 object_store_mb: int = 256, start_timeout_s: float = 90.0,
                 env: Optional[Mapping[str, str]] = None) -> Iterator[FakeCluster]:
    """Start a fake autoscaling cluster with ``cluster_yaml``'s node types; yield it; tear it down.

    The head runs ``ray start --head --block`` in a new session with its own temp dir (short, for
    Unix socket paths) and its own free ports (GCS, dashboard, client server, dashboard agent), so
    it does not meet other Ray instances on the machine, and ``ray.init()`` without an address
    elsewhere does not find it. The autoscaler adds a worker node of a type within seconds of a
    task asking for its resource. Teardown kills exactly the processes of that session (and any
    whose command line names the temp dir), never other Ray processes: the effect of
    ``ray stop --force`` limited to this cluster. ``env`` adds environment variables for the
    cluster's processes (the interpreter's directory is put first on PATH, so a job's
    ``python`` is this one). Parameters as in ``fake_cluster_config``.
    """
    import ray.util

    temp_dir = Path(tempfile.mkdtemp(prefix="rr-ray-"))
    ip = ray.util.get_node_ip_address()
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    address = f"{ip}:{gcs_port}"
    config = fake_cluster_config(cluster_yaml, gcs_address=address, cpus_per_node=cpus_per_node,
                                 max_workers_per_type=max_workers_per_type, object_store_mb=object_store_mb)
    config_path = temp_dir / "fake_cluster.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = temp_dir / "ray_start.log"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.update({
        "RAY_FAKE_CLUSTER": "1",
        # Ray 2.60 turns token login on whenever ~/.ray/auth_token exists (any earlier local
        # ray.init writes it); the throwaway local cluster and its clients run without it
        "RAY_AUTH_MODE": "disabled",
        # The autoscaler's loop period in seconds (default 5): nodes appear sooner.
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's own processes (Ray Train's placement-group cleaner) reach this cluster's state API
        # here, not through a search for "the" local instance that finds every one on the machine
        API_SERVER_ENV: f"http://127.0.0.1:{dashboard_port}",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + child_env.get("PATH", ""),
    })
    child_env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={gcs_port}", f"--num-cpus={int(cpus_per_node)}", "--num-gpus=0",
        f"--object-store-memory={int(object_store_mb) * 1024 * 1024}", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
        "--min-worker-port=0", "--max-worker-port=0",
        f"--autoscaling-config={config_path}", "--disable-usage-stats",
    ]
    with open(log_path, "wb") as log:
        head = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_set_parent_death_signal)
    try:
        cluster = FakeCluster(address=address, dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                              temp_dir=temp_dir, config=config, log_path=log_path)
        _wait_started(head, cluster, start_timeout_s)
        yield cluster
    finally:
        left = _kill_cluster(head, temp_dir)
        if left:
            print(f"fake_cluster: processes {left} did not exit; their logs are in {temp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_started(head: subprocess.Popen, cluster: FakeCluster, timeout_s: float) -> None:
    """Wait until the head wrote its address and the dashboard answers; RuntimeError with the log if not."""
    deadline = time.time() + timeout_s
    address_file = cluster.temp_dir / "ray_current_cluster"
    while time.time() < deadline:
        if head.poll() is not None:
            break
        if address_file.exists():
            try:
                with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    tail = cluster.log_path.read_text(errors="replace")[-3000:] if cluster.log_path.exists() else ""
    state = f"exited with {head.returncode}" if head.poll() is not None else f"not ready after {timeout_s:.0f}s"
    raise RuntimeError(f"fake cluster head {state} (dashboard needs ray[default]); ray start log:\n{tail}")
