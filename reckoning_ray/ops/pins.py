"""The node software: its pinned versions and where a text installs them.

- ``NODE_PINS``: the versions of the node software (torch, Ray, transformers, W&B, ...), the
  one place they are set. Every cluster YAML's setup commands and the README's GPU install pin
  them with ``==`` (``python -m reckoning_ray.cluster pins`` prints the command, ``pins_command``);
  ``pin_problems`` (part of ``cluster check``, :mod:`reckoning_ray.ops.checks`) fails on a YAML
  that installs them unpinned, at other versions, or not at all.
- ``pip_install_specs``: the packages a text's ``pip install`` commands install (shell lines of a
  YAML command or a Markdown code block, ``shell_lines``), to prove the cluster's
  ``setup_commands`` install what the top-level README's GPU install (``readme_section``) shows.

Plain Python: no Ray, no YAML.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any, Dict, Iterator, List, Mapping, Sequence

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


# The README's GPU install sits between these markers (in a ```bash block).
GPU_INSTALL_MARKERS = ("<!-- gpu-install:start -->", "<!-- gpu-install:end -->")


# -- the pins in a cluster YAML ---------------------------------------------------------------------

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
    fix = ("the pins are NODE_PINS in reckoning_ray/ops/pins.py; "
           "`python -m reckoning_ray.cluster pins` prints the command")
    for key in INSTALL_KEYS:
        for i, command in enumerate(cfg.get(key) or []):
            for match in re.finditer(r"\b(python[\d.]*)\s+-m\s+venv\b", str(command)):
                venvs += 1
                if match.group(1) != f"python{NODE_PYTHON}":
                    problems.append(f"{key}[{i}]: `{match.group(1)} -m venv` makes the nodes' environment with "
                                    f"whatever Python that is (Ubuntu 22.04: 3.10); use python{NODE_PYTHON} -m venv "
                                    f"(NODE_PYTHON in reckoning_ray/ops/pins.py)")
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
                        f"(NODE_PYTHON in reckoning_ray/ops/pins.py) and activate it in ~/.bashrc")
    missing = [name for name in NODE_PINS if name not in seen]
    if missing:
        problems.append(f"setup_commands install no pinned {', '.join(missing)}: add the command "
                        f"`python -m reckoning_ray.cluster pins` prints, before the project's install")
    return problems


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
