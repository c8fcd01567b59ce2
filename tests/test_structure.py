"""The package's layout as a specification: no private reach-ins, no import cycles, front ends apart.

Read from the source with `ast`, so these hold for imports inside functions too (a lazy import is still a
dependency, and was how cycles hid before).
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastattr"
# The front ends: each builds through fastattr.pipeline and imports the core, never another front end. The command
# line dispatches to the subcommands the others define (their parsers and runs), so it alone imports those.
FRONT_ENDS = {"fastattr.cli", "fastattr.bench", "fastattr.raydata", "fastattr.serve"}
DISPATCHER = "fastattr.cli"
SUBCOMMANDS = {"fastattr.bench", "fastattr.serve.command", "fastattr.raydata"}  # raydata: `explain --ray`


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name an `ImportFrom` node imports from, inside `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package(module) else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of `module`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in MODULES else (source, alias.name, node.lineno))
    return found


def internal_edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module in MODULES:
        for target, _, _ in imports(module):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def front_end_of(module: str) -> str | None:
    return next((f for f in FRONT_ENDS if module == f or module.startswith(f + ".")), None)


def test_no_module_imports_a_private_name_from_another_fastattr_module():
    offences = [f"{module}:{line} imports {name} from {source}"
                for module in MODULES for source, name, line in imports(module)
                if name and name.startswith("_") and source.startswith("fastattr") and source != module]
    assert offences == []


def test_no_module_reads_a_private_attribute_of_another_fastattr_module():
    offences = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    target = alias.name if isinstance(node, ast.Import) else f"{resolve(module, node)}.{alias.name}"
                    if target in MODULES and target != module:
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offences.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert offences == []


def test_no_import_cycle_among_fastattr_modules():
    edges = internal_edges()
    # The package roots only gather their submodules' names; a cycle through one is still a cycle.
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_inside_the_package_imports_the_package_root():
    # The root imports every public module, so an import of it from inside is a cycle waiting to happen.
    offences = [f"{module} imports fastattr" for module, targets in internal_edges().items()
                if "fastattr" in targets and module != "fastattr"]
    assert offences == []


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_a_front_end_imports_no_other_front_end(front_end):
    crossings = set()
    for module, targets in internal_edges().items():
        if front_end_of(module) != front_end:
            continue
        for target in targets:
            other = front_end_of(target)
            if other is not None and other != front_end and not (front_end == DISPATCHER and target in SUBCOMMANDS):
                crossings.add(f"{module} -> {target}")
    assert crossings == set()


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS - {DISPATCHER}))
def test_a_front_end_builds_through_the_one_construction_path(front_end):
    modules = [m for m in MODULES if front_end_of(m) == front_end]
    edges = internal_edges()
    assert any("fastattr.pipeline" in edges[m] or "fastattr.options" in edges[m] for m in modules)
    # ... and constructs no explainer of its own.
    for module in modules:
        source = MODULES[module].read_text()
        for constructor in ("Explainer(", "OnnxExplainer(", "load_program(", "zoo.load_model("):
            assert constructor not in source, f"{module} calls {constructor} itself instead of fastattr.pipeline.build"


@pytest.mark.xdist_group("structure")
def test_a_grouped_test_carries_its_group_under_loadgroup(request):
    # The suite's module fixtures (exports, servers, Ray jobs) are made once because `--dist loadgroup` sends a
    # group to one worker; that holds only while pytest-xdist can rename the test (see pyproject.toml's dev pin).
    if not hasattr(request.config, "workerinput") or not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@structure"), request.node.nodeid
