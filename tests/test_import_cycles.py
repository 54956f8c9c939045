"""No import cycles inside unite_hf: statically (every import, also inside functions and through
``importlib.import_module``) and at import time, each module imported first in a fresh interpreter state."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import unite_hf

PACKAGE_DIR = Path(unite_hf.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module of unite_hf."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the unite_hf modules it imports anywhere in its code (a name imported from a package
    counts as the package unless it is a submodule)."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        imported: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*here[:len(here) - node.level + 1], *([node.module] if node.module else [])]) \
                    if node.level else node.module
                imported += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                imported.append(node.args[0].value)  # importlib.import_module("unite_hf.x"): an import all the same
        graph[name] = {target for target in map(owner, imported) if target is not None and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_reader_sees_cycles_of_every_kind(tmp_path):
    """The checker itself: a package importing its child that imports the package back, a lazy import
    inside a function and an importlib string each close a cycle it must report."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n__version__ = '1'\n")
    (pkg / "a.py").write_text("from . import __version__\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .c import C\n")
    (pkg / "c.py").write_text("import importlib\nC = importlib.import_module('toy.b')\n")
    (pkg / "sub" / "__init__.py").write_text("from ..a import A\n")
    modules = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    assert _cycles(_import_graph(modules)) == [["toy", "toy.a"], ["toy.b", "toy.c"]]


def test_no_import_cycles_in_the_source():
    graph = _import_graph(_modules())
    assert graph["unite_hf"] >= {"unite_hf.gene", "unite_hf.modeling_unite"}  # the reader reads
    assert _cycles(graph) == []


def test_core_modules_import_no_method_and_methods_import_no_other_method():
    """Code every method shares lives outside methods/ and imports none of them (a method plugs into it,
    e.g. by registering its scaling); a method's folder imports no other method's folder (XPERT's Llama
    targets use MASA's scaling only by name, through the registry)."""
    graph = _import_graph(_modules())
    method_of = {name: name.split(".")[2] for name in graph
                 if name.startswith("unite_hf.methods.") and name.count(".") >= 2
                 and name.split(".")[2] not in ("common", "config")}
    for core in ("unite_hf.llama_targets", "unite_hf.layer_map", "unite_hf.gene", "unite_hf.targets"):
        assert not {m for m in graph[core] if m in method_of}, (core, graph[core])
    for name, method in method_of.items():
        others = {method_of[m] for m in graph[name] if m in method_of} - {method}
        assert not others, f"{name} imports the method(s) {sorted(others)}"
    assert {"unite_hf.methods.masa.scaling", "unite_hf.methods.xpert.scaling"} <= set(method_of)  # the reader reads


# Run in a fresh interpreter: for each module, forget every unite_hf module (torch and transformers stay
# loaded, so this takes seconds), import it, and report any import that asks for a unite_hf module whose
# own top-level code is still running (importlib marks it with __spec__._initializing): a live cycle.
_PROBE = r"""
import builtins, importlib, importlib.util, json, sys
names = json.loads(sys.argv[1])
real_import = builtins.__import__
found = []

def checking_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    package = (globals or {}).get("__package__") or ""
    target = importlib.util.resolve_name("." * level + name, package) if level else name
    wanted = [target] + [f"{target}.{item}" for item in (fromlist or ())]
    for module_name in wanted:
        module = sys.modules.get(module_name)
        spec = getattr(module, "__spec__", None)
        if (module_name.startswith("unite_hf") and module_name != importer and importer.startswith("unite_hf")
                and getattr(spec, "_initializing", False)):
            found.append([first, importer, module_name])
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = checking_import
for first in names:
    for loaded in [m for m in sys.modules if m == "unite_hf" or m.startswith("unite_hf.")]:
        del sys.modules[loaded]
    importlib.import_module(first)
print(json.dumps(found))
"""


def test_each_module_imports_first_without_a_live_cycle():
    names = sorted(_modules())
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
