"""What runs on the cluster's machines: a worker's GPU resources at ``ray start`` and a sweep job.

- ``gpu_node_resources`` / ``python -m reckoning_ray.cluster node-resources``: the custom
  resources of a machine from its GPU names (``detect_gpu_names``; the on-premises cluster's
  worker start command).
- ``tune_argv``: the arguments of ``python -m reckoning_ray.tune`` on the head, with the shared
  storage the cluster's setup commands export (``STORAGE_ENV``) as ``tune.storage_path``.
- ``job_runtime_env``: the runtime environment of a sweep submitted as a Ray job
  (``cluster/submit_tune.py``): the project and the submitter's W&B settings, never in a file.

Plain Python: no Ray, no YAML.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

# Substrings of nvidia-smi GPU names -> the custom resource of that model.
GPU_NAME_PATTERNS = {"a100": re.compile(r"\bA100\b", re.I), "rtx3090": re.compile(r"\b3090\b")}


# Environment variable the cluster's setup commands set on every node: where Ray Train / Tune
# write results (s3://... or a path every node mounts). cluster/submit_tune.py turns it into
# the tune.storage_path override.
STORAGE_ENV = "RECKONING_STORAGE_PATH"


# Module the cluster runs for a sweep.
TUNE_MODULE = "reckoning_ray.tune"


# W&B settings a submitted job takes from the submitting shell (job_runtime_env); the key never
# goes into a file.
WANDB_JOB_ENV = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL")


# -- per-machine GPU resources (on-premises workers) ------------------------------------------------

def gpu_node_resources(gpu_names: Sequence[str]) -> Dict[str, int]:
    """Custom resources of a machine with these GPUs: one unit of ``a100`` / ``rtx3090`` per GPU.

    ``gpu_names`` are nvidia-smi names (``NVIDIA A100-SXM4-40GB``, ``NVIDIA GeForce RTX 3090``);
    GPUs of other models add nothing (the machine still joins, without a node type).
    """
    out: Dict[str, int] = {}
    for name in gpu_names:
        for resource, pattern in GPU_NAME_PATTERNS.items():
            if pattern.search(name):
                out[resource] = out.get(resource, 0) + 1
    return out


def detect_gpu_names() -> List[str]:
    """Names of this machine's NVIDIA GPUs from nvidia-smi ([] without nvidia-smi or GPUs)."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


# -- tune launcher (ray submit) ---------------------------------------------------------------------

def tune_argv(argv: Sequence[str], environ: Mapping[str, str]) -> List[str]:
    """Arguments for ``python -m reckoning_ray.tune``: ``argv`` plus the cluster's storage path.

    When ``RECKONING_STORAGE_PATH`` is set (the cluster's setup commands set it on every node)
    and ``argv`` has no ``tune.storage_path=`` override, ``tune.storage_path=<it>`` is appended.
    """
    out = list(argv)
    storage = environ.get(STORAGE_ENV, "").strip()
    if storage and not any(a.startswith("tune.storage_path=") for a in out):
        out.append(f"tune.storage_path={storage}")
    return out


def job_runtime_env(environ: Mapping[str, str], working_dir: str | Path) -> Dict[str, Any]:
    """The runtime environment of a submitted sweep job: the project and the submitter's W&B settings.

    ``working_dir`` (the project) is uploaded with the job (without what ``.gitignore`` lists);
    the ``WANDB_JOB_ENV`` variables set (non-empty) in ``environ`` become ``env_vars``, which Ray
    gives the job's driver and every worker and trial it starts. Nothing is written to a file.
    """
    env_vars = {name: environ[name] for name in WANDB_JOB_ENV if environ.get(name, "").strip()}
    runtime_env: Dict[str, Any] = {"working_dir": str(working_dir)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env
