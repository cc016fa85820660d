"""The import graph of ``prelort``: no cycle between modules, no layer importing a higher one.

Every module under ``src/prelort`` is parsed with ``ast`` (nothing is imported), and every
``import`` / ``from ... import`` statement counts: at module level, inside functions (a lazy
import still runs, so it can close a cycle), and under ``if TYPE_CHECKING:``. The last kind
never runs, so it is left out of the cycle check, but it still states a dependency on the
other module's types: it is held to the layers like any other import. ``importlib``
imports (``run.plugins``, the lazy tables below) name modules in strings and are not seen.

How targets are resolved:

- ``import a.b.c`` and ``from a.b.c import x`` depend on module ``a.b.c`` (relative imports
  resolved against the importer's package); ``from a.b import c`` where ``a.b.c`` is a
  module depends on ``a.b.c``, else on the package ``a.b`` (its ``__init__``).
- **Lazy packages.** ``prelort``, ``prelort.adapters`` and ``prelort.federation`` re-export
  names lazily: a ``_LAZY = {"name": "module", ...}`` table and a module ``__getattr__``
  (``prelort._lazy.lazy_getattr``) that imports the module on first use.
  ``import prelort.federation`` runs none of the table's modules (that is what keeps
  ``prelort.federation.methods`` torch-free), so the table adds no edge out of the package;
  counting it would also make every submodule that imports a name from its own package look
  like a cycle with it. Instead ``from prelort.federation import run_simulation`` depends on
  the table's module, ``prelort.federation.simulator``, which is what then runs.
  A package with a ``__getattr__`` must have such a table (checked), so no re-export hides.
- **Package ``__init__``s.** Importing ``a.b.c`` first runs the package ``a.b``; for the
  cycle check an import of ``a.b.c`` therefore also depends on each package above it that
  is not already a package of the importer (those ran before the importer did). So
  ``federation.plan -> aggregation.base`` also runs ``prelort.aggregation``, whose eager
  ``__init__`` imports every rule. The layer check looks only at the imports written.

The allow-list (``ALLOWED``) holds the few known violations that need edits elsewhere, each
with its reason; an entry no import matches any more fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "prelort"

# -- the layers --------------------------------------------------------------------------------------
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "bottom",  # pure: the standard library (and psutil), nothing of prelort but each other
        (
            ROOT,  # only its own lazy table (``importlib``): ``import prelort`` imports nothing
            "prelort._lazy",
            "prelort.errors",
            "prelort.atomic_files",  # atomic writes (results, checkpoints, adapters)
            "prelort.processes",
            "prelort.lock",
            "prelort.seeding",  # derive_seed, generator_for (issue #19: a pure bottom module)
            "prelort.source_registry",
            "prelort.federation.methods",  # the method table (issue #19: a pure bottom module)
        ),
    ),
    (
        "config",  # the validated run configuration: no torch (docs/design.md §8)
        (
            "prelort.config",
            "prelort.config_checks",
            "prelort.config_sections",
            "prelort.config_workload",
            "prelort.config_doc",
        ),
    ),
    (
        "libraries",  # building blocks over the config; among each other only the cycle check applies
        (
            "prelort.adapters",
            "prelort.aggregation",
            "prelort.data",
            "prelort.evaluation",
            "prelort.models",
            "prelort.training",
            # reporting (results files, summaries, tables, plots) needs only the config and the
            # method table, and is used from below the federation: adapters, checkpoints and the
            # run folder write files atomically with ``reporting.files``
            "prelort.reporting",
        ),
    ),
    (
        "federation",  # the plan, rounds, driver, simulator; the workloads
        (
            "prelort.federation",
            "prelort.workloads",
            # the driver's progress bar and TensorBoard log: reads RunPlan and ServerState and
            # is imported by the driver, so it sits with it, not with the rest of reporting
            "prelort.reporting.progress",
        ),
    ),
    ("apps", ("prelort.flower", "prelort.commands")),  # Flower apps and worker, the CLI's commands
    (
        "entry points",  # command lines and the Python API: nothing in prelort imports them
        # (``prelort.run`` / ``compare`` reach ``prelort.api`` through the root's lazy table);
        # ``prelort run --runtime flower-...`` (commands.runtime) hands over to the launcher's CLI
        ("prelort.cli", "prelort.flower.local", "prelort.api", "prelort.commands.runtime"),
    ),
)
"""Layers from the bottom up: a module may import its own layer and those below it, never one
above. A module is placed by the longest entry that is it or a package above it (the root
entry places only ``prelort`` itself); every module must be placed."""

ALLOWED: dict[tuple[str, str], str] = {
    ("prelort.config", "prelort.aggregation"): (
        "config -> libraries (no cycle: the libraries write files through the bottom "
        "atomic_files): Config._validate_privacy imports the rule registry lazily, only for a "
        "[privacy] config, to ask the rule whether it has a sum form (AggregationRule.sum_form, "
        "a property of the rule class, which needs torch)"
    ),
    ("prelort.source_registry", "prelort.data.examples"): (
        "bottom -> libraries, under TYPE_CHECKING only (the loader type returns list[Example]): "
        "the Example record (errors only) could move to a bottom module"
    ),
}
"""Known violations (importer, imported module) -> why they remain. Dropped from both checks."""


# -- the graph -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    """One import statement's dependency of ``importer`` on module ``target``."""

    importer: str
    target: str
    line: int
    type_checking: bool = False


def discover(src: Path, root: str = ROOT) -> tuple[dict[str, Path], set[str]]:
    """Every module under ``src/root`` by dotted name, and which of them are packages."""
    modules: dict[str, Path] = {}
    packages: set[str] = set()
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        modules[".".join(parts)] = path
    return modules, packages


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module (functions included), and whether it is under
    ``if TYPE_CHECKING:`` (its body; an ``else:`` runs)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, tc = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, tc
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(child, True) for child in node.body]
            stack += [(child, tc) for child in node.orelse]
            continue
        stack += [(child, tc) for child in ast.iter_child_nodes(node)]


def lazy_table(tree: ast.Module) -> dict[str, str] | None:
    """A package's ``_LAZY = {"name": "module", ...}`` (None: it has none)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "_LAZY":
            table = ast.literal_eval(value)
            assert isinstance(table, dict), "_LAZY must be a dict literal of name -> module"
            return {str(k): str(v) for k, v in table.items()}
    return None


def _defines_getattr(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__getattr__" for t in node.targets
        ):
            return True
    return False


def collect(src: Path, root: str = ROOT) -> tuple[list[Edge], set[str], set[str]]:
    """(every import of a ``root`` module as an Edge, the modules, the packages)."""
    modules, packages = discover(src, root)
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in modules.items()}
    lazy: dict[str, dict[str, str]] = {}
    for name in packages:
        table = lazy_table(trees[name])
        if table is not None:
            lazy[name] = table
        elif _defines_getattr(trees[name]):
            raise AssertionError(f"{name} defines __getattr__ without a _LAZY table this test can read")

    def existing(dotted: str) -> str:
        """The module itself, or the nearest package above it that exists."""
        while dotted not in modules and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted

    def ours(dotted: str) -> bool:
        return dotted == root or dotted.startswith(root + ".")

    edges: list[Edge] = []
    for name, tree in trees.items():
        package = name if name in packages else name.rpartition(".")[0]
        for node, tc in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if ours(alias.name)]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                if not ours(source):
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # a submodule
                        targets.append(f"{source}.{alias.name}")
                    elif alias.name in lazy.get(source, {}):  # a lazy re-export: what runs
                        targets.append(lazy[source][alias.name])
                    else:
                        targets.append(source)
            for target in targets:
                resolved = existing(target)
                if resolved != name:
                    edges.append(Edge(name, resolved, node.lineno, tc))
    return edges, set(modules), packages


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def runtime_graph(edges: Iterable[Edge], modules: Iterable[str]) -> dict[str, set[str]]:
    """The imports that run (no TYPE_CHECKING ones), with the package ``__init__``s they run."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.type_checking:
            continue
        graph[e.importer].add(e.target)
        own = {*_ancestors(e.importer), e.importer}
        graph[e.importer].update(p for p in _ancestors(e.target) if p not in own)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (two or more nodes, or a self-loop),
    each sorted, by Tarjan's algorithm."""
    succ = {n: sorted(set(vs)) for n, vs in graph.items()}
    for vs in list(succ.values()):
        for v in vs:
            succ.setdefault(v, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ[v]:
                components.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            connect(v)
    return sorted(components)


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one: a shortest
    path from the component's first node back to it; sorted."""
    succ = {n: sorted(set(vs)) for n, vs in graph.items()}
    cycles = []
    for component in strongly_connected(graph):
        start, members = component[0], set(component)
        paths = {w: [start, w] for w in succ.get(start, []) if w in members}
        frontier = list(paths)
        while start not in paths:  # breadth first inside the component
            nxt = []
            for v in frontier:
                for w in succ.get(v, []):
                    if w in members and w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
            frontier = nxt
        cycles.append(paths[start])
    return sorted(cycles)


def layer_of(module: str) -> tuple[int, str] | None:
    """(index, name) of the module's layer (None: not placed)."""
    best: tuple[int, int, str] | None = None
    for i, (layer, entries) in enumerate(LAYERS):
        for entry in entries:
            places = module == entry or (entry != ROOT and module.startswith(entry + "."))
            if places and (best is None or len(entry) > best[0]):
                best = (len(entry), i, layer)
    return None if best is None else (best[1], best[2])


# -- the checks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> tuple[list[Edge], set[str], set[str]]:
    return collect(SRC)


def _kept(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if (e.importer, e.target) not in ALLOWED]


def test_no_import_cycles(graph: tuple[list[Edge], set[str], set[str]]) -> None:
    edges, modules, _ = graph
    runtime = runtime_graph(_kept(edges), modules)
    lines = []
    component_of = {c[0]: c for c in strongly_connected(runtime)}  # each cycle starts there
    for cycle in find_cycles(runtime):
        component = component_of[cycle[0]]
        where = []
        for a, b in itertools.pairwise(cycle):
            at = [e.line for e in edges if e.importer == a and e.target == b and not e.type_checking]
            where.append(f"{a}:{at[0]}" if at else f"{a} (runs package {b})")
        lines.append(" -> ".join(cycle) + "\n      via " + ", ".join(where))
        others = sorted(set(component) - set(cycle))
        if others:
            lines.append(f"      (and more cycles through {', '.join(others)})")
    assert not lines, "import cycles:\n  " + "\n  ".join(lines)


def test_no_lower_layer_imports_a_higher_one(graph: tuple[list[Edge], set[str], set[str]]) -> None:
    edges, modules, _ = graph
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    bad = []
    for e in _kept(edges):
        low, high = layer_of(e.importer), layer_of(e.target)
        assert low is not None and high is not None
        if high[0] > low[0]:
            tc = " (under TYPE_CHECKING)" if e.type_checking else ""
            bad.append(f"{e.importer}:{e.line} [{low[1]}] imports {e.target} [{high[1]}]{tc}")
    assert not bad, "imports of a higher layer:\n  " + "\n  ".join(sorted(bad))


def test_every_allowed_violation_still_exists(graph: tuple[list[Edge], set[str], set[str]]) -> None:
    edges, _, _ = graph
    present = {(e.importer, e.target) for e in edges}
    stale = sorted(pair for pair in ALLOWED if pair not in present)
    assert not stale, f"fixed: remove these from ALLOWED: {stale}"


def test_seeding_and_the_method_table_import_nothing_of_prelort(
    graph: tuple[list[Edge], set[str], set[str]],
) -> None:
    """The seeding and the method table import nothing of prelort (issue #19)."""
    edges, _, _ = graph
    for module in ("prelort.seeding", "prelort.federation.methods"):
        assert [e.target for e in edges if e.importer == module] == []


# -- the machinery on hand-made input -----------------------------------------------------------------
def test_find_cycles_on_a_hand_made_graph() -> None:
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert find_cycles(acyclic) == []
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"f"}, "g": {"a"}}
    assert find_cycles(g) == [["a", "b", "c", "a"], ["d", "e", "d"], ["f", "f"]]
    assert strongly_connected(g) == [["a", "b", "c"], ["d", "e"], ["f"]]  # g: on no cycle


def test_collect_resolves_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": '_LAZY = {"Thing": "toy.sub.thing"}\n__getattr__ = make(_LAZY)\n',
        "base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.top import T\n",
        "top.py": "from toy import Thing\nfrom toy.sub import thing\nimport toy.base\n",
        "sub/__init__.py": "from .thing import Thing\n",
        "sub/thing.py": "def f():\n    from .. import base\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    edges, modules, packages = collect(tmp_path, "toy")
    assert packages == {"toy", "toy.sub"} and "toy.sub.thing" in modules
    got = {(e.importer, e.target, e.type_checking) for e in edges}
    assert got == {
        ("toy.base", "toy.top", True),
        ("toy.top", "toy.sub.thing", False),  # the lazy table's module, and the submodule
        ("toy.top", "toy.base", False),
        ("toy.sub", "toy.sub.thing", False),
        ("toy.sub.thing", "toy.base", False),  # relative, inside a function
    }
    graph = runtime_graph(edges, modules)
    assert graph["toy.top"] == {"toy.sub.thing", "toy.sub", "toy.base"}  # runs package toy.sub
    assert find_cycles(graph) == []  # the TYPE_CHECKING import closes no cycle
    (pkg / "base.py").write_text("import toy.top\n")
    assert find_cycles(runtime_graph(collect(tmp_path, "toy")[0], modules)) == [
        ["toy.base", "toy.top", "toy.base"]
    ]


def test_no_source_file_is_over_its_line_budget() -> None:
    """Issue #19's size budget: no file under ``src/`` over 450 lines, the round driver under 300
    (a file that outgrows it is split by what it does, not trimmed)."""
    limits = {"prelort/federation/driver.py": 299}
    over = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limits.get(name, 450):
            over.append(f"{name}: {lines} lines (at most {limits.get(name, 450)})")
    assert not over, "; ".join(over)
