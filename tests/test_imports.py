"""The package's imports run one way: each module imports only from its own layer or below, with no
circle, and every project import is at module top (the CLI and optional modules aside)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jax_mnist"

# Lowest first. A module may import from its own layer (no circle) and from those below.
LAYERS = [
    # foundations: errors, atomic files, process-wide settings, what libraries print
    {"jax_mnist", "errors", "files", "host_memory", "library_output"},
    # pure math and the data: no network, no run
    {
        "layers",
        "onednn",
        "dropout",
        "augment",
        "augment_grid",
        "schedules",
        "streams",
        "distill",
        "data",
        "hosts",
        "events",
    },
    # the networks and the recipes
    {
        "zoo",
        "summary",
        "torch_io",
        "models",
        "reference",
        "reference.torch_models",
        "recipes",
        "schema",
        "provenance",
    },
    # the compiled programs: step math, TrainState, the tree a recipe's state has, Programs
    {"engine"},
    # checkpoints: given the tree to restore into
    {"checkpoints"},
    # the run directory: its files, reading a run (a teacher's too)
    {"rundir"},
    # what uses runs
    {"run", "study", "bench", "inference", "export", "search"},
    {"report"},
    {"cli", "__main__"},
]
# Imported inside functions where they are used: they need torch, an optional dependency.
OPTIONAL_MODULES = {"reference.torch_models"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts) or "jax_mnist"] = path
    return names


MODULES = module_names()


def layer_of(module: str) -> int:
    top = module if module in MODULES and not module.startswith("cli.") else module.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if module in layer or top in layer:
            return index
    raise AssertionError(f"jax_mnist/{module}: in no layer of tests/test_imports.py's LAYERS; add it")


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of the package in ``path``."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "jax_mnist" or alias.name.startswith("jax_mnist."):
                        found.append(
                            (alias.name.removeprefix("jax_mnist.") or "jax_mnist", child.lineno, inside)
                        )
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "jax_mnist":
                    for alias in child.names:
                        name = alias.name if alias.name in MODULES else "jax_mnist"
                        found.append((name, child.lineno, inside))
                elif child.module.startswith("jax_mnist."):
                    found.append((child.module.removeprefix("jax_mnist."), child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        edges[module] = {target for target, _, _ in project_imports(path) if target != module}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it, or None."""
    state, stack = {}, []

    def walk(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = walk(target)
                if found:
                    return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            found = walk(module)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_runs_up_a_layer():
    upward = [
        f"jax_mnist/{MODULES[module].relative_to(PACKAGE)}:{line} imports {target} "
        f"(layer {layer_of(target)} above its own {layer_of(module)})"
        for module, path in MODULES.items()
        for target, line, _ in project_imports(path)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_imports_have_no_circle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_project_imports_are_at_module_top_outside_the_cli():
    inside = [
        f"jax_mnist/{path.relative_to(PACKAGE)}:{line} imports {target} inside a function"
        for module, path in MODULES.items()
        if layer_of(module) < layer_of("cli")
        for target, line, in_function in project_imports(path)
        if in_function and target not in OPTIONAL_MODULES
    ]
    assert not inside, "\n".join(inside)


def test_the_checks_find_what_they_look_for():
    """The checker itself: a circle, a function-level import and an upward one are seen."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    source = "import jax_mnist.engine\ndef f():\n    from jax_mnist.rundir import load_run\n"
    path = PACKAGE.parent / "tests" / "fixtures" / "_imports_probe.py"
    try:
        path.write_text(source)
        assert project_imports(path) == [("engine", 1, False), ("rundir", 3, True)]
    finally:
        path.unlink()
    assert layer_of("rundir") > layer_of("engine") > layer_of("zoo")


@pytest.mark.parametrize("module", ["engine", "checkpoints"])
def test_a_lower_layer_loads_nothing_above_it(module):
    """What ``import jax_mnist.<module>`` brings into a fresh interpreter is its layer or below."""
    code = (
        f"import sys, jax_mnist.{module}; "
        "print(' '.join(m.removeprefix('jax_mnist.') for m in sys.modules if m.startswith('jax_mnist')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    above = [m for m in loaded if m in MODULES and layer_of(m) > layer_of(module)]
    assert module in loaded and not above, f"import jax_mnist.{module} loads {above}"
