"""finetune/ has no import circle: the graph of its modules' imports (module level and inside functions) is acyclic.

Read with `ast` from the source, nothing imported, so a lazy `import` inside a function counts like a top-level one
(a circle hidden behind a function-level import is still a circle). An edge is an import statement naming a
finetune module; the implicit import of a parent package (`finetune/__init__.py` before any submodule) is not one.
"""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "finetune"


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for finetune/*.py and finetune/demo/*.py (`__init__` is the package itself)."""
    files = {}
    for path in sorted((REPO_ROOT / PACKAGE).glob("*.py")) + sorted((REPO_ROOT / PACKAGE / "demo").glob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _imports(name: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported finetune module, line, at module level) for every import statement of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []

    def add(target: str, node: ast.stmt):
        # `a.b.c` imports a.b.c and, if the leaf is not a module, the module a.b that defines it.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append((target, node.lineno, id(node) in top_level))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import x` / `from .a import b` where x, b may be modules
                add(f"{base}.{alias.name}", node)
    return found


def import_graph() -> dict[str, dict[str, list[tuple[int, bool]]]]:
    files = _module_files()
    graph: dict[str, dict[str, list[tuple[int, bool]]]] = {name: {} for name in files}
    for name, path in files.items():
        for target, line, module_level in _imports(name, path, set(files)):
            graph[name].setdefault(target, []).append((line, module_level))
    return graph


def find_cycle(graph: dict[str, dict]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_reader_sees_module_and_function_level_imports():
    graph = import_graph()
    assert {"finetune", "finetune.collators", "finetune.sft", "finetune.demo.pipeline"} <= set(graph)
    assert any(not level for _, level in graph["finetune.sft"]["finetune.trainer"])  # lazy: TRL only when used
    assert any(level for _, level in graph["finetune.demo.pipeline"]["finetune.sft"])  # `from ..sft import` (level 2)
    assert "finetune.speech_collator" in graph["finetune.collators"]


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}, "c": {"a": [], "b": []}}) is None


def test_finetune_has_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = [f"{a} -> {b} (line {graph[a][b][0][0]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import circle in finetune/: " + "; ".join(where))


def test_collator_registry_imports_its_collators_at_module_level():
    """collators.py is a plain registry: every finetune module it uses is imported at the top, none lazily."""
    edges = import_graph()["finetune.collators"]
    lazy = sorted(target for target, uses in edges.items() if not all(level for _, level in uses))
    assert lazy == []
    assert {"finetune.chat_collator", "finetune.speech_collator", "finetune.duplex_collator", "finetune.duplex_data",
            "finetune.errors"} <= set(edges)


def test_errors_module_imports_nothing_from_finetune():
    assert import_graph()["finetune.errors"] == {}
