"""Imports flow one way: no cycles among charrnn's modules, and typer/rich only in the command line (charrnn/cli/).

Read from the source with `ast`, never by importing, so a broken or cyclic module cannot hide itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).parent.parent / "charrnn"
# The command line's dependencies: `import charrnn` must work in a notebook that has neither.
CLI_ONLY = {"typer", "rich"}


class Imports(NamedTuple):
    files: dict[str, Path]  # module name -> its file
    edges: dict[str, set[str]]  # module -> the charrnn modules it imports
    cli_deps: dict[str, list[tuple[str, int]]]  # module -> (typer/rich module, line) it imports


def module_name(root: Path, path: Path) -> str:
    """Name the module in `path`: a package is its __init__.py."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path) -> Imports:
    """Collect every import in every module of the package at `root`, in functions too (they run sooner or later)."""
    files = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {name: set() for name in files}
    cli_deps: dict[str, list[tuple[str, int]]] = {name: [] for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                cli_deps[name] += [(target, node.lineno) for target in targets if target.split(".")[0] in CLI_ONLY]
                # The parents of `charrnn.a.b` run too, but only as packages: not an edge, so that a package's
                # submodules may import each other. Plain `import charrnn` is such a parent import.
                edges[name] |= {target for target in targets if target != root.name}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # `.` is this module's package, each further dot one package up
                    parent = package.rsplit(".", node.level - 1)[0]
                    base = f"{parent}.{base}" if base else parent
                elif base.split(".")[0] in CLI_ONLY:
                    cli_deps[name].append((base, node.lineno))
                for alias in node.names:
                    # A submodule when such a file exists; else a name defined in `base` itself, which then runs.
                    submodule = f"{base}.{alias.name}"
                    edges[name].add(submodule if submodule in files else base)
        # Keep charrnn's own modules; a package naming its own names is no cycle.
        edges[name] &= files.keys() - {name}
    return Imports(files, edges, cli_deps)


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """Return one import cycle as a path that ends where it starts, or [] (depth-first search, sorted: stable)."""
    done: set[str] = set()
    stack: list[str] = []  # the path from the search's start to the module being explored

    def visit(module: str) -> list[str]:
        stack.append(module)
        for target in sorted(edges[module]):
            if target in stack:
                return stack[stack.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        done.add(stack.pop())
        return []

    for module in sorted(edges):
        if module not in done and (cycle := visit(module)):
            return cycle
    return []


def cli_deps_outside_cli(root: Path, imports: Imports) -> list[str]:
    """Name each typer/rich import in a module that is not under `root`/cli/."""
    return [f"{name} ({imports.files[name].relative_to(root.parent)}:{line}) imports {dep}"
            for name, deps in imports.cli_deps.items() if root / "cli" not in imports.files[name].parents
            for dep, line in deps]


def cli_deps_reached_from_init(root: Path, imports: Imports) -> list[str]:
    """Name each typer/rich import that `import <package>` runs, following imports and the parent packages they run."""
    reached, todo = set(), [root.name]
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo += imports.edges[module]
        todo += [module.rsplit(".", up)[0] for up in range(1, module.count(".") + 1)]
    return [f"{name} imports {dep} (line {line})" for name in sorted(reached) for dep, line in imports.cli_deps[name]]


def write_package(root: Path, sources: dict[str, str]) -> None:
    for relative, source in sources.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source, encoding="utf-8")


def test_checker_reports_a_cycle_and_rich_outside_cli(tmp_path):
    root = tmp_path / "charrnn"
    write_package(root, {
        "__init__.py": "from charrnn.cli.common import helper\n",  # runs charrnn/cli/__init__.py too
        "a.py": "def later():\n    from charrnn import b\n",  # an import in a function still counts
        "b.py": "from charrnn.c import thing\n",
        "c.py": "import rich.console\nfrom .a import later\n",  # a relative import closes the loop
        "cli/__init__.py": "import typer\n",
        "cli/common.py": "from typer import Option\n",
    })
    imports = scan(root)
    assert find_cycle(imports.edges) == ["charrnn.a", "charrnn.b", "charrnn.c", "charrnn.a"]
    assert cli_deps_outside_cli(root, imports) == ["charrnn.c (charrnn/c.py:1) imports rich.console"]
    assert cli_deps_reached_from_init(root, imports) == [
        "charrnn.cli imports typer (line 1)", "charrnn.cli.common imports typer (line 1)"]


def test_a_package_may_import_its_submodules_but_they_may_not_import_it_back(tmp_path):
    root = tmp_path / "charrnn"
    write_package(root, {
        "__init__.py": '__version__ = "0"\n',
        "cli/__init__.py": "import charrnn.cli.train\napp = None\n",
        "cli/train.py": "from charrnn.cli import common\nfrom charrnn import __version__\n",  # a sibling; a name
        "cli/common.py": "import json\n",
    })
    imports = scan(root)
    assert imports.edges["charrnn.cli"] == {"charrnn.cli.train"}
    assert imports.edges["charrnn.cli.train"] == {"charrnn.cli.common", "charrnn"}
    assert find_cycle(imports.edges) == []
    (root / "cli/common.py").write_text("from charrnn.cli import app\n")  # `app` lives in cli/__init__.py
    assert find_cycle(scan(root).edges) == ["charrnn.cli", "charrnn.cli.train", "charrnn.cli.common", "charrnn.cli"]


def test_charrnn_has_no_import_cycles():
    cycle = find_cycle(scan(PACKAGE).edges)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_only_the_command_line_imports_typer_or_rich():
    misplaced = cli_deps_outside_cli(PACKAGE, scan(PACKAGE))
    assert not misplaced, "typer/rich belong in charrnn/cli/ only:\n" + "\n".join(misplaced)


def test_import_charrnn_needs_neither_typer_nor_rich():
    reached = cli_deps_reached_from_init(PACKAGE, scan(PACKAGE))
    assert not reached, "`import charrnn` would import the command line's dependencies:\n" + "\n".join(reached)


def test_the_command_line_starts_without_jax():
    """`charrnn --help`, `runs` and tab completion need no JAX; train re-runs itself before loading it."""
    probe = "import sys, charrnn, charrnn.cli, charrnn.entry; print(sorted(m for m in ('jax', 'optax') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
