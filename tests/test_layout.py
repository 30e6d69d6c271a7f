"""The package layout rules (issue 17), checked by parsing the package with ``ast``.

1. No import cycles among ``llora_jax`` modules (module-level imports; a package's
   ``__init__`` counts as importing what it imports).
2. Function-level imports only of optional heavy dependencies outside ``llora_jax``,
   each with a comment saying why.
3. No module imports another module's ``_private`` names.
4. No one- or two-letter module aliases.
5. Files of at most 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llora_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest llora_jax module that ``name`` (a module or module.attribute) names."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.Module, modules: dict[str, Path], module_level: bool):
    """(line, imported module, names) of llora_jax imports at module level or inside functions."""
    nodes = tree.body if module_level else [n for n in ast.walk(tree) if n not in tree.body]
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llora_jax"):
            for alias in node.names:
                target = _resolve(f"{node.module}.{alias.name}", modules)
                yield node.lineno, target, node.module, alias
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llora_jax"):
                    yield node.lineno, _resolve(alias.name, modules), alias.name, alias


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for _, target, _, _ in _imports(tree, modules, module_level=True):
            if target and target != name:
                graph[name].add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and parent != name and not name.startswith(parent + "."):
                        graph[name].add(parent)
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_are_optional_dependencies_with_a_reason():
    bad = []
    for path in _modules().values():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            mods = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if any((m or "").startswith("llora_jax") for m in mods):
                bad.append(f"{where} imports llora_jax inside a function")
                continue
            around = " ".join(lines[max(0, node.lineno - 3) : node.end_lineno])
            if "#" not in around:
                bad.append(f"{where} function-level import of {mods} without a comment")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llora_jax"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {alias.name}")
    assert not bad, "private names imported: " + ", ".join(bad)


def test_no_short_module_aliases():
    bad = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    short = alias.asname and len(alias.asname) <= 2
                    common = alias.asname in ("np", "nn", "jnp", "pd", "plt", "ocp", "ng")
                    if short and not common:
                        bad.append(
                            f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {alias.asname}"
                        )
    assert not bad, "short module aliases: " + ", ".join(bad)


def test_files_are_short():
    long = [
        f"{p.relative_to(PACKAGE.parent)} ({n} lines)"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert not long, "files over 400 lines: " + ", ".join(long)
