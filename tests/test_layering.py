"""The import layering of the package: no module cycle, no two subpackages importing each other, no
library module importing a CLI module. Every import counts, function-level ones included (a late
import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
import pathlib

import bokehdiff_jax

ROOT = pathlib.Path(bokehdiff_jax.__file__).resolve().parent
PKG = "bokehdiff_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name refers to (``a.b.c`` may be a function of ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: pathlib.Path) -> set[str]:
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n) if n.startswith(PKG) else None
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _parent_chain(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    # Guards the guard: a late import and a relative import must both be edges.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from bokehdiff_jax.errors import InputError\nfrom .io import atomic\n")
    assert _imports("bokehdiff_jax.demo", src) == {
        "bokehdiff_jax.errors",
        "bokehdiff_jax.io",
        "bokehdiff_jax.io.atomic",
    }
    assert len(MODULES) > 40


def test_no_module_import_cycles():
    # A package's __init__ re-exporting its children is not a cycle with them: drop child -> parent
    # edges that only exist because importing a child runs its parent's __init__.
    graph = {m: {t for t in ts if t not in _parent_chain(m)} for m, ts in GRAPH.items()}
    assert _cycles(graph) == []


def test_no_two_subpackages_import_each_other():
    def sub(m: str) -> str | None:
        parts = m.split(".")
        return parts[1] if len(parts) > 1 else None

    pairs = {
        (sub(a), sub(b)) for a, ts in GRAPH.items() for b in ts if sub(a) and sub(b) and sub(a) != sub(b)
    }
    knots = sorted({tuple(sorted(p)) for p in pairs if (p[1], p[0]) in pairs})
    assert knots == []


def test_nothing_imports_a_cli_module():
    offenders = sorted(
        f"{a} -> {b}" for a, ts in GRAPH.items() for b in ts if b.endswith(".cli") or b == f"{PKG}.cli"
    )
    assert offenders == []
