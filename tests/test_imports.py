"""Dependencies point one way (issue 12): the package's import graph, read from the source.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), and importing `a.b.c` also counts as importing the packages `a.b` and `a`.
Modules are grouped by their first name under qwen2_mlx (`lora`, `convert`, `loader`,
`metal_kernels`, ...); the root package's own __init__ is left out (every import runs it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
FOLDERS = {"qwen2_mlx": "qwen2_mlx", "convert": "qwen2_mlx.convert",
           "metal_kernels": "qwen2_mlx.metal_kernels", "cli": "qwen2_mlx.cli"}


def source_modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts
                     if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """{(module imported, name imported from it or "")} of one module, qwen2_mlx's only."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((submodule, "") if submodule in modules else (base, alias.name))
    return {(m, n) for m, n in found if m.startswith("qwen2_mlx")}


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qwen2_mlx"


def module_graph() -> dict[str, set[str]]:
    modules = source_modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target, _ in imports_of(name, path, modules):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # a.b.c runs a.b's __init__ too
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    graph[name].add(prefix)
    return graph


def group_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, targets in module_graph().items():
        if source == "qwen2_mlx":
            continue
        for target in targets:
            if group(source) != group(target):
                graph[group(source)].add(group(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    """The checker itself can fail: a planted cycle through a lazy import is found."""
    assert find_cycle({"loader": {"lora"}, "lora": {"convert"}, "convert": {"loader"}}) == [
        "convert", "loader", "lora", "convert"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_loader_lora_and_convert():
    graph = group_graph()
    involved = {"loader", "lora", "convert"}
    cycle = find_cycle(graph)
    assert cycle is None or not involved & set(cycle), f"import cycle: {' -> '.join(cycle)}"
    assert "lora" in graph["loader"]  # load(adapter_path=...) applies adapters ...
    assert not {"loader", "convert", "train"} & graph["lora"]  # ... and lora imports neither


def test_the_packages_import_one_way():
    """No cycle at all between the package's parts (model, caches, kernels, trainers...)."""
    cycle = find_cycle(group_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_metal_kernels_import_nothing_of_the_model():
    """Kernels take plain parameters: metal_kernels imports only itself (not long_context,
    rope, model, config, dca, cache...)."""
    outside = {t for s, ts in module_graph().items() if group(s) == "metal_kernels"
               for t in ts if group(t) != "metal_kernels"}
    assert outside == set()


def test_dpo_imports_nothing_private_from_lora():
    modules = source_modules()
    private = [(name, target, imported) for name, path in modules.items()
               if group(name) == "dpo"
               for target, imported in imports_of(name, path, modules)
               if group(target) == "lora"
               and (imported.startswith("_") or any(p.startswith("_") and p != "__init__"
                                                    for p in target.split(".")))]
    assert private == []


def test_loading_with_adapters_does_not_import_trainers_or_the_converter():
    """`load(adapter_path=...)` needs the adapter layers and files only."""
    script = ("import sys; import qwen2_mlx; from qwen2_mlx.lora.adapters import load_adapter; "
              "print(sorted(m for m in sys.modules if m.startswith(('qwen2_mlx.train', "
              "'qwen2_mlx.convert', 'qwen2_mlx.dpo', 'qwen2_mlx.cli', 'qwen2_mlx.lora'))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(["qwen2_mlx.lora", "qwen2_mlx.lora.adapters",
                                         "qwen2_mlx.lora.fuse", "qwen2_mlx.lora.layers"])
