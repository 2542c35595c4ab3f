"""The package's layers, read from its source: every import of every module, function-local ones
included, goes to the same layer or a lower one, the core imports neither Ray nor W&B, and no
two modules import each other (directly or round a longer circle).

Layers, lowest first (README "Layout"):

    core/       RECKONING in plain PyTorch: config, data, models, engines, loop, checkpoints
    tracking/   W&B: the run writer and W&B sweeps
    on_ray/     Ray Train and Ray Tune
    ops/        cluster checks and the fake cluster
    *.py        the command lines (python -m reckoning_ray.<name>) and their shared parsing
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reckoning_ray"
LAYERS = ("core", "tracking", "on_ray", "ops", "commands")
# third-party packages a layer may not import (nor may any layer below it)
FORBIDDEN = {"core": ("ray", "wandb"), "tracking": ("ray",)}
# a function-local import of another module of the package is kept only to keep a heavy import off
# a fast path (``--help``, config checks); it says so in a comment on its line or the line above
LOCAL_IMPORT_REASON = "heavy"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS[:-1]:
        return parts[1]
    return "commands"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, function-local) for every import in ``path``; ``from pkg import
    name`` counts as an import of ``pkg.name`` when that is a module of the package."""
    tree = ast.parse(path.read_text())
    known = modules()
    me = module_name(path)
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue  # annotations only: never runs
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = me.split(".") if is_package else me.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    source = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    source = child.module or ""
                for a in child.names:
                    sub = f"{source}.{a.name}"
                    found.append((sub if sub in known else source, child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for target, _, _ in imports(path):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, which only hold docstrings here
            if target in known and target != name and target != "reckoning_ray":
                targets.add(target)
        graph[name] = targets
    return graph


def test_every_import_goes_to_the_same_or_a_lower_layer():
    wrong = []
    for name, path in modules().items():
        mine = LAYERS.index(layer_of(name))
        for target, line, _ in imports(path):
            if target.startswith("reckoning_ray.") and LAYERS.index(layer_of(target)) > mine:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer_of(name)}) imports {target} "
                             f"({layer_of(target)})")
    assert not wrong, "imports from a lower layer into a higher one:\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_import_neither_ray_nor_wandb(layer):
    banned = FORBIDDEN[layer]
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
             for name, path in modules().items() if layer_of(name) == layer
             for target, line, _ in imports(path) if target.split(".")[0] in banned]
    assert not wrong, f"the {layer} layer may not import {banned}:\n" + "\n".join(wrong)


def test_no_import_circles_among_modules_counting_local_imports():
    graph = internal_graph()
    circles, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_function_local_imports_of_the_package_say_why():
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, local in imports(path):
            if local and target.startswith("reckoning_ray"):
                text = lines[line - 1] + (lines[line - 2] if line > 1 else "")
                if LOCAL_IMPORT_REASON not in text:
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not unexplained, ("function-local imports of the package without a comment saying which heavy import "
                             "they keep off a fast path (import at the top instead):\n" + "\n".join(unexplained))


def test_the_checker_sees_local_imports_and_circles(tmp_path, monkeypatch):
    # the checks above would pass on anything if the reader missed function-local imports
    pkg = tmp_path / "reckoning_ray"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from reckoning_ray.core import b\n")
    (pkg / "core" / "b.py").write_text("from reckoning_ray.core.a import f\nimport ray\n")
    (pkg / "train.py").write_text("from .core import a\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert ("reckoning_ray.core.b", 2, True) in imports(pkg / "core" / "a.py")
    assert ("reckoning_ray.core.a", 1, False) in imports(pkg / "train.py")
    graph = internal_graph()
    assert graph["reckoning_ray.core.a"] == {"reckoning_ray.core.b"}
    assert graph["reckoning_ray.core.b"] == {"reckoning_ray.core.a"}
    with pytest.raises(AssertionError, match="core.a -> reckoning_ray.core.b -> reckoning_ray.core.a"):
        test_no_import_circles_among_modules_counting_local_imports()
    with pytest.raises(AssertionError, match="may not import"):
        test_lower_layers_import_neither_ray_nor_wandb("core")
