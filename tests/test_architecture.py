"""The package's shape: imports run one way (no cycles, no lower layer importing a higher one), and no
function grows past what a reader can hold (the size the house style allows)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and the ones below, never one above: the Hydra-free
# core must not depend on the commands, training on evaluation, nor the model on the data.
LAYERS: list[tuple[str, ...]] = [
    (
        "mrl.errors",
        "mrl.version",
        "mrl.files",
        "mrl.config_path",
        "mrl.resolvers",
        "mrl.instantiate",
        "mrl.logs",
        "mrl.config_checks",
    ),
    ("mrl.nn",),
    ("mrl.models",),
    ("mrl.data",),
    # the training wing: reading and writing checkpoints at the bottom, the job at the top
    ("mrl.training", "mrl.training.checkpoints", "mrl.training.checkpoint_io"),
    ("mrl.tracking",),
    (
        "mrl.training.module",
        "mrl.training.callbacks",
        "mrl.training.ema",
        "mrl.training.schedules",
        "mrl.training.assemble",
        "mrl.training.posthoc_module",
    ),
    ("mrl.training.job", "mrl.training.posthoc", "mrl.eval", "mrl.deploy", "mrl.compare", "mrl.preflight"),
    ("mrl.cli",),
]
# the package's public facade (`from mrl import MatryoshkaLinear, load`) sits above everything it re-exports
FACADE = "mrl"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200
MAX_TOP_LEVEL_MODULES = 12


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "mrl").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every mrl module ``path`` imports, at the top or inside a function (both are dependencies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mrl.eval import run` imports the module mrl.eval.run; `from mrl.x import f` mrl.x
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        found |= {n for n in names if n in known}
    return found


def layer_of(module: str) -> int:
    """The layer of the longest prefix naming ``module`` (``mrl.training.job`` before ``mrl.training``)."""
    matches = [
        (len(p), index)
        for index, prefixes in enumerate(LAYERS)
        for p in prefixes
        if module == p or module.startswith(p + ".")
    ]
    if not matches:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it in one")
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        if module != FACADE:
            layer_of(module)


def test_no_module_imports_a_higher_layer(graph):
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module != FACADE
        for target in targets
        if target != FACADE and layer_of(target) > layer_of(module)
    ]
    assert not upward, upward
    assert not [m for m, targets in graph.items() if FACADE in targets and m != FACADE], "import mrl.<module>"


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError(" -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_top_of_the_package_stays_small():
    """A handful of generic modules at the top; every feature lives in its package."""
    top = sorted(p.name for p in (SRC / "mrl").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_class_is_longer_than_a_few_screens():
    """A class past this size holds several jobs: split them into collaborators."""
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long, long


def test_tests_share_helpers_only_through_the_support_module():
    """Helpers several tests use live in tests/support.py: no test module imports another test module
    (whose tests would then run, or break, with it), and none imports conftest.py (pytest loads it itself;
    its fixtures arrive by name)."""
    tests = next(p for p in Path(__file__).resolve().parents if (p / "support.py").is_file())
    found = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [".".join(filter(None, (node.module, alias.name))) for alias in node.names]
            else:
                continue
            parts = {part for name in names for part in name.split(".")}
            if any(part == "conftest" or part.startswith("test_") for part in parts):
                found.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert not found, f"import these from support.py instead: {found}"
