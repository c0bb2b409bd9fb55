"""edge_rwkv's own modules import one another without cycles, beyond a documented few.

The import graph is built from the source with `ast`, never by importing: an edge a → b for every
import of an edge_rwkv module in a, at the top of the file or inside a function (a lazy import only
hides a cycle until the function runs). `from .x import y` imports x.y when y is a module, else x;
importing a module of another subpackage also runs that subpackage's __init__ (edge_rwkv.quant, …).
Packages are nodes like any other, with the imports their __init__ makes: a module that imports names
from `edge_rwkv` while the root's __init__ (the public API) is still importing it is a cycle too. The
implicit import of a module's own packages is not an edge: Python runs their __init__ first.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edge_rwkv"

# Cycles that exist today and are being removed; each entry says by what. Nothing else may cycle.
KNOWN_CYCLES: set[frozenset] = set()


def package_dirs(root: Path) -> dict[str, Path]:
    """{package: folder} from pyproject's [tool.setuptools.package-dir] (edge_rwkv.quant is quant/, …)."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    table = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert table, "pyproject.toml has no [tool.setuptools.package-dir] table"
    dirs = dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1), re.M))
    assert PACKAGE in dirs, dirs
    return {pkg: root / d for pkg, d in dirs.items()}


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} of every module of the packages (a package's name is its __init__)."""
    out = {}
    for pkg, folder in dirs.items():
        mapped_elsewhere = {d.resolve() for p, d in dirs.items() if p != pkg}
        for f in sorted(folder.rglob("*.py")):
            if any(parent.resolve() in mapped_elsewhere for parent in f.parents):
                continue  # a folder mapped to its own package (quant/ is edge_rwkv.quant)
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = f
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The edge_rwkv modules one import statement imports (with the subpackages it passes through)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    out = set()
    for name in names:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        while name not in known and "." in name:  # `import edge_rwkv.x.y` of a name that is no module
            name = name.rpartition(".")[0]
        out.add(name)
        # the subpackages on the way run their __init__ — unless they are the importer's own packages,
        # which Python has imported (or is importing) before the importer
        parts = name.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                   if not module.startswith(p + "."))
    return out & known


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the edge_rwkv modules it imports, at the top or inside functions}."""
    mods = modules(package_dirs(root))
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, name, path.name == "__init__.py", known)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start), on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w), on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _describe(graph: dict[str, set[str]], component: frozenset[str]) -> str:
    edges = [f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component)]
    return "{" + ", ".join(sorted(component)) + "}: " + "; ".join(edges)


def test_no_import_cycles_beyond_the_known_ones():
    graph = import_graph()
    unexpected = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not unexpected, "import cycles:\n" + "\n".join(_describe(graph, c) for c in unexpected)


def test_graph_covers_every_package_and_lazy_imports():
    graph = import_graph()
    for pkg in package_dirs(ROOT):
        assert pkg in graph, pkg
    assert "edge_rwkv.quant.formats" in graph and "edge_rwkv.export.versions" in graph
    assert {"edge_rwkv.keys", "edge_rwkv.artifact", "edge_rwkv.safetensors_header"} <= graph["edge_rwkv.checkpoint"]
    assert "edge_rwkv.state_quant" in graph["edge_rwkv.fuzz"]  # imported inside a function only
    assert "edge_rwkv.quant" in graph["edge_rwkv.artifact"]  # importing quant.formats runs quant/__init__


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"edge_rwkv" = "pkg"\n'
                                             '"edge_rwkv.sub" = "sub"\n')
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "", "pkg/a.py": "from .b import f\n",
        "pkg/b.py": "def f():\n    from . import a\n", "pkg/c.py": "import edge_rwkv.a\n",
        "sub/__init__.py": "from edge_rwkv.c import x\n", "sub/d.py": "from ..a import f\n",
        "pkg/e.py": "from edge_rwkv.sub.d import g\n",
    })
    graph = import_graph(root)
    assert graph["edge_rwkv.c"] == {"edge_rwkv.a"}
    assert graph["edge_rwkv.sub.d"] == {"edge_rwkv.a"}  # relative import out of a subpackage
    assert graph["edge_rwkv.e"] == {"edge_rwkv.sub", "edge_rwkv.sub.d"}
    assert cycles(graph) == [frozenset({"edge_rwkv.a", "edge_rwkv.b"})]


def test_a_cycle_through_a_subpackage_init_is_found(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "", "pkg/a.py": "from edge_rwkv.sub.d import g\n",
        "sub/__init__.py": "from edge_rwkv.a import x\n", "sub/d.py": "g = 1\n",
    })
    assert cycles(import_graph(root)) == [frozenset({"edge_rwkv.a", "edge_rwkv.sub"})]
