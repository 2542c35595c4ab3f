"""What `pip install` promises is what runs. The wheel, built from a copy of the sources, carries
what the entry points read: the search spaces (tune_spaces/, shipped as reckoning_ray/tune_spaces/)
and the presets (reckoning_ray/conf/). Installed with its declared dependencies only (no extras,
at the versions of constraints.txt, from the package index) into a fresh virtual environment, it
answers ``python -m reckoning_ray.tune --help`` from outside the repository, loads every space and
every preset from the installed copy, and runs a ``tune.scheduler=curve`` sweep (curve stopping
imports scipy). An editable install of the same sources still finds the top-level tune_spaces/."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

import reckoning_ray
from conftest import ONE_FACT

REPO = Path(__file__).resolve().parents[1]
# What a wheel needs of the sources (pyproject.toml names README.md as the long description).
SOURCES = ("pyproject.toml", "README.md", "reckoning_ray", "tune_spaces")
QUIET_PIP = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _pyproject() -> Dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _source_packages() -> List[str]:
    """reckoning_ray and every directory under it holding Python files or YAML, as package names."""
    found = []
    for directory in [REPO / "reckoning_ray", *sorted((REPO / "reckoning_ray").rglob("*"))]:
        if directory.is_dir() and directory.name != "__pycache__" and \
                any(f.suffix in (".py", ".yaml") for f in directory.iterdir()):
            found.append(".".join(directory.relative_to(REPO).parts))
    return found


def test_pyproject_lists_every_package_and_maps_the_spaces():
    tool = _pyproject()["tool"]["setuptools"]
    listed = tool["packages"]
    missing = sorted(set(_source_packages()) - set(listed))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (the wheel would lack them)"
    assert sorted(listed) == sorted(_source_packages() + ["reckoning_ray.tune_spaces"])
    assert tool["package-dir"] == {"reckoning_ray.tune_spaces": "tune_spaces"}
    assert tool["package-data"] == {"reckoning_ray": ["conf/*.yaml"], "reckoning_ray.core": ["paper_numbers.csv"],
                                    "reckoning_ray.tune_spaces": ["*.yaml"]}


def test_spaces_dir_of_this_install():
    from reckoning_ray.core import spaces as tune

    package = Path(reckoning_ray.__file__).resolve().parent
    # a wheel's copy inside the package, else (source tree, editable install) the top-level directory
    expected = package / "tune_spaces" if (package / "tune_spaces").is_dir() else package.parent / "tune_spaces"
    assert tune.SPACES_DIR == expected
    shipped = sorted(p.name for p in (REPO / "tune_spaces").glob("*.yaml"))
    assert sorted(p.name for p in tune.SPACES_DIR.glob("*.yaml")) == shipped


# -- build, install, run ---------------------------------------------------------------------------

def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def _run(command: List[str], cwd: Path, env: Dict[str, str] | None = None, timeout: float = 120) -> str:
    # no PYTHONPATH unless given: the fresh environment must import what it installed
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update({**QUIET_PIP, **(env or {})})
    out = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _fresh_venv(path: Path) -> Path:
    """A virtual environment of its own: its pip, none of this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=180)
    return path / "bin" / "python"


# Runs in the fresh environment: --help with Ray's init made to fail, then every space and preset.
PROBE = r"""
import contextlib, io, json, runpy, sys
from pathlib import Path
import ray

def no_init(*args, **kwargs):
    raise AssertionError("--help started Ray")

ray.init = no_init
help_text = io.StringIO()
sys.argv = ["reckoning_ray.tune", "--help"]
with contextlib.redirect_stdout(help_text):
    try:
        runpy.run_module("reckoning_ray.tune", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
import reckoning_ray
from reckoning_ray.core import spaces as tune
from reckoning_ray.core.config import available_presets, load_config

spaces = sorted(p.stem for p in tune.SPACES_DIR.glob("*.yaml"))
presets = available_presets()
loaded = {}
for preset in presets:
    cfg = load_config(preset, ["data.path=" + DATA])  # presets that read files need a path
    loaded[preset] = {space: sorted(tune.load_space(space, cfg)) for space in spaces}
print(json.dumps({"package": reckoning_ray.__file__, "spaces_dir": str(tune.SPACES_DIR), "spaces": spaces,
                  "presets": presets, "loaded": loaded, "help": help_text.getvalue(),
                  "ray_initialized": ray.is_initialized()}))
"""


def _probe(python: Path, cwd: Path) -> Dict:
    script = PROBE.replace("DATA", repr(str(cwd)))
    return json.loads(_run([str(python), "-c", script], cwd=cwd).strip().splitlines()[-1])


def _install(root: Path) -> Path:
    """Build the wheel and install it with its declared dependencies into a fresh virtual
    environment under ``root``; returns the environment. Checks what the wheel holds."""
    src = _copy_sources(root / "src")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         cwd=root)
    wheel, = dist.glob("reckoning_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted(p.name for p in (REPO / "tune_spaces").glob("*.yaml"))
    presets = sorted(p.name for p in (REPO / "reckoning_ray" / "conf").glob("*.yaml"))
    assert spaces and presets
    for name in spaces:
        assert f"reckoning_ray/tune_spaces/{name}" in names
    for name in presets:
        assert f"reckoning_ray/conf/{name}" in names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "reckoning_ray").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not any(n.startswith("tune_spaces/") for n in names)  # no top-level package of that name

    venv = root / "venv"
    python = _fresh_venv(venv)
    # the README's main-job install, from the wheel: torch first, then the project, both with the
    # constraints file (pip's own cache and the index, which CI reaches, supply the packages)
    constraints = str(REPO / "constraints.txt")
    _run([str(python), "-m", "pip", "install", "-q", "-c", constraints, "torch"], cwd=root, timeout=600)
    _run([str(python), "-m", "pip", "install", "-q", "-c", constraints, str(wheel)], cwd=root, timeout=600)
    (root / "installed").touch()
    return venv


@pytest.fixture
def installed_wheel(tmp_path_factory) -> Path:
    """The fresh environment with the installed wheel: built once per test run, by whichever of the
    two tests below comes first (they may run on different workers; a file lock orders them)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "wheel-install"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "installed").exists():
                for stale in ("src", "dist", "venv"):
                    shutil.rmtree(root / stale, ignore_errors=True)
                _install(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root / "venv"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_with_its_declared_dependencies_only(installed_wheel: Path, tmp_path: Path):
    venv = installed_wheel
    python = venv / "bin" / "python"
    freeze = _run([str(python), "-m", "pip", "freeze"], cwd=tmp_path)
    assert not re.search(r"^(pytest|moto|higher|torchopt|boto3|sweeps)==", freeze, re.M), freeze  # no extras
    spaces = sorted(p.name for p in (REPO / "tune_spaces").glob("*.yaml"))
    presets = sorted(p.name for p in (REPO / "reckoning_ray" / "conf").glob("*.yaml"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    # The entry point as a user runs it, from outside the repository.
    help_text = _run([str(python), "-m", "reckoning_ray.tune", "--help"], cwd=outside)
    installed = venv.resolve()
    assert f"{', '.join(sorted(Path(s).stem for s in spaces))} (in {installed}" in help_text
    assert "/reckoning_ray/tune_spaces)" in help_text

    result = _probe(python, outside)
    assert Path(result["package"]).resolve().is_relative_to(installed), result["package"]
    assert Path(result["spaces_dir"]) == Path(result["package"]).resolve().parent / "tune_spaces"
    assert result["spaces"] == sorted(Path(s).stem for s in spaces)
    assert result["presets"] == sorted(Path(p).stem for p in presets)
    assert set(result["loaded"]) == set(result["presets"])
    assert all(set(by_space) == set(result["spaces"]) and all(by_space.values())
               for by_space in result["loaded"].values())
    assert "search spaces:" in result["help"] and result["ray_initialized"] is False


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_the_installed_wheel_runs_a_curve_sweep(installed_wheel: Path, tmp_path: Path):
    # A sweep with curve stopping: 2 trials of 4 validation rounds; the scheduler judges (and
    # imports scipy, a main dependency) from round 4 on.
    python = installed_wheel / "bin" / "python"
    (tmp_path / "space.yaml").write_text("inner.lr_init: {grid: [0.3, 0.001]}\n")
    sweep = [str(python), "-m", "reckoning_ray.tune", "embedded", "space=space.yaml", "tune.scheduler=curve",
             "tune.storage_path=tune", "tune.name=curve", "tune.num_samples=1", "tune.max_concurrent=2",
             "tune.max_rounds=4", "tune.curve_min_rounds=4", "data.num_train=64", "data.num_validation=32",
             "train.epochs=2", "train.validations_per_epoch=2", "train.patience=0", "tracking.mode=disabled",
             *ONE_FACT]
    out = _run(sweep, cwd=tmp_path, env={"RAY_ADDRESS": ""}, timeout=600)
    summary = json.loads((tmp_path / "tune" / "curve" / "sweep_summary.json").read_text())
    assert len(summary["trials"]) == 2 and max(r["rounds"] for r in summary["trials"]) == 4, summary["trials"]
    assert "best config:" in out
