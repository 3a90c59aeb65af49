"""The shape of fastcap's import graph, read from the source with ``ast`` (nothing is imported):
no cycle, counting imports inside functions too; kernels are leaves; each reader of
``fastcap.data`` knows only the shared leaves, and only ``sources`` knows the readers.

``python tests/test_imports.py [ROOT]`` prints the findings for another checkout (e.g. an old
commit unpacked with ``git archive``)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder, as pyproject.toml installs them
PACKAGES = {"fastcap": "fastcap", "fastcap.kernels": "kernels"}
DATA_LEAVES = {"fastcap.data.records", "fastcap.data.images", "fastcap.data.tokenizer"}
DATA_HUB = "fastcap.data.sources"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every .py file of the package."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = list(f.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = f
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module ``name`` is, or the longest package of it that is one; None if not fastcap."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, mods: dict[str, Path]) -> dict[str, int]:
    """The fastcap modules ``name`` imports anywhere in its file -> first line doing so.

    ``from P import x`` counts as importing ``P.x`` when that is a module, else ``P``.
    """
    out: dict[str, int] = {}
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
            ]
        for t in targets:
            mod = _resolve(t, mods)
            if mod is not None and mod != name:
                out.setdefault(mod, node.lineno)
    return out


def graph(root: Path = ROOT) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    mods = modules(root)
    return {m: imports(m, f, mods) for m, f in mods.items()}, mods


def find_cycle(g: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, {})):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (c := visit(d)) is not None:
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)) is not None:
            return c
    return None


def _show(cycle: list[str], g: dict[str, dict[str, int]], mods: dict[str, Path], root: Path):
    return "\n".join(
        f"  {a} -> {b}  ({mods[a].relative_to(root)}:{g[a][b]})" for a, b in zip(cycle, cycle[1:])
    )


def kernel_violations(root: Path = ROOT) -> list[str]:
    """Imports of fastcap.ops / fastcap.model from files under kernels/."""
    g, mods = graph(root)
    return [
        f"{mods[m].relative_to(root)}:{line} imports {d}"
        for m in sorted(g)
        if m.startswith("fastcap.kernels")
        for d, line in sorted(g[m].items())
        if d.split(".")[:2] in (["fastcap", "ops"], ["fastcap", "model"])
    ]


def data_violations(root: Path = ROOT) -> list[str]:
    """Imports inside fastcap.data other than a reader of the leaves (or a leaf of nothing)."""
    g, mods = graph(root)
    bad = []
    for m in sorted(g):
        if not m.startswith("fastcap.data.") or m == DATA_HUB:
            continue
        allowed = set() if m in DATA_LEAVES else DATA_LEAVES
        for d, line in sorted(g[m].items()):
            if d.startswith("fastcap.data") and d not in allowed:
                what = "a leaf" if m in DATA_LEAVES else "a reader"
                bad.append(f"{mods[m].relative_to(root)}:{line}: {what} imports {d}")
    return bad


def test_no_import_cycle():
    g, mods = graph()
    assert len(g) > 30 and "fastcap.kernels.moe" in g  # the walk found the package
    cycle = find_cycle(g)
    if cycle:
        print("import cycle:\n" + _show(cycle, g, mods, ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_neither_ops_nor_model():
    bad = kernel_violations()
    assert not bad, "kernels are leaves; share code through fastcap.common:\n" + "\n".join(bad)


def test_data_readers_import_only_leaves():
    g, _ = graph()
    assert DATA_HUB in g and set(g) >= DATA_LEAVES
    bad = data_violations()
    assert not bad, f"only {DATA_HUB} may import the readers:\n" + "\n".join(bad)


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    pkg = tmp_path / "fastcap"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from fastcap.data import b\n")
    (pkg / "data" / "b.py").write_text("from . import a\n")
    g, mods = graph(tmp_path)
    assert g["fastcap.data.a"] == {"fastcap.data.b": 2}
    assert g["fastcap.data.b"] == {"fastcap.data.a": 1}
    assert find_cycle(g) == ["fastcap.data.a", "fastcap.data.b", "fastcap.data.a"]
    assert len(data_violations(tmp_path)) == 2


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    g, mods = graph(root)
    cycle = find_cycle(g)
    print("cycle:\n" + _show(cycle, g, mods, root) if cycle else "no cycle")
    print("kernels:", *kernel_violations(root) or ["ok"], sep="\n  ")
    print("data:", *data_violations(root) or ["ok"], sep="\n  ")
