"""The node software: one constraints file, and the install line every machine runs with it.

- ``constraints.txt`` (the repository's top level) pins every package the project installs, its
  dependencies' dependencies too, at the versions CI tests. CI, the README's GPU install and every
  cluster YAML's ``setup_commands`` install with ``pip install -c constraints.txt ...``, so the
  nodes run exactly what CI tested. ``node_pins`` reads it.
- ``INSTALL_COMMAND``: the nodes' install line (``python -m reckoning_ray.cluster pins`` prints it);
  ``pin_problems`` (part of ``cluster check``, :mod:`reckoning_ray.ops.checks`) fails on a YAML whose
  ``pip install`` runs without the constraints file, that never installs the project, or that makes
  the nodes' environment with another Python than ``NODE_PYTHON``.

Plain Python: no Ray, no YAML.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping

# The repository checkout this module lives in (the cluster tools run from one: the YAMLs mount it).
REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS_FILE = "constraints.txt"


# The nodes' Python (their virtual environment is made with `python3.11 -m venv`): the version
# the project is tested with; transformers 5.21 and later need Python >= 3.11, while the GPU
# image of cluster/a100.yaml (Ubuntu 22.04) has 3.10 as python3.
NODE_PYTHON = "3.11"


# The install line of every node, run in the repository (the YAMLs mount it at ~/reckoning-ray).
INSTALL_COMMAND = f'pip install -c {CONSTRAINTS_FILE} -e ".[cluster]"'


# Cluster YAML keys whose commands install software on the nodes.
INSTALL_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")


# The README's GPU install sits between these markers (in a ```bash block).
GPU_INSTALL_MARKERS = ("<!-- gpu-install:start -->", "<!-- gpu-install:end -->")


class PinsError(ValueError):
    """The constraints file is missing or unreadable."""


def constraints_path(repo: Path = REPO) -> Path:
    return repo / CONSTRAINTS_FILE


def normalize(name: str) -> str:
    """A distribution name as pip compares them: ``PyYAML`` -> ``pyyaml``, ``ray_cpp`` -> ``ray-cpp``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def node_pins(path: Path | None = None) -> Dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line of the constraints file."""
    path = path or constraints_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise PinsError(f"cannot read {path} ({exc}); the node pins live in the repository's "
                        f"{CONSTRAINTS_FILE}: run this from a checkout") from None
    pins: Dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not match:
            raise PinsError(f"{path}:{number}: {raw.strip()!r} is not a name==version pin")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def pins_command() -> str:
    """The nodes' install line (run in the repository)."""
    return INSTALL_COMMAND


# pip run as a program (pip, pip3, pip3.11) or as a module (python -m pip, python3.11 -m pip)
_PIP = re.compile(r"^(?:pip(?:3(?:\.\d+)?)?|python(?:3(?:\.\d+)?)?\s+-m\s+pip)$")


def pip_installs(command: str) -> List[List[str]]:
    """The arguments after ``pip install`` of each ``pip install`` in a shell command (split at
    ``&&``, ``||``, ``;`` and ``|``); ValueError for a command the shell could not split."""
    found = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        try:
            words = shlex.split(segment)
        except ValueError as exc:
            raise ValueError(f"cannot split shell command {segment.strip()!r}: {exc}") from None
        for i in range(1, len(words)):
            if words[i] == "install" and _PIP.match(" ".join(w.rsplit("/", 1)[-1] for w in words[:i])):
                found.append(words[i + 1:])
                break
    return found


def _constrained(args: List[str]) -> bool:
    for i, arg in enumerate(args):
        value = None
        if arg in ("-c", "--constraint") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--constraint="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2:
            value = arg[2:]
        if value is not None and Path(value).name == CONSTRAINTS_FILE:
            return True
    return False


def pin_problems(cfg: Mapping[str, Any]) -> List[str]:
    """Where a cluster config's node software would not be what CI tested; [] when it is.

    Every ``pip install`` in ``INSTALL_KEYS`` must pass ``-c constraints.txt`` (else that node gets
    whatever pip finds that day), one of them must install the project with its ``cluster`` extra,
    and the nodes' virtual environment must be made with ``python{NODE_PYTHON}``.
    """
    problems: List[str] = []
    venvs = 0
    installs_project = False
    fix = f"install with the constraints file: `{INSTALL_COMMAND}` in ~/reckoning-ray " \
          "(`python -m reckoning_ray.cluster pins` prints it)"
    for key in INSTALL_KEYS:
        for i, command in enumerate(cfg.get(key) or []):
            for match in re.finditer(r"\b(python[\d.]*)\s+-m\s+venv\b", str(command)):
                venvs += 1
                if match.group(1) != f"python{NODE_PYTHON}":
                    problems.append(f"{key}[{i}]: `{match.group(1)} -m venv` makes the nodes' environment with "
                                    f"whatever Python that is (Ubuntu 22.04: 3.10); use python{NODE_PYTHON} -m venv "
                                    f"(NODE_PYTHON in reckoning_ray/ops/pins.py)")
            try:
                installs = pip_installs(str(command))
            except ValueError as exc:
                problems.append(f"{key}[{i}]: {exc}")
                continue
            for args in installs:
                if not _constrained(args):
                    problems.append(f"{key}[{i}]: `pip install {shlex.join(args)}` runs without {CONSTRAINTS_FILE}, "
                                    f"so the node may get other versions than CI tested; {fix}")
                if any(a.replace('"', "").endswith(".[cluster]") for a in args):
                    installs_project = True
    if not venvs:
        problems.append(f"setup_commands make no virtual environment: add `python{NODE_PYTHON} -m venv ~/venv` "
                        f"(NODE_PYTHON in reckoning_ray/ops/pins.py) and activate it in ~/.bashrc")
    if not installs_project:
        problems.append(f"setup_commands never install the project: {fix}")
    return problems


def readme_section(text: str, markers=GPU_INSTALL_MARKERS, where: str = "README.md") -> str:
    """The text between ``markers`` (start, end) in ``text``; ValueError naming ``where`` if absent."""
    start, end = markers
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"{where} has no section between {start} and {end} (the GPU install commands)")
    return text.split(start, 1)[1].split(end, 1)[0]
