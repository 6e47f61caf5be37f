"""The package's import structure, read from the source with :mod:`ast` (nothing is imported).

* No import circle among the modules of ``supersub/``, ``jobs/`` and ``serve/``. Every import
  statement is an edge — at module level, inside a function, under ``if TYPE_CHECKING`` — since
  an import moved into a function still ties the two modules together; it only hides the circle
  from the interpreter.
* The core ``supersub/`` never imports Ray, and MLflow only inside the functions that resolve an
  MLflow reference a user names (``runs:/…``, ``models:/…``): importing the core loads neither,
  and it runs without them installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("supersub", "jobs", "serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Module name → file, for every ``.py`` file of the packages."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """The absolute dotted names the import statements of ``path`` name, with their lines:
    ``import a.b`` → ``a.b``; ``from a import b`` → ``a.b`` (a module, or an attribute of ``a``);
    ``from a import *`` → ``a``; relative imports resolved against ``module``'s package."""
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(base if alias.name == "*" else f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` loads: itself, else its longest prefix that is a module
    (``from a.b import func`` → ``a.b``); None for a name outside the packages."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {imported package module → first line importing it} (self-imports left out)."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(path, module):
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _describe(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    members = set(component)
    edges = [
        f"    {modules[a].relative_to(REPO)}:{line} imports {b}"
        for a in component
        for b, line in sorted(graph[a].items())
        if b in members
    ]
    return " <-> ".join(component) + "\n" + "\n".join(edges)


def test_no_import_circle() -> None:
    graph = import_graph()
    assert "supersub.data.sources" in graph and graph["supersub.data.sources"], "the graph reads no imports"
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    modules = _modules()
    assert not circles, "import circles:\n" + "\n".join(_describe(c, graph, modules) for c in circles)


def test_graph_finds_a_circle_hidden_in_a_function(tmp_path: Path) -> None:
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from pkg.two import f\n")
    (pkg / "two.py").write_text("def f():\n    from . import one\n    from .one import g\n")
    assert _imported_names(pkg / "two.py", "pkg.two") == [("pkg.one", 2), ("pkg.one.g", 3)]
    modules = {"pkg": pkg / "__init__.py", "pkg.one": pkg / "one.py", "pkg.two": pkg / "two.py"}
    assert [_resolve(name, modules) for name in ("pkg.one.g", "pkg.one", "pkg.two.f", "pkg.f", "numpy")] == [
        "pkg.one", "pkg.one", "pkg.two", "pkg", None,
    ]


def _runs_on_import(tree: ast.AST) -> list[ast.AST]:
    """The nodes of a module that run when it is imported: everything outside function bodies."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += list(ast.iter_child_nodes(node))
    return out


def test_core_imports_neither_ray_nor_mlflow() -> None:
    found = []
    for path in sorted((REPO / "supersub").rglob("*.py")):
        where = path.relative_to(REPO)
        found += [f"{where}:{line} imports {name.split('.')[0]}" for name, line in _imported_names(path, _module_name(path))
                  if name.split(".")[0] == "ray"]
        tree = ast.parse(path.read_text())
        at_import = {id(n) for n in _runs_on_import(tree)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "mlflow" for n in names) and id(node) in at_import:
                found.append(f"{where}:{node.lineno} imports mlflow when the module is imported")
    assert not found, "supersub/ is the core without Ray (and MLflow only on demand):\n" + "\n".join(found)
