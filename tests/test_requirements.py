"""What `pip install` promises is what runs: the declared requirements, the public APIs of wandb and
Ray (and the few commented exceptions, tied to the version they were tested with), and the wandb
commands that `tune publish` runs, checked against the installed wandb's own `--help`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "reckoning_ray"

# A module path with a private part: ray.autoscaler._private, ray.train.v2._internal, wandb.sdk.lib...
_PRIVATE_PART = re.compile(r"(^|\.)_[a-z]")
# Where wandb keeps its internals (no leading underscore): wandb.sdk is the client's implementation.
_WANDB_INTERNAL = ("wandb.sdk", "wandb.apis.public.sweeps")
_EXCEPTION = re.compile(r"# Private API \((?P<dist>[a-z][a-z0-9_-]*)==(?P<version>[^)]+)\):")


def _imports(path: Path):
    """(line, module, imported names) of every import in ``path``, function-local ones too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def _private(module: str, names: list[str]) -> bool:
    top = module.split(".")[0]
    if top not in ("ray", "wandb"):
        return False
    return bool(_PRIVATE_PART.search(module)) or module.startswith(_WANDB_INTERNAL) or \
        any(n.startswith("_") for n in names)


def test_private_ray_and_wandb_imports_are_commented_exceptions_at_the_installed_version():
    """No private Ray or wandb module is imported unless a comment just above says why, naming the
    version it was tested with; the test fails once the installed version differs, so that each
    exception is looked at again on every upgrade."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for lineno, module, names in _imports(path):
            if not _private(module, names):
                continue
            where = f"{path.relative_to(REPO)}:{lineno}: {module}"
            above = "\n".join(lines[max(0, lineno - 4):lineno - 1])
            match = _EXCEPTION.search(above)
            assert match, f"{where} is private; use a public API, or say why not in a comment " \
                          f"'# Private API (<dist>==<version>): ...' just above the import"
            dist, version = match.group("dist"), match.group("version")
            assert module.split(".")[0] == dist, f"{where}: the comment names {dist}"
            installed = metadata.version(dist)
            assert installed == version, f"{where} was tested with {dist}=={version}, installed is {installed}: " \
                                         f"check that the private API still does the same, then update the comment"
            found.append(where)
    # the exceptions there are (each one is a reason to look for a public path again)
    assert len(found) == 2, found


def test_every_private_api_comment_names_the_installed_version():
    """Private settings (environment variables Ray reads) carry the same comment as imports."""
    seen = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            match = _EXCEPTION.search(line)
            if match:
                seen += 1
                installed = metadata.version(match.group("dist"))
                assert installed == match.group("version"), \
                    f"{path.relative_to(REPO)}:{lineno} was tested with {match.group('dist')}==" \
                    f"{match.group('version')}, installed is {installed}"
    assert seen == 4


def _options(*command: str) -> set[str]:
    """The options ``python -m wandb <command> --help`` lists."""
    out = subprocess.run([sys.executable, "-m", "wandb", *command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.stdout.split("Options:", 1)[1]))


def test_publish_runs_wandb_commands_the_installed_wandb_accepts(tmp_path):
    from reckoning_ray.tracking.sweeps import attach_command, stop_command, sync_command

    commands = [
        sync_command([tmp_path / "offline-run-1"], "team", "proj"),
        attach_command("s1d2e3f4", "team", "proj", ["ab12c_00000", "ab12c_00001"], tmp_path / "wandb_sweep.yaml"),
        stop_command("s1d2e3f4", "team", "proj"),
    ]
    for command in commands:
        assert command[:3] == [sys.executable, "-m", "wandb"]
        sub = command[3]
        given = {arg for arg in command[4:] if arg.startswith("-")}
        unknown = given - _options(sub)
        assert not unknown, f"`wandb {sub}` has no option {sorted(unknown)}"
    # the values: each option that takes one is followed by it, never by another option
    attach = commands[1]
    assert attach[attach.index("--update") + 1] == "s1d2e3f4"
    assert [attach[i + 1] for i, a in enumerate(attach) if a == "--prior_run"] == ["ab12c_00000", "ab12c_00001"]
    assert attach[-1] == str(tmp_path / "wandb_sweep.yaml")
    assert commands[2][-2:] == ["--stop", "s1d2e3f4"]
