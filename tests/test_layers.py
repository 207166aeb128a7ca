"""The package's import graph: no cycle, and no layer imports a layer above it (docs/architecture.md).

Read from the source with ``ast`` (nothing is imported): every ``import`` of
an mpiburst module counts, at module level or inside a function, except
those under ``if TYPE_CHECKING:`` (type hints only). A new module needs no
entry here to be checked for cycles; list it in :data:`LAYERS` to place it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mpiburst"

#: Bottom to top; a module may import modules of its own layer or of layers below.
#: A package (``store``, ``server``, ``cli``, ``bench``, ``testing``) is placed as one unit.
LAYERS: list[set[str]] = [
    {"errors", "sizes", "overlay", "buffers", "paths", "align", "collective", "perms", "progress", "nodes",
     "cuda"},                                                  # pure helpers
    {"store"},                                                 # the boundary to the server's data
    {"assembly", "iostats", "lookup"},                         # the current bytes of a range; I/O counters;
                                                               # an unlooked record's BFS size
    {"runconf", "server", "engine_process"},                   # the server's and the engine's processes
    {"tier"},                                                  # a run as seen by one process
    {"flush", "drain"},                                        # tier data -> BFS (drain: while it is written)
    {"residency"},                                             # purge, pin, prestage, make_room
    {"writeback"},                                             # one process's buffered file
    {"datatypes", "views", "messages", "memory", "staging"},   # mpiburst.File's datatypes, views, buffers
    {"file", "fileobj", "channels", "policy"},                 # the APIs applications use
    {"h5", "engine", "jobrun", "named", "report", "nodeserve", "checkpoint", "halt"},   # built on those APIs
    {"memio", "cli", "bench", "testing", "__init__", "__main__"},   # entry points and test helpers
]


def _unit(module: str) -> str:
    """The layer unit of ``mpiburst.a.b``: ``a``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The mpiburst modules ``path`` imports (resolved to module names), outside ``if TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mpiburst")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "mpiburst":
                if node.module:                  # "from . import x" names modules, not the package
                    found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m != name}


def _private_uses(source: str, name: str, is_package: bool = False) -> list[str]:
    """The private names (``_x``, not ``__x__``) of other mpiburst modules that module ``name`` uses.

    Both ``from mpiburst.a import _x`` (or its relative form) and ``a._x``
    where ``a`` is bound to an mpiburst module by an import count, inside
    a package too (``store/cluster_store.py`` using ``store/redis_store.py``'s).
    """
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    modules: dict[str, str] = {}         # local name -> the mpiburst module it is bound to
    found: list[str] = []

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mpiburst":
                    modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else "mpiburst"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mpiburst":
                continue
            for a in node.names:
                if private(a.name):
                    found.append(f"{name}: from {target} import {a.name}")
                elif _is_module(f"{target}.{a.name}"):
                    modules[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain: list[str] = []
            value: ast.expr = node.value
            while isinstance(value, ast.Attribute):   # a.b._x: the module a.b
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                target = ".".join([modules[value.id], *chain])
                if target != name and _is_module(target):
                    found.append(f"{name}: {target}.{node.attr}")
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def _layer(unit: str) -> int | None:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    return None


def test_no_module_imports_a_layer_above_it():
    upward = []
    for module, targets in _graph().items():
        mine = _layer(_unit(module))
        for target in targets:
            theirs = _layer(_unit(target))
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "upward imports (see LAYERS and docs/architecture.md): " + ", ".join(sorted(upward))


def test_no_module_uses_another_module_s_private_names():
    """Every module reaches another only through its public names: no ``from x import _y``, no ``x._y``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _private_uses(path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not found, "private names used across modules: " + "; ".join(found)


def test_the_private_use_checker_sees_both_forms():
    """The checker itself: both forms are found, inside a package too; public names and object members are not."""
    source = ("from .redis_store import RedisStore, _key\n"
              "from .. import flush\n"
              "import mpiburst.residency as res\n"
              "def f(e, store):\n"
              "    flush.writes._pwrite(e._replace(blob=0), store._sockets, res._entries, flush.sync)\n")
    assert _private_uses(source, "mpiburst.store.cluster_store") == [
        "mpiburst.store.cluster_store: from mpiburst.store.redis_store import _key",
        "mpiburst.store.cluster_store: mpiburst.flush.writes._pwrite",
        "mpiburst.store.cluster_store: mpiburst.residency._entries"]


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is no cycle of the design
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and PACKAGE.joinpath(*m.split(".")[1:]).is_dir())}
             for m, ts in graph.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_every_unit_is_placed_and_exists():
    """LAYERS places every module of the package, and names none that is gone (a rename is renamed here too)."""
    units = {_unit(m) for m in _graph()}
    placed = {u for layer in LAYERS for u in layer}
    assert not placed - units, f"LAYERS lists modules that do not exist: {sorted(placed - units)}"
    assert not units - placed, f"modules with no place in LAYERS (add them, and to docs/architecture.md): " \
        f"{sorted(units - placed)}"


def _diagram_rows() -> dict[str, int]:
    """Each unit drawn in docs/architecture.md's layer diagram and its row (top: 0).

    A row starts on a line indented by one space (``flush.py   batches ...``);
    a line indented by three continues its names (``  policy.py``, or a
    package's files); the text after two spaces is a description.
    """
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    rows: dict[str, int] = {}
    row = -1
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if indent not in (1, 3):
            continue
        row += indent == 1
        names = line.strip().split("  ")[0]
        for name in re.findall(r"\b([a-z_0-9]+)(?:\.py\b|/)", names):
            rows.setdefault(name, row)
    return rows


def test_the_diagram_is_the_layers_table():
    """docs/architecture.md draws LAYERS: every unit, and none drawn below a unit of a lower layer."""
    rows = _diagram_rows()
    placed = {u for layer in LAYERS for u in layer} - {"__init__", "__main__"}
    assert not placed - set(rows), f"units missing from the diagram: {sorted(placed - set(rows))}"
    wrong = [f"{a} (layer {_layer(a)}) drawn below {b} (layer {_layer(b)})"
             for a in placed for b in placed if _layer(a) > _layer(b) and rows[a] > rows[b]]
    assert not wrong, "the diagram disagrees with LAYERS: " + "; ".join(sorted(wrong))


def test_the_checker_resolves_relative_imports():
    """The checker itself: relative imports of every form are resolved to module names."""
    assert "mpiburst.store" in _imports(PACKAGE / "writeback.py")
    assert "mpiburst.store.base" in _imports(PACKAGE / "store" / "memory.py")
    assert {"mpiburst.flush", "mpiburst.residency"} <= _imports(PACKAGE / "engine.py")
    assert _layer("writeback") > _layer("store")
