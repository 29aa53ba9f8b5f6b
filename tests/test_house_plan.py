"""The house plan, read from the source: processing/ prepares, modeling/ computes, the duplex session drives both,
configuration/ imports neither, and the import graph of minicpmo/ and finetune/ has no circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minicpmo", "finetune")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every minicpmo/finetune module `path` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import submodule` imports the submodule; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    return found - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "minicpmo" else None


def test_processing_and_modeling_do_not_import_each_other():
    edges = graph()
    crossings = [(a, b) for a, targets in edges.items() for b in targets
                 if {layer(a), layer(b)} == {"modeling", "processing"}]
    assert crossings == []


def test_configuration_imports_neither_processing_nor_modeling():
    edges = graph()
    assert [(a, b) for a, targets in edges.items() for b in targets
            if layer(a) == "configuration" and layer(b) in ("modeling", "processing")] == []


def test_shared_leaf_modules_import_only_leaf_modules():
    edges = graph()
    leaves = {"minicpmo.audio_utils", "minicpmo.errors", "minicpmo.special_tokens"} & set(edges)
    assert {"minicpmo.audio_utils", "minicpmo.errors"} <= leaves
    for leaf in leaves:
        assert edges[leaf] <= leaves, leaf  # a leaf may use another leaf (the errors), nothing else


def test_duplex_session_drives_processor_and_model_without_importing_them():
    edges = graph()
    for name in ("minicpmo.duplex.duplex_session", "minicpmo.duplex.duplex_config"):
        assert not {layer(target) for target in edges[name]} & {"modeling", "processing"}, name


def test_import_graph_has_no_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # The package __init__ files re-export their modules; a module importing its own package's __init__ back
    # would be a circle too, so they are not exempt.
    assert cycles == []


def test_the_graph_reader_sees_known_edges():
    edges = graph()  # not vacuous: edges that must exist are found
    assert "minicpmo.audio_utils" in edges["minicpmo.processing.feature_extraction_minicpmo"]
    assert "minicpmo.duplex.duplex_session" in edges["minicpmo.modeling.modeling_duplex"]
    assert "minicpmo.modeling.modeling_duplex_audio" in edges["minicpmo.modeling.modeling_duplex"]
