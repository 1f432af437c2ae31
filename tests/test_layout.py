"""Project promises that are easy to break silently."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["api", "errors", "importance", "measure", "record", "schedules", "selection", "surgery", "verify"]


def test_core_imports_neither_lightning_nor_hydra() -> None:
    modules = ", ".join(f"lightning_prune.{name}" for name in CORE) + ", lightning_prune.graph.groups"
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'):\n"
        "            raise ImportError('core imported ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import lightning_prune, {modules}\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [commands[1]]


# The direction of imports (docs/ARCHITECTURE.md): a module imports only from its own layer or the ones above
# it in this list. Entries are module paths under lightning_prune; the longest matching prefix decides.
LAYERS = [
    ["errors", "registry"],
    ["running", "graph.labels"],
    ["measure", "language", "cuts", "slicing"],
    ["graph.builder"],
    ["graph.rules", "graph.module_rules"],
    ["graph.tracer"],
    ["graph.groups", "graph"],
    ["importance", "statistics", "selection", "schedules"],
    ["planning", "fixups"],
    ["surgery"],
    ["record", "verify"],
    ["budget", "latency_table", "latency", "widths"],
    ["api", "depth", "saving", "export", "memory"],
    ["methods"],
    ["integrations"],
    ["callbacks", "data", "models"],
    ["cli", "demo", "report", "memory_report"],
]
# Integrations reach down only into what the core offers extensions: registries and the trace builder.
INTEGRATION_MAY_IMPORT = [
    "errors", "registry", "cuts", "fixups", "graph.builder", "graph.labels", "graph.module_rules", "graph.rules",
    "latency_table",
]  # fmt: skip
CUTTING = ["cuts", "slicing", "fixups", "surgery"]  # never import the graph, which never imports them


def _package_modules() -> dict[str, Path]:
    package = ROOT / "lightning_prune"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The lightning_prune modules ``path`` imports anywhere in its code (module level or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import submodule`` imports the submodule; ``from module import name``, the module
            wholes = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [w if w.removeprefix("lightning_prune.") in modules else node.module for w in wholes]
        found.update(name.removeprefix("lightning_prune.") for name in names if name.startswith("lightning_prune."))
    return {module for module in found if module in modules}


def _layer(module: str) -> int:
    best, depth = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > depth:
                best, depth = index, len(entry)
    assert best is not None, f"lightning_prune.{module} has no place in LAYERS: add it (and to docs/ARCHITECTURE.md)"
    return best


def test_imports_run_one_way() -> None:
    modules = _package_modules()
    upward = []
    for module, path in sorted(modules.items()):
        if not module:  # the package itself gathers the public names
            continue
        for imported in sorted(_imports(path, modules)):
            if imported and _layer(imported) > _layer(module):
                upward.append(f"lightning_prune.{module} imports lightning_prune.{imported}")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    modules = _package_modules()
    edges = {m: {i for i in _imports(p, modules) if i and i != m} for m, p in modules.items() if m}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(edges.get(module, ())):
            # a package imports its own submodules to register them; that is not a cycle back up
            if imported.startswith(module + "."):
                continue
            if state.get(imported) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, module, imported]))
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_graph_and_cutting_do_not_import_each_other() -> None:
    modules = _package_modules()
    for module, path in modules.items():
        imported = _imports(path, modules)
        if module == "graph" or module.startswith("graph."):
            assert not [i for i in imported if i in CUTTING], f"lightning_prune.{module} imports surgery"
        if module in CUTTING:
            assert not [i for i in imported if i == "graph" or i.startswith("graph.")], module


def test_integrations_reach_only_into_extension_points() -> None:
    modules = _package_modules()
    for module, path in modules.items():
        if not module.startswith("integrations"):
            continue
        for imported in _imports(path, modules):
            allowed = imported.startswith("integrations") or any(
                imported == entry or imported.startswith(entry + ".") for entry in INTEGRATION_MAY_IMPORT
            )
            assert allowed, f"lightning_prune.{module} imports lightning_prune.{imported}, not an extension point"


def test_no_file_is_too_long_to_read_in_one_sitting() -> None:
    long = {m: n for m, p in _package_modules().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these by concern: {long}"


def test_a_third_party_integration_loads_by_entry_point_and_a_broken_one_only_warns(tmp_path) -> None:
    """Two installed distributions declare integrations: one registers a layer fixup, one fails to import."""
    for name, body in (("goodplugin", "GOOD"), ("badplugin", "BAD")):
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lightning_prune.integrations]\n{name} = {name}_layers\n")
        (tmp_path / f"{name}_layers.py").write_text(
            "import lightning_prune as lp\nlp.register_layer('goodplugin.Layer', lambda module: None)\n"
            if body == "GOOD"
            else "raise ImportError('this plugin is broken')\n"
        )
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lightning_prune\n"
        "from lightning_prune.fixups import LAYER_FIXUPS\n"
        "print('goodplugin.Layer' in LAYER_FIXUPS)\n"
        "print([str(w.message) for w in caught if 'badplugin' in str(w.message)])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr
    registered, warned = done.stdout.splitlines()
    assert registered == "True"
    assert "integration 'badplugin' (badplugin_layers) failed to load and is skipped" in warned
    assert "this plugin is broken" in warned
