"""No module of adallava_kernels imports itself back: the graph of module-level imports has no cycle, and
among the ops neither has the graph that counts the imports made inside functions too.

Read from the source with ``ast`` (nothing is imported). A module-level import is one at a module's top
level, inside ``try``/``if`` blocks there too, but not under ``if TYPE_CHECKING:`` (never run).
"""

import ast
from pathlib import Path

import adallava_kernels

PACKAGE = "adallava_kernels"
ROOT = Path(adallava_kernels.__file__).parent


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def top_level_imports(tree: ast.Module):
    """The ``Import``/``ImportFrom`` nodes a module runs when imported."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)


def every_import(tree: ast.Module):
    """Every ``Import``/``ImportFrom`` node of a module, those in its functions (run at call time) too."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def imported_modules(name: str, path: Path, modules: dict[str, Path], imports=top_level_imports) -> set[str]:
    """The package's modules that ``name`` imports at its top level (``from .x import y`` names ``.x.y``
    where that is a module, else ``.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph(imports=top_level_imports, within: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules it imports, over the modules named ``within`` or under it."""
    modules = module_names()
    inside = {name for name in modules if name == within or name.startswith(within + ".")}
    return {name: imported_modules(name, modules[name], modules, imports) & inside for name in inside}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (first repeated last), or ``None``."""
    state, stack = {}, []  # state: 1 while on the depth-first stack, 2 when done

    def visit(node):
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reads_imports_of_every_kind():
    graph = import_graph()
    assert "adallava_kernels.ops.registry" in graph["adallava_kernels.ops.rms_norm"]  # from .registry import
    assert "adallava_kernels.ops.rms_norm" in graph["adallava_kernels.ops.library"]  # from . import rms_norm
    assert "adallava_kernels.kv_cache" in graph["adallava_kernels.ops.masked_attention"]  # from ..kv_cache import
    assert "adallava_kernels.budget" in graph["adallava_kernels"]  # the package's __init__


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_no_op_imports_itself_back_even_at_call_time():
    # The registered operators' functions import their kernels' modules when called; none imports them back.
    # (Over the whole package, a call-time ``from .. import _C`` reads as the package, not the extension.)
    assert find_cycle(import_graph(every_import, within="adallava_kernels.ops")) is None


def test_op_modules_register_their_operators_through_the_registry_not_the_library():
    graph = import_graph(every_import)
    for name in ("rms_norm", "rope", "silu_and_mul"):
        assert "adallava_kernels.ops.registry" in graph[f"adallava_kernels.ops.{name}"]
        assert "adallava_kernels.ops.library" not in graph[f"adallava_kernels.ops.{name}"]


def test_no_runtime_class_reaches_into_another_objects_private_attributes():
    # The runtime's modules talk through public methods: ``x._name`` only on ``self`` or ``cls`` (a module's
    # own private functions, called by bare name, are not attribute reads).
    offenders = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
