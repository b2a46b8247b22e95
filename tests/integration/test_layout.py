"""The package's architecture, held as data: subpackages by layer, imports that only go down.

``LAYERS`` lists the layers from the bottom up; a module may import from its own layer and from
the layers below it, never from one above. No two files may import each other, directly or
through others, and imports sit at the top of a file: only the command line defers imports of
the library (so that ``ddpm --help`` answers before torch is loaded), and optional heavy packages
(torch-fidelity, datasets, matplotlib, tensorboard, yaml) are imported where they are used.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ddpm

LAYERS = (
    ("errors",),              # UserError: the one exception every layer raises for a user's mistake
    ("core",),                # schedules, the forward process, posteriors, losses, NLL, noise, device
    ("nets",),                # networks; they know nothing of diffusion
    ("sampling",),            # samplers and the steering built on them
    ("data",),                # data sources
    ("config", "presets"),    # typed configs and the named recipes
    ("io",),                  # files, checkpoints, loading runs, diffusers in and out
    ("evaluation",),          # FID, NLL reports, toy metrics, figures, report.html
    ("training",),            # the training loop and what it needs
    ("cli", "__main__"),      # the command line: nothing imports it
)
# Where an import inside a function is the point: the CLI imports the library when a command runs.
DEFERRED_OK = ("cli",)
PACKAGE = Path(ddpm.__file__).resolve().parent


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add its package there")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["ddpm", *parts])


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, int, bool]]:
    """(imported ddpm module, line, inside a function) for every import of the package in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ddpm":
                continue
            for alias in node.names:  # `from ddpm.core import schedules` imports a module
                sub = f"{target}.{alias.name}"
                is_module = (root / Path(*sub.split(".")[1:])).with_suffix(".py").exists() or \
                    (root / Path(*sub.split(".")[1:]) / "__init__.py").exists()
                found.append((sub if is_module else target, node.lineno, id(node) in nested))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ddpm":
                    found.append((alias.name, node.lineno, id(node) in nested))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}


def layout_problems(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    """Every upward import, deferred import and cycle between files in ``graph``, one line each."""
    problems = []
    for module, imports in graph.items():
        if module == "ddpm":
            continue  # the public names, resolved lazily by name (not an import statement)
        for target, line, deferred in imports:
            if target == "ddpm":
                problems.append(f"{module}:{line} imports the package root; import the module")
            elif layer_of(target) > layer_of(module):
                problems.append(f"{module}:{line} imports {target}, a layer above it")
            if deferred and module.split(".")[1] not in DEFERRED_OK:
                problems.append(f"{module}:{line} imports {target} inside a function")
    # Cycles between files (a package's __init__ importing its own modules is not a cycle).
    edges = {m: sorted({t for t, _, _ in imps if t in graph and t != m and not t.startswith(m + ".")})
             for m, imps in graph.items() if m != "ddpm"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return problems


def test_the_package_follows_its_layers():
    problems = layout_problems(import_graph())
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name != "ddpm":
            layer_of(name)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


BASE = {
    "__init__.py": "",
    "errors.py": "",
    "core/__init__.py": "",
    "core/schedules.py": "from ..errors import UserError\n",
    "core/diffusion.py": "from .schedules import NoiseSchedule\n",
    "sampling/__init__.py": "",
    "sampling/samplers.py": "from ..core.diffusion import q_sample\nfrom ..core import schedules\n",
    "cli/__init__.py": "",
    "cli/main.py": "def main():\n    from ..sampling.samplers import sample\n",
}


def test_the_checker_passes_a_clean_tree(tmp_path):
    _write(tmp_path, BASE)
    graph = import_graph(tmp_path)
    assert ("ddpm.core.schedules", 2, False) in graph["ddpm.sampling.samplers"]
    assert layout_problems(graph) == []


@pytest.mark.parametrize("change, expected", [
    ({"core/diffusion.py": "from .schedules import NoiseSchedule\nfrom ..sampling.samplers import sample\n"},
     "ddpm.core.diffusion:2 imports ddpm.sampling.samplers, a layer above it"),
    ({"core/schedules.py": "from .diffusion import q_sample\n"},
     "import cycle: ddpm.core.diffusion -> ddpm.core.schedules -> ddpm.core.diffusion"),
    ({"core/schedules.py": "def f():\n    from . import diffusion\n"},
     "ddpm.core.schedules:2 imports ddpm.core.diffusion inside a function"),
    ({"core/schedules.py": "import ddpm.cli.main\n"},
     "ddpm.core.schedules:1 imports ddpm.cli.main, a layer above it"),
])
def test_the_checker_fails_an_upward_import_a_cycle_or_a_deferred_import(tmp_path, change, expected):
    _write(tmp_path, {**BASE, **change})
    problems = layout_problems(import_graph(tmp_path))
    assert expected in problems, problems
