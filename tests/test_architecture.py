"""The package's shape: no import circle, imports only downward through the layers.

The import graph is read from the source (every ``import`` statement, also those inside
functions, so a function-level import cannot hide a circle), not from ``sys.modules``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pfl

ROOT = Path(pfl.__file__).parent
# Layers, lowest first; a module may import its own layer or lower ones only.
LAYERS = {
    "pfl.utils": 0, "pfl.config": 0, "pfl.runtime": 0,
    "pfl.data": 1,
    "pfl.clip": 2,
    "pfl.method": 3,
    "pfl.baselines": 4,
    "pfl.run": 5,
    "pfl.viz": 6,
    "pfl.teach": 7,  # the notebooks' exercise checkers: may use anything, nothing uses them
    "pfl.cli": 8, "pfl.__main__": 8, "pfl": 8,
}
# One exception, on purpose: the run layer draws its qualitative figures with the plotting
# functions, which import nothing from pfl above the data layer.
ALLOWED_UP = {("pfl.run", "pfl.viz.plots"), ("pfl.run", "pfl.viz")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every pfl module that ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pfl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pfl"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def layer(mod: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{mod} is in no layer: add its folder to LAYERS")


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circle():
    # A package's __init__ importing its own submodule is how packages work, not a circle.
    g = {m: {n for n in deps if not m or not n.startswith(m + ".")} for m, deps in graph().items()}
    assert find_cycle(g) is None, f"import circle: {' -> '.join(find_cycle(g))}"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_only_go_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        name, level = layer(mod)
        for dep in deps:
            dep_name, dep_level = layer(dep)
            if dep_level > level and (name, dep) not in ALLOWED_UP:
                bad.append(f"{mod} ({name}) imports {dep} ({dep_name})")
    assert not bad, "imports that climb a layer:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("folder", ["data", "clip", "method", "run", "viz", "baselines", "teach"])
def test_every_folder_says_what_it_is(folder):
    doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"pfl/{folder}/__init__.py needs a docstring saying its job"


def test_the_readme_layout_names_every_folder():
    readme = (ROOT.parent / "README.md").read_text()
    for folder in ["data", "clip", "method", "run", "viz", "baselines"]:
        assert f"pfl/{folder}/" in readme, f"README's Architecture section misses pfl/{folder}/"
