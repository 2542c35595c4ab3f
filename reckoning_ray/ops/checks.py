"""Cluster YAMLs under ``cluster/``: what ``python -m reckoning_ray.cluster check`` verifies.

The cluster YAMLs (``cluster/a100.yaml`` on AWS, ``cluster/local.yaml`` on premises) give two
worker node types besides a CPU-only head: one with A100 GPUs for RECKONING trials and one with
RTX 3090-class GPUs for the in-context baseline. Ray cannot tell GPU models apart, so each type
declares a custom resource named after its GPU (``a100`` / ``rtx3090``, one unit per GPU) that the
training workers ask for (``resources.node_type``).

What is here:

- ``validate_cluster_file``: Ray's own cluster-config validation (``prepare_config`` then
  ``validate_config``, what ``ray up`` runs) followed by the project's checks of the keys Ray does
  not look into (``node_config``, ``provider``, commands): instance types, the GPU resources on the
  right node types, a head without GPUs, the shared storage path, and the node software pinned to
  constraints.txt (``pin_problems``, :mod:`reckoning_ray.ops.pins`).
- ``text_problems``: what must not be in a cluster YAML at all: ``YOUR-...`` placeholders and
  W&B keys (a key in a tracked file; keys travel in the job's runtime environment instead,
  ``job_runtime_env`` in :mod:`reckoning_ray.ops.jobs` / ``cluster/submit_tune.py``).

Beside it: :mod:`reckoning_ray.ops.pins` (the node software's versions and the ``pip install``
commands of a text), :mod:`reckoning_ray.ops.jobs` (a machine's GPU resources, the sweep job),
:mod:`reckoning_ray.ops.fake_cluster` (the node types as a fake multi-node cluster on this machine).

Nothing here imports Ray at module level, so the checks run in a plain Python process.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from reckoning_ray.core.schema import NODE_TYPES
from reckoning_ray.ops.jobs import STORAGE_ENV
from reckoning_ray.ops.pins import pin_problems

# Custom resources naming a GPU model, one unit per GPU; the node types of cluster/*.yaml.
GPU_NODE_TYPES = tuple(t for t in NODE_TYPES if t not in ("", "auto"))


# AWS instance families with GPUs (p3, p4d, p5, g4dn, g5, g6, ...): never the head's.
_AWS_GPU_FAMILY = re.compile(r"^(p|g)\d")


# Values a user replaces before the first `ray up`, and what with.
PLACEHOLDER = re.compile(r"\bYOUR-[A-Z0-9]+(?:-[A-Z0-9]+)*")


PLACEHOLDER_HINTS = {
    "YOUR-BUCKET": "the name of an S3 bucket of yours (aws s3 mb s3://<name>)",
    "YOUR-ACCOUNT-ID": "your 12-digit AWS account id (aws sts get-caller-identity --query Account --output text)",
}


# A W&B key given a value in a file: `WANDB_API_KEY=...`, `WANDB_API_KEY: ...`, `wandb login KEY`
# (a `$VARIABLE` reference is no key).
_WANDB_KEY_ASSIGNMENT = re.compile(r"WANDB_API_KEY[\"']?\s*[=:]\s*[\"']?(?P<value>[^\s\"'#;,}]*)")


_WANDB_LOGIN_KEY = re.compile(r"\bwandb\s+login\s+(?:--\S+\s+)*(?P<value>[^\s\"'#;-][^\s\"'#;]*)")


class ClusterConfigError(ValueError):
    """A cluster YAML problem; the message names the file, the key and the fix."""


# -- reading and checking cluster YAMLs -------------------------------------------------------------

def load_cluster_yaml(path: str | Path) -> Dict[str, Any]:
    """The cluster YAML at ``path`` as a dict (ClusterConfigError if unreadable or not a mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterConfigError(f"cannot read cluster config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: a cluster config is a YAML mapping, got {type(data).__name__}")
    return data


def ray_validate(cfg: Mapping[str, Any], prepare: bool = True) -> Dict[str, Any]:
    """Ray's own validation of a cluster config, as ``ray up`` runs it; returns the prepared config.

    ``prepare_config`` merges the provider's defaults (``validate_config`` alone fails on the
    missing ``cluster_synced_files``), then ``validate_config`` checks the JSON schema (unknown
    keys, types) and the head node type. ``prepare=False``: the config as given, for one the
    autoscaler reads raw (the fake cluster's). Raises Ray's exceptions (jsonschema.ValidationError,
    ValueError, click.ClickException from the local provider) unchanged.
    """
    # Private API (ray==2.60.0): Ray has no public call that validates a cluster config without
    # launching it (`ray up` has no dry run); these two are what `ray up` runs first.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(dict(cfg))) if prepare else copy.deepcopy(dict(cfg))
    validate_config(prepared)
    return prepared


def cluster_commands(cfg: Mapping[str, Any], *keys: str) -> List[str]:
    """The shell commands under ``keys`` (e.g. "setup_commands") of a cluster config, in order."""
    out: List[str] = []
    for key in keys:
        out += [str(c) for c in (cfg.get(key) or [])]
    return out


def storage_path(cfg: Mapping[str, Any]) -> Optional[str]:
    """The value the setup / start commands export as ``RECKONING_STORAGE_PATH`` (None if never set)."""
    pattern = re.compile(r"\bexport\s+" + STORAGE_ENV + r"=([^\s'\";]+)")
    found = None
    for command in cluster_commands(cfg, "setup_commands", "head_setup_commands", "head_start_ray_commands"):
        for match in pattern.finditer(command):
            found = match.group(1)
    return found


def project_problems(cfg: Mapping[str, Any]) -> List[str]:
    """What the project relies on in a cluster config that Ray does not check; [] when all is fine.

    Each problem names the key and the fix. Checked: node types (AWS: instance types, the GPU
    custom resources on exactly the worker types with that GPU, one unit per GPU, min_workers <=
    max_workers, a head with ``GPU: 0`` on a CPU instance) or, on premises, that workers declare
    their GPU resources at ``ray start`` and the head takes no GPU work; the shared storage path
    (s3:// on AWS, with an instance profile on the workers that write to it); and the node
    software installed with constraints.txt (``pin_problems``).
    """
    problems: List[str] = pin_problems(cfg)
    provider = (cfg.get("provider") or {}).get("type")
    storage = storage_path(cfg)
    if storage is None:
        problems.append(
            f"no shared storage path: add a setup command exporting {STORAGE_ENV}=s3://YOUR-BUCKET/reckoning-ray "
            f"(Ray Train/Tune results of a multi-node run need one place every node writes to)")
    if provider == "local":
        problems += _local_problems(cfg, storage)
    else:
        problems += _node_type_problems(cfg, provider, storage)
    return problems


def _node_type_problems(cfg: Mapping[str, Any], provider: Any, storage: Optional[str]) -> List[str]:
    problems: List[str] = []
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if not types:
        return ["available_node_types is missing: declare the head and the a100 / rtx3090 worker node types"]
    if not head:
        # Ray fills in its default head type silently (and accepts it if such a type exists).
        problems.append(f"head_node_type is missing: name the CPU head type, one of {sorted(types)}")
    for name, node_type in types.items():
        key = f"available_node_types.{name}"
        node_config = node_type.get("node_config") or {}
        resources = node_type.get("resources") or {}
        if provider == "aws" and not node_config.get("InstanceType"):
            problems.append(f"{key}.node_config.InstanceType is missing: name the EC2 instance type")
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(f"{key}: min_workers={lo} is above max_workers={hi}; lower min_workers or raise max_workers")
        if name == head:
            if resources.get("GPU") != 0:
                problems.append(f"{key}.resources.GPU must be 0 (the head takes no GPU work), got {resources.get('GPU')!r}")
            declared = [t for t in GPU_NODE_TYPES if resources.get(t)]
            if declared:
                problems.append(f"{key}.resources declares {declared}: GPU model resources belong on worker types only")
            instance = str(node_config.get("InstanceType", ""))
            if provider == "aws" and _AWS_GPU_FAMILY.match(instance):
                problems.append(f"{key}.node_config.InstanceType={instance} is a GPU instance; the head should be a CPU type (e.g. m5.2xlarge)")
    for gpu in GPU_NODE_TYPES:
        carriers = [n for n, t in types.items() if n != head and (t.get("resources") or {}).get(gpu)]
        if not carriers:
            problems.append(f"no worker node type declares the custom resource '{gpu}': add it to the resources "
                            f"of the {gpu} node type, one unit per GPU (e.g. {{GPU: 8, {gpu}: 8}})")
        for name in carriers:
            resources = types[name].get("resources") or {}
            others = [t for t in GPU_NODE_TYPES if t != gpu and resources.get(t)]
            if others:
                problems.append(f"available_node_types.{name}.resources declares both '{gpu}' and {others}: one GPU model per node type")
            if resources.get(gpu) != resources.get("GPU"):
                problems.append(f"available_node_types.{name}.resources: {gpu}={resources.get(gpu)!r} should equal "
                                f"GPU={resources.get('GPU')!r} (one unit per GPU; workers ask for one per GPU they use)")
            if types[name].get("max_workers", 1) < 1:
                problems.append(f"available_node_types.{name}.max_workers is 0: the {gpu} trials could never start")
    if provider == "aws" and storage is not None:
        if not storage.startswith("s3://"):
            problems.append(f"{STORAGE_ENV}={storage}: on AWS use an S3 URI (s3://YOUR-BUCKET/reckoning-ray)")
        for name, node_type in types.items():
            if name != head and "IamInstanceProfile" not in (node_type.get("node_config") or {}):
                problems.append(f"available_node_types.{name}.node_config.IamInstanceProfile is missing: workers write "
                                f"results to {storage} and need an instance profile with S3 access")
    return problems


def _local_problems(cfg: Mapping[str, Any], storage: Optional[str]) -> List[str]:
    problems: List[str] = []
    provider = cfg.get("provider") or {}
    worker_ips = provider.get("worker_ips") or []
    if not provider.get("head_ip") or not worker_ips:
        problems.append("provider.head_ip and provider.worker_ips are needed: the machines' addresses")
    lo, hi = cfg.get("min_workers", len(worker_ips)), cfg.get("max_workers", len(worker_ips))
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problems.append(f"min_workers={lo} is above max_workers={hi}; lower min_workers or raise max_workers")
    head_start = " ".join(cluster_commands(cfg, "head_start_ray_commands"))
    if "--num-gpus=0" not in head_start:
        problems.append("head_start_ray_commands: `ray start --head` needs --num-gpus=0 (the head takes no GPU work)")
    worker_start = " ".join(cluster_commands(cfg, "worker_start_ray_commands"))
    if "--resources" not in worker_start or "reckoning_ray.cluster node-resources" not in worker_start:
        problems.append("worker_start_ray_commands: `ray start` must declare the GPU model resources with "
                        "--resources=\"$(python -m reckoning_ray.cluster node-resources)\" (the local provider "
                        "takes no available_node_types)")
    if storage is not None and not (storage.startswith(("s3://", "gs://", "/")) or storage.startswith("~")):
        problems.append(f"{STORAGE_ENV}={storage}: use s3://... or an absolute path every machine mounts (NFS)")
    return problems


def text_problems(text: str) -> List[str]:
    """What a cluster YAML's text must not hold anywhere, comments included; one problem per line.

    ``YOUR-...`` placeholders (fill them in before ``ray up``) and W&B keys: a
    ``WANDB_API_KEY`` given a value or a ``wandb login <key>`` puts the key in a file that is
    tracked and copied to every node; ``cluster/submit_tune.py`` passes the key from the
    submitting shell through the job's runtime environment instead. The key itself is never
    repeated in a message.
    """
    problems: List[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for name in dict.fromkeys(PLACEHOLDER.findall(line)):
            hint = PLACEHOLDER_HINTS.get(name, "your own value")
            problems.append(f"line {number}: placeholder {name}: replace it with {hint} (cluster/README.md, "
                            f"'Before the first start')")
        assignment = _WANDB_KEY_ASSIGNMENT.search(line)
        login = _WANDB_LOGIN_KEY.search(line)
        for found, what in ((assignment, "WANDB_API_KEY is given a value"), (login, "`wandb login` is given a key")):
            if found and found.group("value") and not found.group("value").startswith("$"):
                problems.append(f"line {number}: {what} in this file: delete it (a key in a tracked file "
                                f"leaks with the file) and submit with `python cluster/submit_tune.py --address "
                                f"...`, which passes WANDB_API_KEY from your shell through the job's runtime "
                                f"environment")
    return problems


def validate_cluster_file(path: str | Path) -> Dict[str, Any]:
    """Ray's validation then the project's checks of the cluster YAML at ``path``.

    Returns Ray's prepared config. Ray's own errors propagate unchanged (see ``ray_validate``);
    the project's problems (``text_problems`` of the file, then ``project_problems``) raise one
    ClusterConfigError listing them all, one line each.
    """
    cfg = load_cluster_yaml(path)
    prepared = ray_validate(cfg)
    problems = text_problems(Path(path).read_text()) + project_problems(cfg)
    if problems:
        raise ClusterConfigError(f"{path}:\n  - " + "\n  - ".join(problems))
    return prepared
