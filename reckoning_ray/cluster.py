"""Ray cluster configs under ``cluster/``: checks, per-node GPU resources, and a local fake cluster.

The cluster YAMLs (``cluster/a100.yaml`` on AWS, ``cluster/local.yaml`` on premises) give two
worker node types besides a CPU-only head: one with A100 GPUs for RECKONING trials and one with
RTX 3090-class GPUs for the in-context baseline. Ray cannot tell GPU models apart, so each type
declares a custom resource named after its GPU (``a100`` / ``rtx3090``, one unit per GPU) that the
training workers ask for (``resources.node_type``).

What is here:

- ``validate_cluster_file``: Ray's own cluster-config validation (``prepare_config`` then
  ``validate_config``, what ``ray up`` runs) followed by the project's checks of the keys Ray does
  not look into (``node_config``, ``provider``, commands): instance types, the GPU resources on the
  right node types, a head without GPUs, the shared storage path.
- ``NODE_PINS``: the versions of the node software (torch, Ray, transformers, W&B, ...), the
  one place they are set. Every cluster YAML's setup commands and the README's GPU install pin
  them with ``==`` (``python -m reckoning_ray.cluster pins`` prints the command); the check fails
  on a YAML that installs them unpinned, at other versions, or not at all.
- ``text_problems``: what must not be in a cluster YAML at all: ``YOUR-...`` placeholders and
  W&B keys (a key in a tracked file; keys travel in the job's runtime environment instead,
  ``job_runtime_env`` / ``cluster/submit_tune.py``).
- ``pip_install_specs``: the packages a text's ``pip install`` commands install, to prove the
  cluster's ``setup_commands`` install what the top-level README's GPU install shows.
- ``gpu_node_resources`` / ``python -m reckoning_ray.cluster node-resources``: the custom
  resources of a machine from its GPU names (the on-premises cluster's worker start command).
- ``fake_cluster_config`` / ``fake_cluster``: the same node types as a Ray "fake multi-node"
  autoscaling cluster on this machine (no cloud, no GPU), started with
  ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` (``ray up`` with the fake
  provider does not work in Ray 2.60) and torn down by killing exactly the processes it started.

Nothing here imports Ray at module level, so the checks run in a plain Python process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import yaml

from .config import NODE_TYPES

# Custom resources naming a GPU model, one unit per GPU; the node types of cluster/*.yaml.
GPU_NODE_TYPES = tuple(t for t in NODE_TYPES if t not in ("", "auto"))
# Substrings of nvidia-smi GPU names -> the custom resource of that model.
GPU_NAME_PATTERNS = {"a100": re.compile(r"\bA100\b", re.I), "rtx3090": re.compile(r"\b3090\b")}
# Environment variable the cluster's setup commands set on every node: where Ray Train / Tune
# write results (s3://... or a path every node mounts). cluster/submit_tune.py turns it into
# the tune.storage_path override.
STORAGE_ENV = "RECKONING_STORAGE_PATH"
# Module the cluster runs for a sweep.
TUNE_MODULE = "reckoning_ray.tune"
# The README's GPU install sits between these markers (in a ```bash block).
GPU_INSTALL_MARKERS = ("<!-- gpu-install:start -->", "<!-- gpu-install:end -->")
# The fake multi-node provider names its head node type this way (Ray 2.60, FAKE_HEAD_NODE_TYPE).
FAKE_HEAD_NODE_TYPE = "ray.head.default"
# AWS instance families with GPUs (p3, p4d, p5, g4dn, g5, g6, ...): never the head's.
_AWS_GPU_FAMILY = re.compile(r"^(p|g)\d")

# The node software, pinned to the versions the project is tested with (the CPU test install has
# torch==2.13.0 too): the one place to change them. Every cluster YAML's setup commands and the
# README's GPU install carry `pip install "torch==2.13.0" ...` (`python -m reckoning_ray.cluster
# pins` prints it); `cluster check` fails on a YAML whose pins differ. The project's
# `pip install -e ".[cluster]"` after it keeps these versions; their own dependencies (numpy,
# ...) are what pip resolves for them.
NODE_PINS: Dict[str, str] = {
    "torch": "2.13.0",
    "ray": "2.60.0",
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "wandb": "0.31.0",
    "omegaconf": "2.4.0",
    "datasets": "5.2.0",
    "tqdm": "4.70.1",
    "pyarrow": "26.0.1",
}
# The nodes' Python (their virtual environment is made with `python3.11 -m venv`): the version
# the project is tested with; transformers 5.21 and later need Python >= 3.11, while the GPU
# image of cluster/a100.yaml (Ubuntu 22.04) has 3.10 as python3.
NODE_PYTHON = "3.11"
# Extras installed with a pinned package (the project's own dependency names them).
NODE_PIN_EXTRAS: Dict[str, str] = {"ray": "default,train,tune"}
# Cluster YAML keys whose commands install software on the nodes.
INSTALL_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
# Values a user replaces before the first `ray up`, and what with.
PLACEHOLDER = re.compile(r"\bYOUR-[A-Z0-9]+(?:-[A-Z0-9]+)*")
PLACEHOLDER_HINTS = {
    "YOUR-BUCKET": "the name of an S3 bucket of yours (aws s3 mb s3://<name>)",
    "YOUR-ACCOUNT-ID": "your 12-digit AWS account id (aws sts get-caller-identity --query Account --output text)",
}
# W&B settings a submitted job takes from the submitting shell (job_runtime_env); the key never
# goes into a file.
WANDB_JOB_ENV = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_BASE_URL")
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


def ray_validate(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Ray's own validation of a cluster config, as ``ray up`` runs it; returns the prepared config.

    ``prepare_config`` merges the provider's defaults (``validate_config`` alone fails on the
    missing ``cluster_synced_files``), then ``validate_config`` checks the JSON schema (unknown
    keys, types) and the head node type. Raises Ray's exceptions (jsonschema.ValidationError,
    ValueError, click.ClickException from the local provider) unchanged.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(dict(cfg)))
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
    software pinned to ``NODE_PINS`` (``pin_problems``).
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


def pinned_specs() -> List[str]:
    """``NODE_PINS`` as pip requirement specs, e.g. ``["torch==2.13.0", "ray[default,train,tune]==2.60.0", ...]``."""
    return [f"{name}[{NODE_PIN_EXTRAS[name]}]=={version}" if name in NODE_PIN_EXTRAS else f"{name}=={version}"
            for name, version in NODE_PINS.items()]


def pins_command() -> str:
    """The ``pip install`` command that installs the node software at ``NODE_PINS``."""
    return "pip install " + " ".join(f'"{spec}"' for spec in pinned_specs())


def _requirement(spec: str) -> tuple[str, str]:
    """(normalized distribution name, version specifier) of a pip spec: ``Ray[tune]==2.60.0`` -> ("ray", "==2.60.0")."""
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(.*)", spec)
    if not match:
        return "", ""
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(3).split(";", 1)[0].strip()


def pin_problems(cfg: Mapping[str, Any]) -> List[str]:
    """Where the node software of a cluster config is not installed at ``NODE_PINS``; [] when it is.

    Each ``pip install`` of a pinned package in ``INSTALL_KEYS`` must read ``name==version`` with
    the pinned version (a local build tag such as ``+cu126`` is allowed), and every pinned package
    must be installed somewhere: otherwise each node gets whatever pip finds that day.
    """
    problems: List[str] = []
    seen: set[str] = set()
    venvs = 0
    fix = ("the pins are NODE_PINS in reckoning_ray/cluster.py; "
           "`python -m reckoning_ray.cluster pins` prints the command")
    for key in INSTALL_KEYS:
        for i, command in enumerate(cfg.get(key) or []):
            for match in re.finditer(r"\b(python[\d.]*)\s+-m\s+venv\b", str(command)):
                venvs += 1
                if match.group(1) != f"python{NODE_PYTHON}":
                    problems.append(f"{key}[{i}]: `{match.group(1)} -m venv` makes the nodes' environment with "
                                    f"whatever Python that is (Ubuntu 22.04: 3.10); use python{NODE_PYTHON} -m venv "
                                    f"(NODE_PYTHON in reckoning_ray/cluster.py)")
            try:
                specs = pip_install_specs(str(command))
            except ValueError as exc:
                problems.append(f"{key}[{i}]: {exc}")
                continue
            for spec in specs:
                name, version = _requirement(spec)
                if name not in NODE_PINS:
                    continue
                seen.add(name)
                want = NODE_PINS[name]
                exact = re.fullmatch(r"==\s*([^\s,]+)", version)
                if not exact:
                    problems.append(f"{key}[{i}]: {spec} is not pinned; install {name}=={want} ({fix})")
                elif exact.group(1).split("+", 1)[0] != want:
                    problems.append(f"{key}[{i}]: {spec} differs from the project's pin {name}=={want}; "
                                    f"install {name}=={want}, or change NODE_PINS if the project moved ({fix})")
    if not venvs:
        problems.append(f"setup_commands make no virtual environment: add `python{NODE_PYTHON} -m venv ~/venv` "
                        f"(NODE_PYTHON in reckoning_ray/cluster.py) and activate it in ~/.bashrc")
    missing = [name for name in NODE_PINS if name not in seen]
    if missing:
        problems.append(f"setup_commands install no pinned {', '.join(missing)}: add the command "
                        f"`python -m reckoning_ray.cluster pins` prints, before the project's install")
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


# -- pip install specs (README vs setup_commands) ---------------------------------------------------

# pip install options that take a value in the next argument (pip 24-25).
_PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-t", "--target", "--platform", "--python-version",
    "--implementation", "--abi", "--root", "--prefix", "--src", "--upgrade-strategy", "--progress-bar",
    "--log", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-C", "--config-settings",
    "--global-option", "--no-binary", "--only-binary", "--cache-dir", "--proxy", "--retries", "--timeout",
    "--exists-action", "--trusted-host", "--cert", "--client-cert", "--report", "--python",
    "--keyring-provider", "--use-feature", "--use-deprecated", "--root-user-action", "--group",
}
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def shell_lines(text: str) -> Iterator[str]:
    """Command lines of ``text``: backslash continuations joined, Markdown fences and ``$`` prompts dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            continue
        if line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _is_pip(words: Sequence[str]) -> int:
    """Index just after the pip program in ``words`` (0 if the command is not pip)."""
    if not words:
        return 0
    prog = os.path.basename(words[0])
    if re.fullmatch(r"pip(3(\.\d+)?)?", prog):
        return 1
    if re.fullmatch(r"python(3(\.\d+)?)?", prog) and list(words[1:3]) == ["-m", "pip"]:
        return 3
    return 0


def pip_install_specs(text: str) -> List[str]:
    """Package specs installed by the ``pip install`` commands in ``text``, in order, each once.

    ``text`` is shell (a YAML command, several joined with newlines) or a Markdown section with a
    code block. Specs keep their form without quotes or spaces: ``torch>=2.4``; an editable
    install reads ``-e .[cluster]``, a requirements file ``-r file``. Options such as ``-U`` are
    dropped. Raises ValueError for a line the shell could not split or for an unquoted version
    specifier (``pip install torch>=2.4`` redirects the output to a file named ``=2.4``).
    """
    specs: List[str] = []
    for line in shell_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:
            raise ValueError(f"cannot split shell line {line!r}: {exc}") from None
        command: List[str] = []
        for token in tokens + [";"]:
            if token not in _SHELL_OPERATORS:
                command.append(token)
                continue
            for spec in _install_specs(command, line):
                if spec not in specs:
                    specs.append(spec)
            command = []
    return specs


def _install_specs(words: List[str], line: str) -> List[str]:
    start = _is_pip(words)
    if not start or start >= len(words) or words[start] != "install":
        return []
    args = words[start + 1:]
    out: List[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if set(arg) <= set("<>&"):  # a redirection: the shell takes the next word as its target
            target = args[i + 1] if i + 1 < len(args) else ""
            if arg in (">", "<") and re.match(r"=?\d", target):
                raise ValueError(f"unquoted version specifier in {line!r}: quote it, e.g. pip install \"torch>=2.4\"")
            if out and out[-1].isdigit():  # the file descriptor of "2>&1"
                out.pop()
            i += 2
            continue
        if arg in ("-e", "--editable", "-r", "--requirement") and i + 1 < len(args):
            flag = "-e" if arg in ("-e", "--editable") else "-r"
            out.append(f"{flag} {args[i + 1].replace(' ', '')}")
            i += 2
            continue
        if arg.startswith("--editable=") or arg.startswith("--requirement="):
            flag = "-e" if arg.startswith("--editable=") else "-r"
            out.append(f"{flag} {arg.split('=', 1)[1].replace(' ', '')}")
        elif arg in _PIP_VALUE_OPTIONS:
            i += 1  # skip its value
        elif not arg.startswith("-"):
            out.append(arg.replace(" ", ""))
        i += 1
    return out


def readme_section(text: str, markers: Sequence[str] = GPU_INSTALL_MARKERS, where: str = "README.md") -> str:
    """The text between ``markers`` (start, end) in ``text``; ValueError naming ``where`` if absent."""
    start, end = markers
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"{where} has no section between {start} and {end} (the GPU install commands)")
    return text.split(start, 1)[1].split(end, 1)[0]


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


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
    gcs_port, dashboard_port = _free_port(), _free_port()
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
        "PATH": str(Path(sys.executable).parent) + os.pathsep + child_env.get("PATH", ""),
    })
    child_env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={gcs_port}", f"--num-cpus={int(cpus_per_node)}", "--num-gpus=0",
        f"--object-store-memory={int(object_store_mb) * 1024 * 1024}", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
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


# -- command line -----------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m reckoning_ray.cluster check|node-resources|pins|fake-config``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m reckoning_ray.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate cluster YAMLs (Ray's validation and the project's checks)")
    check.add_argument("paths", nargs="+", type=Path)
    sub.add_parser("node-resources", help="print this machine's GPU model resources as JSON (for ray start --resources)")
    sub.add_parser("pins", help="print the pip install command of the node software at the project's pinned versions")
    fake = sub.add_parser("fake-config", help="print the fake multi-node config derived from a cluster YAML")
    fake.add_argument("path", type=Path)
    args = parser.parse_args(argv)

    if args.command == "node-resources":
        names = detect_gpu_names()
        resources = gpu_node_resources(names)
        if not resources:
            print(f"note: no A100 or RTX 3090 among this machine's GPUs {names}; it joins without a node type",
                  file=sys.stderr)
        print(json.dumps(resources))
        return 0
    if args.command == "fake-config":
        print(yaml.safe_dump(fake_cluster_config(args.path), sort_keys=False), end="")
        return 0
    if args.command == "pins":
        print(pins_command())
        return 0
    status = 0
    for path in args.paths:
        try:
            prepared = validate_cluster_file(path)
        except ClusterConfigError as exc:  # the message names the file, then one problem a line
            print(f"FAIL {exc}", file=sys.stderr)
            status = 1
            continue
        except Exception as exc:  # Ray's errors come in several types; show them all the same way
            print(f"FAIL {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        types = {name: t.get("resources", {}) for name, t in prepared["available_node_types"].items()}
        print(f"ok   {path}: storage {storage_path(load_cluster_yaml(path))}; node types {types}")
    return status


if __name__ == "__main__":
    sys.exit(main())
