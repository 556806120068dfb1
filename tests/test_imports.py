"""The import graph of minicnn and kernels, read statically from the sources: no cycle but the
Tensor/operator one, and kernels never imports minicnn.

Every ``import`` statement counts, at module level or deferred inside a function (a deferred
import hides a cycle, it does not remove it). ``from a.b import c`` is an edge to ``a.b.c`` when
that is a module, else to ``a.b``; the implicit import of a parent package is not an edge.
"""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("minicnn", "kernels")
# tensor.py imports functions.math at its end for the operators, which need Tensor defined
ALLOWED_CYCLES = [{"minicnn.tensor", "minicnn.functions.math"}]


def module_files() -> dict:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                       # relative import
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm: the components with more than one module."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_known_edges():
    graph = import_graph()
    assert "minicnn.functions.math" in graph["minicnn.tensor"]      # the deferred one
    assert "minicnn.io" in graph["minicnn.models.model"]
    assert "minicnn.layers.base" in graph["minicnn.io.npz"]


def test_no_import_cycle_but_the_tensor_operator_one():
    cycles = strongly_connected(import_graph())
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert unexpected == [], f"import cycles: {unexpected}"


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]


def test_kernels_never_import_minicnn():
    graph = import_graph()
    back = {name: sorted(e for e in edges if e.startswith("minicnn"))
            for name, edges in graph.items() if name.startswith("kernels")}
    assert {k: v for k, v in back.items() if v} == {}


def test_io_callbacks_and_models_import_first_in_a_fresh_interpreter():
    """Each of the once-cyclic modules imported first, in its own interpreter, works."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    for first in ("minicnn.io", "minicnn.callbacks", "minicnn.training", "minicnn.models.model"):
        result = subprocess.run([sys.executable, "-c", code, first, "minicnn.models"],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr


def imported_names(path: pathlib.Path) -> list:
    """(module, name) for every ``from minicnn... / kernels... import name`` in a script, and
    (module, None) for every ``import minicnn...`` / ``import kernels...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] in PACKAGES:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] in PACKAGES]
    return found


def missing_imports(scripts) -> list:
    """What the scripts import from minicnn/kernels that does not exist, one line each."""
    import importlib
    missing = []
    for path in scripts:
        for module, name in imported_names(path):
            try:
                imported = importlib.import_module(module)
            except ImportError:
                missing.append(f"{path.name}: {module}")
                continue
            if name is not None and not hasattr(imported, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{path.name}: {name} from {module}")
    return missing


def test_the_scripts_beside_the_package_import_what_exists():
    """benchmarks/ and docs/ import the package inside their workers, so a renamed or moved
    module would show only when a benchmark runs; every name they import must exist."""
    scripts = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "docs").glob("*.py"))
    assert len(scripts) >= 5
    assert missing_imports(scripts) == []


def test_the_script_import_check_sees_a_missing_name(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("def worker():\n    from kernels import cpu, backend\n"
                      "    import minicnn.nothing\n    import minicnn.tensor\n")
    assert missing_imports([script]) == ["bench.py: cpu from kernels", "bench.py: minicnn.nothing"]


def run_fresh(code: str):
    """Run ``code`` in a new interpreter at the repository root; fail with what it printed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_loads_neither_cupy_nor_torch():
    run_fresh("import sys, minicnn, kernels, minicnn.functions\n"
              "heavy = ('cupy', 'torch', 'tensorflow', 'jax', 'keras')\n"
              "bad = [m for m in heavy if m in sys.modules]\n"
              "sys.exit(f'loaded: {bad}' if bad else 0)\n")


def test_every_kernels_module_imports_without_minicnn():
    run_fresh("import sys, importlib, pkgutil, kernels\n"
              "for m in pkgutil.walk_packages(kernels.__path__, 'kernels.'):\n"
              "    importlib.import_module(m.name)\n"
              "sys.exit('minicnn was imported' if 'minicnn' in sys.modules else 0)\n")
