"""The wheel carries what the entry points read: the search spaces (tune_spaces/, shipped as
reckoning_ray/tune_spaces/) and the presets (reckoning_ray/conf/). Built from a copy of the
sources and installed without dependencies into a fresh virtual environment, it answers
``python -m reckoning_ray.tune --help`` from outside the repository and loads every space and
every preset from the installed copy; an editable install of the same sources still finds the
top-level tune_spaces/. No network: no build isolation, no index, no dependencies installed (the
fresh environment reaches this one's packages through a .pth file placed after its own)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

import reckoning_ray

REPO = Path(__file__).resolve().parents[1]
# What a wheel needs of the sources (pyproject.toml names README.md as the long description).
SOURCES = ("pyproject.toml", "README.md", "reckoning_ray", "tune_spaces")
OFFLINE_PIP = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_INDEX": "1"}


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
    full_env.update({**OFFLINE_PIP, **(env or {})})
    out = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _fresh_venv(path: Path) -> Path:
    """A virtual environment without pip whose packages come first, then this environment's."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # A .pth path line is appended after the venv's own site-packages and its own .pth files are
    # not run, so this environment's editable install of the project stays out of the way.
    (purelib / "zz_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_ships_spaces_and_presets(tmp_path: Path):
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         cwd=tmp_path)
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

    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)], cwd=tmp_path)
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
