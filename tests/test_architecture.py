"""The layout is the architecture: these tests check its import rules on the source (AST) and at run time.

- the core (``sweep/*.py``, ``sweep/store/``), ``sweep/report/`` and ``sweep/extras/browse.py`` never import torch;
- only ``sweep/store/`` runs SQL;
- only ``sweep/engine/adapters/`` names model attributes such as ``transformer.h`` or ``model.layers``;
- dependencies point one way (cli -> extras -> engine -> core; report -> core), with no cycles;
- ``sweep/extras/`` uses the engine only through its public interface (``sweep.engine``);
- a sweep import inside a function says why it is deferred.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sweep"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    """core, store, engine, report or extras."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("engine", "report", "extras", "store"):
        return parts[1]
    return "core"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import in a file, ``from a import b`` resolved to ``a.b``
    when ``a.b`` is a module of the package."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    target = f"{child.module}.{alias.name}"
                    found.append((target if target in MODULES else child.module, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _sweep_imports(module: str) -> list[tuple[str, int, bool]]:
    return [(target, line, inner) for target, line, inner in _imports(MODULES[module])
            if target.split(".")[0] == "sweep" and target != module]


TORCH_FREE_EXTRAS = ("sweep.extras.browse",)
"""Extras that never measure: they read results.db only, so they neither import torch nor use the engine."""


def _torch_free(module: str) -> bool:
    return _layer(module) in ("core", "store", "report") or module in TORCH_FREE_EXTRAS


def test_core_and_report_never_import_torch_in_source():
    offenders = [f"{m}:{line}" for m, path in MODULES.items() if _torch_free(m)
                 for target, line, _ in _imports(path) if target.split(".")[0] == "torch"
                 or (m in TORCH_FREE_EXTRAS and _layer(target) == "engine")]
    assert not offenders, f"torch imported by torch-free modules: {offenders}"


def test_core_and_report_never_import_torch_at_run_time():
    torch_free = [m for m in MODULES if _torch_free(m) and m != "sweep.__main__"]
    code = ("import sys, importlib\n"
            f"for name in {torch_free!r}: importlib.import_module(name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported (it can switch the backend)'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_only_the_store_runs_sql():
    offenders = []
    for module, path in MODULES.items():
        if _layer(module) == "store":
            continue
        offenders += [f"{module}:{line} imports {target}" for target, line, _ in _imports(path)
                      if target.split(".")[0] in ("sqlite3", "sqlite_utils")]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "executescript"):
                offenders.append(f"{module}:{node.lineno} calls .{node.attr}()")
    assert not offenders, offenders


ADAPTER_ATTRIBUTES = {"transformer", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"}
"""Attribute names of specific architectures' modules (GPT-2's ``transformer.h`` and ``ln_f``, OPT's norm...)."""


def _adapter_paths() -> set[str]:
    from sweep.engine.adapters import FAMILIES

    return {path for family in FAMILIES.values() for path in (family.layers, family.final_norm) if path}


def test_only_the_adapters_name_model_attributes():
    paths = _adapter_paths()
    offenders = []
    for module, path in MODULES.items():
        if module == "sweep.engine.adapters" or module.startswith("sweep.engine.adapters."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in paths:
                offenders.append(f"{module}:{node.lineno} names {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr in ADAPTER_ATTRIBUTES:
                offenders.append(f"{module}:{node.lineno} reaches .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "layers" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "model":
                offenders.append(f"{module}:{node.lineno} reaches .model.layers")
    assert not offenders, offenders


ALLOWED = {
    "core": {"core", "store"},
    "store": {"store", "core"},
    "engine": {"engine", "core", "store"},
    "report": {"report", "core", "store"},
    "extras": {"extras", "engine", "core", "store"},
}
"""Which layers a layer may import at module level (the CLI's deferred imports are checked apart)."""


def test_dependencies_point_one_way():
    offenders = []
    for module in MODULES:
        for target, line, inner in _sweep_imports(module):
            if module == "sweep.cli" and inner:
                continue  # the CLI dispatches to every layer, importing each when its command runs
            if _layer(target) not in ALLOWED[_layer(module)]:
                offenders.append(f"{module}:{line} -> {target}")
    assert not offenders, offenders


def test_the_store_needs_nothing_but_errors():
    offenders = [f"{m}:{line} -> {target}" for m in MODULES if _layer(m) == "store"
                 for target, line, _ in _sweep_imports(m)
                 if target not in ("sweep.errors",) and _layer(target) != "store"]
    assert not offenders, offenders


def test_extras_use_only_the_public_engine():
    offenders = [f"{m}:{line} -> {target}" for m in MODULES if _layer(m) == "extras"
                 for target, line, _ in _sweep_imports(m)
                 if _layer(target) == "engine" and target != "sweep.engine"]
    assert not offenders, offenders


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _sweep_imports(m) if t in MODULES} for m in MODULES}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_imports_inside_functions_say_why_they_are_deferred():
    offenders = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        offenders += [f"{module}:{line}" for target, line, inner in _sweep_imports(module)
                      if inner and "deferred" not in lines[line - 1]]
    assert not offenders, f"a sweep import inside a function needs a `# deferred: <why>` comment: {offenders}"
